"""Crash-safe file writes (cem_fast/fileio.py): a failed write leaves no temporary, and the temporaries of killed
writers are cleaned, never those of live ones or other people's files."""
import os
import subprocess
import sys
import time

import pytest

from cem_fast.fileio import atomic_write


def test_a_failed_write_leaves_no_temporary(tmp_path):
    target = tmp_path / "result.npz"
    target.write_bytes(b"old")

    def disk_full(f):
        f.write(b"half a fi")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, disk_full)
    assert os.listdir(tmp_path) == ["result.npz"] and target.read_bytes() == b"old"
    with pytest.raises(OSError):
        atomic_write(tmp_path / "new.json", disk_full)
    assert os.listdir(tmp_path) == ["result.npz"]


def test_stale_temporaries_are_cleaned(tmp_path):
    from cem_fast.fileio import clean_stale_temporaries
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # reaped: its pid names no process now
    dead, me = p.pid, os.getpid()
    (tmp_path / "im" / ".cem_cache" / "k" / "coarse").mkdir(parents=True)
    stale = [tmp_path / f".result.npz.tmp{dead}",  # writer killed
             tmp_path / "im" / ".cem_cache" / "k" / "coarse" / f".000000000-000008.npz.tmp{dead}",  # deep
             tmp_path / "im" / f".cem.png.tmp{me}"]  # a live pid, but untouched for two hours: pid reused
    kept = [tmp_path / f".summary.json.tmp{me}",  # being written right now
            tmp_path / "im" / "notes.tmp123",  # not one of ours: no leading dot
            tmp_path / "im" / "result.npz"]
    for f in stale + kept:
        f.write_bytes(b"x")
    two_hours_ago = time.time() - 7200
    os.utime(stale[2], (two_hours_ago, two_hours_ago))
    assert clean_stale_temporaries(tmp_path) == 3
    assert not any(f.exists() for f in stale) and all(f.exists() for f in kept)
    assert clean_stale_temporaries(tmp_path) == 0
