#!/usr/bin/env bash
# Rehearse benchmarks/gpu_check.sh on this CPU machine: everything but CUDA execution. A scratch copy of the tree
# as the device tool sends it (tracked and untracked-not-ignored files, the data as ./shared/data), a scratch
# interpreter standing for the device machine's python3 (it sees the packages of .venv, as that machine has its
# own, but not .venv's cem_fast), then the script itself: install and build, compile checks, tests, benchmarks at
# CI size, profile, table. Fails when the script fails, a file it must bring back is missing, the build or the
# install failed, or a test failed. `make gpu-rehearsal`; CI runs it.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
mkdir -p "$SCRATCH/repo" "$SCRATCH/out"
(cd "$ROOT" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -xf - -C "$SCRATCH/repo"
DATA="${CEM_FAST_SHARED_DATA:-$ROOT/../shared/data}"
[ -d "$DATA" ] || DATA="$ROOT/shared/data"
if [ -d "$DATA" ]; then mkdir -p "$SCRATCH/repo/shared" && cp -r "$DATA" "$SCRATCH/repo/shared/data"; fi
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$VENV/bin/python" -m venv "$SCRATCH/py"
# the device machine's packages: .venv's (torch, triton, numpy, setuptools...) ahead of the scratch venv's own,
# without .venv's cem_fast (its editable finder module has the name the scratch install's finder has)
mkdir -p "$SCRATCH/site"
for entry in "$SITE"/*; do
  case "$(basename "$entry")" in *cem_fast*) ;; *) ln -s "$entry" "$SCRATCH/site/" ;; esac
done
export PYTHONPATH="$SCRATCH/site" PATH="$SCRATCH/py/bin:$VENV/bin:$PATH" PYTHON="$SCRATCH/py/bin/python"
export CEM_FAST_BENCH_SIZE=ci GPU_CHECK_BENCH_ARGS="--benchmark-min-rounds=1 --benchmark-max-time=0.05"
unset CEM_FAST_SHARED_DATA
cd "$SCRATCH/repo"
rc=0
bash benchmarks/gpu_check.sh "$SCRATCH/out" > "$SCRATCH/stdout.txt" 2>&1 || rc=$?
fail() {
  echo "gpu rehearsal: FAILED: $*"
  grep -E "^(==|install exit|installed|WARNING|torch |triton)|passed|failed|error" "$SCRATCH/out/log.txt" 2>/dev/null \
    || tail -40 "$SCRATCH/stdout.txt"
  tail -5 "$SCRATCH/out/build.log" 2>/dev/null
  exit 1
}
[ "$rc" -eq 0 ] || fail "gpu_check.sh exited $rc"
for f in log.txt build.log bench_ops.json bench_cem.json summary.md profile.txt; do
  [ -s "$SCRATCH/out/$f" ] || fail "$f is missing or empty"
done
n=$(find "$SCRATCH/out" -type f | wc -l)
[ "$n" -le 8 ] || fail "$n result files; the device tool brings back at most 8"
[ -z "$(find "$SCRATCH/out" -mindepth 2 -type f)" ] || fail "result files must lie in the output folder itself"
log="$SCRATCH/out/log.txt"
grep -q "^install exit 0 " "$log" || fail "the editable install (and build) failed (build.log)"
grep -q "^installed: cem_fast._C and cem_fast._kernels import" "$log" || fail "the installed package does not import"
grep -q "^cem_fast .* from $SCRATCH/repo" "$log" || fail "cem_fast was not imported from the scratch copy"
grep -Eq "[0-9]+ passed" "$log" || fail "no test summary"
if grep -Eq "[0-9]+ (failed|errors?)" "$log"; then fail "tests failed"; fi
grep -q "^done in " "$log" || fail "the script did not reach its end"
echo "gpu rehearsal: gpu_check.sh ran end to end on the CPU ($(grep -E '[0-9]+ passed' "$log" | head -1 | \
  sed 's/^ *//'); $n result files; $(grep '^done in' "$log"))"
