#!/usr/bin/env bash
# The one prepared GPU check: install and build with the machine's own python3 (no network there), GPU tests with
# the Triton interpreter off, compile checks, op and whole-CEM benchmarks, a profile, and one table last.
# Results go to $1 (or $OUT, or ./gpu_results) as at most 8 files, one folder deep (what the device tool brings
# back): log.txt (everything printed), build.log, bench_ops.json, bench_cem.json, summary.md, profile.txt,
# trace.json.gz. About 7 minutes on the H200.
#   make gpu-data                      (here, once: the data travels inside the repo as ./shared/data)
#   bash benchmarks/gpu_check.sh "$OUT"
# `make gpu-rehearsal` runs this same script on a CPU machine, in a scratch copy with a scratch interpreter, so
# that it cannot rot between GPU sessions (CI runs it). Knobs for the rehearsal: PYTHON, CEM_FAST_BENCH_SIZE,
# GPU_CHECK_BENCH_ARGS.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-${OUT:-gpu_results}}"
mkdir -p "$DEST"
PY="${PYTHON:-python3}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0  # compiled kernels: the interpreter would take hours on the GPU-sized tests
BENCH_ARGS="${GPU_CHECK_BENCH_ARGS:-}"
# The device machine receives the repo alone: ../shared/data travels as ./shared/data, a copy made beforehand by
# `make gpu-data` (an ignored folder; the device tool carries a checkout's shared/ folder).
if [ ! -d ../shared/data ] && [ -d shared/data ]; then export CEM_FAST_SHARED_DATA="$PWD/shared/data"; fi
[ -d "${CEM_FAST_SHARED_DATA:-../shared/data}" ] || { echo "no shared data: run make gpu-data first"; exit 2; }
exec > >(tee "$DEST/log.txt") 2>&1
date -u +"date: %Y-%m-%dT%H:%M:%SZ"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
"$PY" -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not importable"
echo "== install (editable, no dependencies, no network; builds cem_fast._C with CUDA for sm_90 in place)"
install() { "$PY" -m pip install -v --no-build-isolation --no-deps -e . "$@" >> "$DEST/build.log" 2>&1; }
: > "$DEST/build.log"
# a system Python 3.12 may refuse installs (PEP 668, "externally-managed-environment"): then with the override, and
# as a last resort the extension built in place and the kernels linked where the package expects them
install || install --break-system-packages || {
  echo "pip install failed: building in place" | tee -a "$DEST/build.log"
  "$PY" setup.py build_ext --inplace >> "$DEST/build.log" 2>&1 && ln -sfn ../kernels cem_fast/_kernels \
    && export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; }
echo "install exit $? at ${SECONDS}s"
# torch first: _C links against torch's libraries, which importing torch loads
"$PY" -c "import torch, cem_fast._C, cem_fast._kernels; print('installed: cem_fast._C and cem_fast._kernels import')" \
  || echo "WARNING: cem_fast._C or cem_fast._kernels does not import (see build.log)"
"$PY" -m cem_fast.info
echo "== tests (ops on every backend, custom ops: opcheck and torch.compile, GPU defects, compile checks, windows, layers,"
echo "   golden incl. the GPU golden)"
"$PY" -m pytest -q -rfEs -p no:cacheprovider tests/test_op_intervene.py tests/test_op_roi_sq_err.py \
  tests/test_dispatch.py tests/test_custom_ops.py tests/test_gpu_ready.py tests/test_golden.py tests/test_windows.py \
  tests/test_incremental.py \
  tests/test_triton_compile.py tests/test_cuda_compile.py 2>&1 \
  | grep -E "^(FAILED|ERROR|SKIPPED)|[0-9]+ (passed|failed)|^E  " | tail -40
if command -v compute-sanitizer >/dev/null 2>&1 && "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"
then
  echo "== compute-sanitizer memcheck over the CUDA op tests (out-of-range reads and writes of the kernels)"
  timeout -s INT 150 compute-sanitizer --tool memcheck --error-exitcode 99 "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_op_intervene.py tests/test_op_roi_sq_err.py -k "gpu" 2>&1 | tail -15
else
  echo "== compute-sanitizer: skipped (no CUDA device, or the tool is not on the PATH)"
fi
echo "== ops benchmarks (each backend beside a copy-bandwidth row)"
"$PY" -m pytest -q -p no:cacheprovider benchmarks/test_bench_ops.py --benchmark-only $BENCH_ARGS \
  --benchmark-json="$DEST/bench_ops.json" 2>&1 | tail -3
echo "== whole CEMs (exact / speed fp32 tf32 bf16 / large images / many ROIs)"
"$PY" -m pytest -q -p no:cacheprovider benchmarks/test_bench_cem.py --benchmark-only $BENCH_ARGS \
  --benchmark-json="$DEST/bench_cem.json" 2>&1 | tail -3
echo "== profile of the speed-mode DN demo (top operators, per-stage timings)"
"$PY" benchmarks/profile_cem.py "$DEST" 2>&1 | head -40 || echo "profile failed"
echo "== summary"
"$PY" benchmarks/summarize.py "$DEST"/bench_*.json | tee "$DEST/summary.md"
echo "done in ${SECONDS}s"
