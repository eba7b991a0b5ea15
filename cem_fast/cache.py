"""Crash-safe, content-addressed store of per-intervention ROI PSNRs, so an interrupted run resumes.

An entry's key hashes everything that determines its samples: the model (class, repr and weights), the clean
image and the degraded input, the task, ROI, block, patch bank, seed and sampling plan, and ``CACHE_FORMAT``;
not the backend or the batch size. Scores are written after every batch as a chunk file
``<stage>/<start>-<count>.npy`` (temporary file, flush, fsync, rename), so a kill at any moment leaves only
whole chunks. A chunk that cannot be read is dropped and recomputed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from .fileio import atomic_write

CACHE_FORMAT = 2  # bump when the meaning of cached samples changes
_CHUNK = re.compile(r"^(\d+)-(\d+)\.npy$")


def digest_bytes(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def run_key(components: dict[str, Any]) -> str:
    """Stable key of a run from JSON-able components."""
    text = json.dumps({"format": CACHE_FORMAT, **components}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class RunCache:
    """One run's entry under ``root/<key>/``."""

    def __init__(self, root: "str | os.PathLike", key: str, components: dict[str, Any], fresh: bool = False):
        self.dir = Path(root) / key
        if fresh and self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "meta.json"
        if not meta.exists():
            text = json.dumps({"format": CACHE_FORMAT, **components}, indent=2, sort_keys=True, default=str)
            atomic_write(meta, lambda f: f.write(text.encode()))

    def load(self, stage: str, n: int, width: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(scores (n, width) float64, done (n,) bool) from the stage's chunks; unreadable chunks are removed."""
        scores = np.full((n, width), np.nan)
        done = np.zeros(n, dtype=bool)
        folder = self.dir / stage
        if not folder.is_dir():
            return scores, done
        for f in sorted(folder.iterdir()):
            m = _CHUNK.match(f.name)
            if not m:
                continue
            start, count = int(m.group(1)), int(m.group(2))
            try:
                arr = np.load(f, allow_pickle=False)
                if arr.shape != (count, width) or arr.dtype != np.float64 or start + count > n:
                    raise ValueError("chunk shape does not match its name")
            except Exception:
                f.unlink(missing_ok=True)  # a damaged chunk is recomputed
                continue
            scores[start:start + count] = arr
            done[start:start + count] = True
        return scores, done

    def save(self, stage: str, start: int, scores: np.ndarray) -> None:
        arr = np.ascontiguousarray(scores, dtype=np.float64)
        atomic_write(self.dir / stage / f"{start:09d}-{len(scores):06d}.npy",
                     lambda f: np.save(f, arr, allow_pickle=False))

    def get_value(self, name: str) -> Optional[float]:
        p = self.dir / f"{name}.json"
        try:
            return float(json.loads(p.read_text())["value"])
        except Exception:
            return None

    def put_value(self, name: str, value: float) -> None:
        text = json.dumps({"value": repr(float(value))})
        atomic_write(self.dir / f"{name}.json", lambda f: f.write(text.encode()))


def missing_ranges(done: np.ndarray, batch: int) -> Iterator[tuple[int, int]]:
    """(start, end) batches covering the entries not yet done, each at most ``batch`` long."""
    n = len(done)
    i = 0
    while i < n:
        if done[i]:
            i += 1
            continue
        j = i
        while j < n and not done[j] and j - i < batch:
            j += 1
        yield i, j
        i = j
