#!/usr/bin/env bash
# One GPU check: build, GPU tests, benchmarks, profile, a short table last. Results go to $1 (or $OUT, or
# ./gpu_results) as at most 8 files (what the device tool brings back): log.txt (everything printed), build.log,
# bench_ops.json, bench_cem.json, summary.md, profile.txt, trace.json.gz.
# Runs on the CPU too (skipping what needs CUDA), so it is tried here before it meets the GPU.
#   make gpu-data   (here, once: the data travels inside the repo)
#   bash benchmarks/gpu_check.sh "$OUT"
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-${OUT:-gpu_results}}"
mkdir -p "$DEST"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
# The device machine receives the repo alone: ../shared/data travels as ./shared/data, a copy made beforehand by
# `make gpu-data` (an ignored folder; the device tool carries a checkout's shared/ folder).
if [ ! -d ../shared/data ] && [ -d shared/data ]; then export CEM_FAST_SHARED_DATA="$PWD/shared/data"; fi
[ -d "${CEM_FAST_SHARED_DATA:-../shared/data}" ] || { echo "no shared data: run make gpu-data first"; exit 2; }
exec > >(tee "$DEST/log.txt") 2>&1
date -u +"date: %Y-%m-%dT%H:%M:%SZ"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
echo "== build"
"$PY" setup.py -q build_ext --inplace > "$DEST/build.log" 2>&1; echo "build exit $? at ${SECONDS}s"
"$PY" -m cem_fast.info
echo "== tests (backends, golden incl. the GPU golden)"
"$PY" -m pytest -q -rs tests/test_backends.py tests/test_golden.py tests/test_reference_ops.py 2>&1 | tail -15
echo "== ops benchmarks"
"$PY" -m pytest -q benchmarks/test_bench_ops.py --benchmark-only --benchmark-json="$DEST/bench_ops.json" 2>&1 | tail -3
echo "== whole CEMs (exact / speed / large images / many ROIs)"
"$PY" -m pytest -q benchmarks/test_bench_cem.py --benchmark-only --benchmark-json="$DEST/bench_cem.json" 2>&1 | tail -3
echo "== profile of the speed-mode DN demo (top operators, per-stage timings)"
"$PY" benchmarks/profile_cem.py "$DEST" 2>&1 | head -40 || echo "profile failed"
echo "== summary"
"$PY" benchmarks/summarize.py "$DEST"/bench_*.json | tee "$DEST/summary.md"
echo "done in ${SECONDS}s"
