"""Crash-safe file writes, shared by results, pictures, reports, patch banks and the sample cache.

:func:`atomic_write` writes ``.<name>.tmp<pid>`` beside the target and renames it over the target. A failed
write removes its temporary; a killed process cannot, so :func:`clean_stale_temporaries` removes those left by
processes that no longer run.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import BinaryIO, Callable

_TEMPORARY = re.compile(r"^\..+\.tmp(\d+)$")  # the names atomic_write gives its temporaries


def atomic_write(path: "str | os.PathLike", write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write`` on a temporary file beside ``path``, flush and fsync it, then rename it over ``path``: a
    crash leaves the old file or the new one, never half of one. The temporary name starts with a dot. If
    anything fails (``write`` raising, a full disk, an interrupt), the temporary is removed and the error
    raised again."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # BaseException: a KeyboardInterrupt mid-write must not leave a half file behind either
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the original error matters more than a temporary we could not remove
        raise
    return path


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (conservatively: True when unsure)."""
    if pid <= 0:
        return False  # no writer has such a pid; and os.kill(0, 0) would signal our own process group
    if os.name == "nt":
        return True  # os.kill(pid, 0) terminates the process on Windows: rely on the age rule there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # PermissionError: it exists, owned by someone else
    return True


def clean_stale_temporaries(folder: "str | os.PathLike", ours: "re.Pattern | None" = None,
                            max_age_s: float = 3600.0) -> int:
    """Remove the temporaries of :func:`atomic_write` under ``folder`` (recursively) that no write will finish:
    those whose process is gone, and any older than ``max_age_s`` (a write updates its file's time, and the
    pid may have been reused by another process). ``ours``: only temporaries whose names it matches (the files
    the caller writes: a user's own ``.notes.txt.tmp123`` under the folder is left alone). Returns how many were
    removed."""
    removed = 0
    now = time.time()
    for root, _dirs, files in os.walk(folder):
        for name in files:
            m = _TEMPORARY.match(name)
            if not m or (ours is not None and not ours.match(name)):
                continue  # not a temporary, or one of a file that is not ours: never touched
            p = os.path.join(root, name)
            try:
                old = now - os.lstat(p).st_mtime > max_age_s
                if old or not _alive(int(m.group(1))):
                    os.unlink(p)
                    removed += 1
            except OSError:
                continue  # gone meanwhile (its writer renamed it) or not ours to remove
    return removed


def clean_stale_folders(folder: "str | os.PathLike", ours: "re.Pattern", max_age_s: float = 3600.0) -> int:
    """Remove the folders under ``folder`` (recursively) whose names ``ours`` matches, its group 1 being the pid of
    the process that made them (staging folders of results being written), when that process is gone or the
    folder is older than ``max_age_s``. Returns how many were removed."""
    removed = 0
    now = time.time()
    for root, dirs, _files in os.walk(folder):
        for name in list(dirs):
            m = ours.match(name)
            if not m:
                continue
            p = os.path.join(root, name)
            try:
                if now - os.lstat(p).st_mtime > max_age_s or not _alive(int(m.group(1))):
                    shutil.rmtree(p)
                    dirs.remove(name)  # gone: not walked into
                    removed += 1
            except OSError:
                continue
    return removed
