"""Every op on every backend that runs here, fuzzed with hostile calls (fuzz_ops.py, beside this file) in a
subprocess each, so a crash fails the test with the call that caused it. Budget: CEM_FAST_FUZZ_EXAMPLES examples per
op (``make fuzz`` runs 2,000; ``make sanitize`` runs them under AddressSanitizer and UndefinedBehaviorSanitizer)."""
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
EXAMPLES = int(os.environ.get("CEM_FAST_FUZZ_EXAMPLES", "60"))


@pytest.mark.parametrize("op", ["intervene", "roi"])
def test_every_backend_refuses_alike_or_agrees(op, tmp_path):
    fuzz_seed = int(os.environ.get("CEM_FAST_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
    last = tmp_path / "last_example.txt"
    env = {**os.environ, "FUZZ_LAST": str(last), "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parents[1])])}
    proc = subprocess.run([sys.executable, str(HERE / "fuzz_ops.py"), op, str(EXAMPLES), str(fuzz_seed)], env=env,
                          capture_output=True, text=True, timeout=1500)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    if proc.returncode < 0 or proc.returncode in (134, 139):  # a signal: a crash or a sanitizer's abort
        name = signal.Signals(-proc.returncode).name if proc.returncode < 0 else f"exit {proc.returncode}"
        pytest.fail(f"the fuzz run crashed ({name}, seed {fuzz_seed}) on:\n"
                    f"{last.read_text() if last.exists() else '?'}\n{tail}")
    assert proc.returncode == 0, f"seed {fuzz_seed} (CEM_FAST_FUZZ_SEED reruns it):\n{tail}"
    assert "passed" in proc.stdout
