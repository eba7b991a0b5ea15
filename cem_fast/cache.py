"""Crash-safe, content-addressed store of per-intervention ROI PSNRs, so an interrupted run resumes.

An entry's key hashes everything that determines its samples: the model (class, repr and weights), the clean
image and the degraded input, the task, ROI, block, patch bank, seed and sampling plan, and ``CACHE_FORMAT``;
not the backend or the batch size. Scores are written after every batch as a chunk file
``<stage>/<start:09d>-<count:06d>.npz`` (temporary file, flush, fsync, rename), so a kill at any moment leaves
only whole chunks. The ranks of a distributed study (:mod:`cem_fast.distributed`) write disjoint row ranges of a
stage into one entry, so their chunk names never collide, and a run with another number of ranks reads them as
any other chunks (rows, not ranks).

A chunk is an uncompressed ``.npz`` (no pickles) that says what it holds: ``scores`` (count, width) float64,
``ids`` (count,) int64, the intervention ids of its rows, ``run_key``, the key of the run it belongs to, and
``sha256``, the hex digest of the run key, stage, start, count, width, ids and scores. :meth:`RunCache.load`
uses a chunk only if it reads, it belongs to this entry's run, its digest matches, and its ids are the stage's
ids at its place; any other chunk (a flipped bit, a truncated file, two chunks of one size swapped, a chunk of
another plan, or one copied from another run's entry: the ids do not depend on the seed, so only the key tells a
seed-1 chunk from a seed-0 one) is deleted, so it is recomputed, and named with the reason in
``RunCache.dropped``. Files of other formats (the ``.npy`` chunks of format 2) are never read.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from .checks import first_line
from .fileio import atomic_write

CACHE_FORMAT = 4  # bump when the meaning or the layout of cached samples changes (3: checksummed .npz chunks;
# 4: each chunk bound to its run's key)
_CHUNK = re.compile(r"^(\d+)-(\d+)\.npz$")
_CHUNK_ARRAYS = {"scores", "ids", "run_key", "sha256"}


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


def _as_ids(ids: Any) -> np.ndarray:
    """Intervention ids as a 1-D int64 numpy array; a torch tensor (on any device) is accepted."""
    if hasattr(ids, "detach"):
        ids = ids.detach().cpu()
    arr = np.asarray(ids)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        # a float or 2-D array here is a caller bug; casting it would checksum the wrong ids
        raise ValueError(f"ids must be a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _chunk_digest(key: str, stage: str, start: int, scores: np.ndarray, ids: np.ndarray) -> str:
    # fixed byte order, so a digest means the same on every machine; the run's key, stage and start are hashed
    # too, so a chunk copied from another run, renamed to another place or moved to another stage fails even if
    # its ids were to match there
    count, width = scores.shape
    return digest_bytes(key.encode(), stage.encode(), np.array([start, count, width], "<i8").tobytes(),
                        ids.astype("<i8").tobytes(), scores.astype("<f8").tobytes())


class RunCache:
    """One run's entry under ``root/<key>/``. ``dropped`` lists the chunks :meth:`load` deleted and why
    (``"coarse/000000000-000008.npz: checksum mismatch"``), for the run's summary. The constructor raises
    OSError when the entry cannot be made; once a chunk cannot be written or the entry read (a full disk, a
    read-only mount), ``failed`` says why, one warning is given, and the run goes on without the cache."""

    def __init__(self, root: "str | os.PathLike", key: str, components: dict[str, Any], fresh: bool = False):
        self.dir = Path(root) / key
        self.key = key
        self.dropped: list[str] = []
        self.failed: Optional[str] = None
        if fresh and self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "meta.json"
        if not meta.exists():
            text = json.dumps({"format": CACHE_FORMAT, **components}, indent=2, sort_keys=True, default=str)
            atomic_write(meta, lambda f: f.write(text.encode()))

    def load(self, stage: str, n: int, width: int, ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """(scores (n, width) float64, done (n,) bool) from the stage's chunks. ``ids``: the (n,) intervention
        ids of the stage in order (numpy or torch). A chunk that does not verify is deleted and recorded in
        ``self.dropped``; its rows stay not done."""
        ids = _as_ids(ids)
        if ids.shape != (n,):
            raise ValueError(f"ids must have one id per intervention: shape {ids.shape}, expected ({n},)")
        scores = np.full((n, width), np.nan)
        done = np.zeros(n, dtype=bool)
        folder = self.dir / stage
        try:
            chunks = sorted(folder.iterdir()) if folder.is_dir() and not self.failed else []
        except OSError as e:  # an entry that cannot be listed: its rows are computed again
            self._fail(f"{stage}/ cannot be read", e)
            chunks = []
        for f in chunks:
            m = _CHUNK.match(f.name)
            if not m:
                continue  # temporaries, and chunks of older formats (.npy): never read
            if not f.is_file() or f.is_symlink():  # a pipe would block the run, a folder or link is not ours
                self.dropped.append(f"{stage}/{f.name}: not a regular file")
                if f.is_dir() and not f.is_symlink():
                    shutil.rmtree(f, ignore_errors=True)
                else:
                    f.unlink(missing_ok=True)
                continue
            start, count = int(m.group(1)), int(m.group(2))
            try:
                arr, chunk_ids = self._read_chunk(f, self.key, stage, start, count, n, width, ids)
            except Exception as e:  # noqa: BLE001 - whatever is wrong with a chunk, it is recomputed
                try:
                    f.unlink(missing_ok=True)  # so that its recomputed rows can take its name
                except OSError:
                    pass  # a read-only cache: the chunk is not used either way, and is overwritten if it can be
                self.dropped.append(f"{stage}/{f.name}: {_reason(e)}")
                continue
            scores[start:start + count] = arr
            done[start:start + count] = True
        return scores, done

    @staticmethod
    def _read_chunk(f: Path, key: str, stage: str, start: int, count: int, n: int, width: int,
                    ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The chunk's (scores, ids) if it verifies; raises _Bad (or whatever reading raised) otherwise."""
        if start + count > n:
            raise _Bad(f"rows {start}..{start + count} lie beyond the stage's {n} interventions")
        z = np.load(f, allow_pickle=False)
        if not hasattr(z, "files"):  # a plain .npy under a chunk name
            raise _Bad("not an .npz archive")
        with z:
            missing = _CHUNK_ARRAYS - set(z.files)
            if missing:
                raise _Bad(f"missing arrays {sorted(missing)}")
            arr, chunk_ids, chunk_key, sha = z["scores"], z["ids"], z["run_key"], z["sha256"]
        if arr.dtype != np.float64 or arr.shape != (count, width):
            raise _Bad(f"scores are {arr.dtype} {arr.shape}, expected float64 ({count}, {width})")
        if chunk_ids.dtype != np.int64 or chunk_ids.shape != (count,):
            raise _Bad(f"ids are {chunk_ids.dtype} {chunk_ids.shape}, expected int64 ({count},)")
        if chunk_key.shape != () or chunk_key.dtype.kind != "U" or str(chunk_key) != key:
            raise _Bad(f"belongs to another run (its cache key is {str(chunk_key)[:64]!r}, this entry's {key!r})")
        if sha.shape != () or sha.dtype.kind != "U" or str(sha) != _chunk_digest(key, stage, start, arr, chunk_ids):
            raise _Bad("checksum mismatch")
        if not np.array_equal(chunk_ids, ids[start:start + count]):
            raise _Bad("ids do not match the stage's interventions at its rows")
        return arr, chunk_ids

    def save(self, stage: str, start: int, scores: np.ndarray, ids: Any) -> None:
        """Write rows ``start .. start + len(scores)`` of ``stage``. ``ids``: the rows' intervention ids
        (len(scores),), or the stage's whole (n,) ids, of which ``ids[start:start + len(scores)]`` is taken."""
        arr = np.ascontiguousarray(scores, dtype=np.float64)
        if arr.ndim != 2:
            raise ValueError(f"scores must be (count, width), got shape {arr.shape}")
        count = arr.shape[0]
        ids = _as_ids(ids)
        if len(ids) != count:  # the stage's ids: cut out this chunk's rows
            if len(ids) < start + count:
                raise ValueError(f"{len(ids)} ids for rows {start}..{start + count}")
            ids = ids[start:start + count]
        ids = np.ascontiguousarray(ids)
        if self.failed:
            return
        sha = np.array(_chunk_digest(self.key, stage, start, arr, ids))
        name = f"{stage}/{start:09d}-{count:06d}.npz"
        try:
            atomic_write(self.dir / name,
                         lambda f: np.savez(f, scores=arr, ids=ids, run_key=np.array(self.key), sha256=sha))
        except OSError as e:  # the samples are in memory: the run goes on, only a crash would lose them
            self._fail(f"{name} cannot be written", e)

    def _fail(self, what: str, err: OSError) -> None:
        self.failed = f"{what} ({first_line(err)})"
        warnings.warn(f"sample cache {str(self.dir)!r}: {self.failed}; the run goes on without the cache",
                      stacklevel=3)


class _Bad(ValueError):
    """A chunk that reads but does not verify."""


def _reason(e: BaseException) -> str:
    # one line for summary.json: our own reasons as they are, a reading error with its type
    if isinstance(e, _Bad):
        return str(e)
    detail = first_line(e) if str(e).strip() else ""
    return f"unreadable ({type(e).__name__}{': ' + detail if detail else ''})"


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
