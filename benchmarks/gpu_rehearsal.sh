#!/usr/bin/env bash
# Rehearse benchmarks/gpu_check.sh on this CPU machine: everything but CUDA execution, under the same deadline
# (GPU_CHECK_BUDGET_S, default 520). A scratch copy of the tree as the device tool sends it (tracked and
# untracked-not-ignored files, the data as ./shared/data), a scratch interpreter standing for the device machine's
# python3 (it sees the packages of .venv, as that machine has its own, but not .venv's cem_fast), then the script
# itself. Fails when the script fails, overruns its budget (30 s of slack; the set-up here is not counted), a step
# fails (tests included), a file it must bring back is missing or misnamed, or the install failed; steps skipped or
# interrupted by the deadline are listed, not failures. `make gpu-rehearsal`; CI runs it. GPU_REHEARSAL_KEEP=DIR
# keeps the result files.
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
BUDGET="${GPU_CHECK_BUDGET_S:-520}"
rc=0
t0=$SECONDS
bash benchmarks/gpu_check.sh "$SCRATCH/out" > "$SCRATCH/stdout.txt" 2>&1 || rc=$?
took=$((SECONDS - t0))
log="$(ls "$SCRATCH"/out/*-log.txt 2>/dev/null | head -1)"
summary="$(ls "$SCRATCH"/out/*-summary.md 2>/dev/null | head -1)"
fail() {
  echo "gpu rehearsal: FAILED: $*"
  [ -n "$summary" ] && cat "$summary"
  sed -n '/^== the log in short/,$p' "${log:-/dev/null}" 2>/dev/null | tail -40 || tail -40 "$SCRATCH/stdout.txt"
  [ -n "$log" ] || tail -40 "$SCRATCH/stdout.txt"
  tail -5 "$SCRATCH"/out/*-build.log 2>/dev/null
  exit 1
}
[ "$rc" -eq 0 ] || fail "gpu_check.sh exited $rc"
[ -s "$log" ] || fail "no <device>-<date>-log.txt"
[ -s "$summary" ] || fail "no <device>-<date>-summary.md"
# the deadline: the script's own time (the scratch copy and interpreter above are set-up), 30 s of slack for a
# step's kill grace and the summary
[ "$took" -le $((BUDGET + 30)) ] || fail "gpu_check.sh took ${took}s, over its budget of ${BUDGET}s"
n=$(find "$SCRATCH/out" -type f | wc -l)
[ "$n" -le 8 ] || fail "$n result files; the device tool brings back at most 8"
[ -z "$(find "$SCRATCH/out" -mindepth 2 -type f)" ] || fail "result files must lie in the output folder itself"
bad="$(ls "$SCRATCH/out" | grep -vE '^[a-z0-9-]+-[0-9]{4}-[0-9]{2}-[0-9]{2}-[a-z_]+\.[a-z.]+$' || true)"
[ -z "$bad" ] || fail "result files not named <device>-<date>-*: $bad"
[ -s "$(ls "$SCRATCH"/out/*-build.log | head -1)" ] || fail "no build log"
if grep -q "^| build | ok" "$summary"; then  # (a budget too small for the build interrupts it: listed, not failed)
  grep -q "^install exit 0 " "$log" || fail "the editable install (and build) failed (build.log)"
  grep -q "^installed: cem_fast._C and cem_fast._kernels import" "$log" || fail "the installed package does not import"
  grep -q "^cem_fast .* from $SCRATCH/repo" "$log" || fail "cem_fast was not imported from the scratch copy"
fi
if grep -q "| FAILED" "$summary"; then fail "a step failed: $(grep '| FAILED' "$summary" | tr '\n' ' ')"; fi
# a step that ran to its end left its files
if grep -q "^| cem | ok" "$summary"; then ls "$SCRATCH"/out/*-bench_cem.json >/dev/null || fail "cem ran, no bench_cem.json"; fi
if grep -q "^| opsbench | ok" "$summary"; then ls "$SCRATCH"/out/*-bench_ops.json >/dev/null || fail "no bench_ops.json"; fi
if grep -q "^| profile | ok" "$summary"; then ls "$SCRATCH"/out/*-profile.txt >/dev/null || fail "no profile.txt"; fi
grep -q "^done in " "$log" || fail "the script did not reach its end"
echo "gpu rehearsal: gpu_check.sh ran to its deadline on the CPU in ${took}s (budget ${BUDGET}s; $n result files):"
sed -n '/^| step/,/^$/p' "$summary"
if [ -n "${GPU_REHEARSAL_KEEP:-}" ]; then mkdir -p "$GPU_REHEARSAL_KEEP" && cp "$SCRATCH"/out/* "$GPU_REHEARSAL_KEEP"/; fi
