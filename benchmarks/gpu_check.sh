#!/usr/bin/env bash
# One GPU check: build, GPU tests, benchmarks, a short table last. Results go to $1 (or $OUT, or ./gpu_results).
# Runs on the CPU too (skipping what needs CUDA), so it is tried here before it meets the GPU.
#   bash benchmarks/gpu_check.sh "$OUT"
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-${OUT:-gpu_results}}"
mkdir -p "$DEST"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
} | tee "$DEST/device.txt"
echo "== build" && "$PY" setup.py -q build_ext --inplace > "$DEST/build.log" 2>&1; echo "build exit $?" | tee -a "$DEST/build.log"
"$PY" -m cem_fast.info | tee "$DEST/info.txt"
echo "== tests (backends, golden incl. the GPU golden)"
"$PY" -m pytest -q -rs tests/test_backends.py tests/test_golden.py tests/test_reference_ops.py \
  --junitxml="$DEST/tests.xml" 2>&1 | tail -15 | tee "$DEST/tests.txt"
echo "== benchmarks"
"$PY" -m pytest -q benchmarks/test_bench_ops.py --benchmark-only --benchmark-json="$DEST/bench_ops.json" \
  > "$DEST/bench_ops.txt" 2>&1
echo "== whole CEMs (exact / speed / large images / many ROIs)"
"$PY" -m pytest -q benchmarks/test_bench_cem.py --benchmark-only --benchmark-json="$DEST/bench_cem.json" \
  > "$DEST/bench_cem.txt" 2>&1
tail -3 "$DEST/bench_cem.txt"
echo "== profile of the speed-mode DN demo (top operators, per-stage timings)"
"$PY" benchmarks/profile_cem.py "$DEST/profile" > "$DEST/profile.log" 2>&1 || echo "profile failed: see profile.log"
"$PY" benchmarks/summarize.py "$DEST"/bench_*.json | tee "$DEST/summary.md"
