"""A causal field's folder: every chunk's samples written as it finishes, checked when read, resumed after a kill.

    OUT/field.json           what the field is: its key and the inputs the key was made of, the tiles, the chunks
    OUT/chunks/s<S>_<i>.npz  chunk i of the S-block chunks: its (tile, block) pairs and their samples, with a
                             SHA-256 over the field's key, the chunk's blocks and every array

Each file is written whole or not at all (:func:`cem_fast.fileio.atomic_write`). A chunk is reused only when its
digest checks and it holds exactly the blocks the field expects for it; anything else (a partial, corrupt or
foreign file) is recomputed, and counted in ``dropped``. A folder holding another field (another key) is refused
unless ``fresh``: one field's results never overwrite another's.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .fileio import atomic_write, clean_stale_temporaries
from .jsonsafe import json_safe
from .pipeline.field_pass import ChunkSamples

FIELD_FORMAT = 1
META = "field.json"
CHUNKS = "chunks"


def chunk_digest(key: str, index: int, blocks: np.ndarray, arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(f"cem_fast field chunk v{FIELD_FORMAT}\0{key}\0{index}\0".encode())
    for name, a in (("chunk_blocks", blocks), *sorted(arrays.items())):
        a = np.ascontiguousarray(a)
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class FieldStore:
    """The folder ``out`` of the field with key ``key`` (see the module docstring); ``components``: what the key
    was made of, written for people and for the error that names what changed."""

    def __init__(self, out: "str | os.PathLike", key: str, components: dict[str, Any], fresh: bool = False,
                 write: bool = True):
        self.dir, self.key, self.write = Path(out), key, write
        self.dropped = 0
        meta = self.dir / META
        if self.dir.exists() and not self.dir.is_dir():
            raise ValueError(f"out {str(self.dir)!r} is a file, expected a folder")
        if meta.exists() and not fresh:
            old = read_meta(meta)
            if old.get("key") != key:
                changed = sorted(k for k in set(components) | set(old.get("components", {}))
                                 if json_safe(components.get(k)) != old.get("components", {}).get(k))
                raise ValueError(f"out {str(self.dir)!r} holds another field (its inputs differ in: "
                                 f"{', '.join(changed) or 'the format'}): give another folder, or fresh=True "
                                 "(--fresh) to replace it")
        elif self.dir.exists() and any(p.name != CHUNKS for p in self.dir.iterdir()) and not fresh:
            raise ValueError(f"out {str(self.dir)!r} is not empty and holds no field: give a new or empty folder")
        if not write:
            return
        if fresh and (self.dir / CHUNKS).exists():
            shutil.rmtree(self.dir / CHUNKS)
        (self.dir / CHUNKS).mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(self.dir / CHUNKS)
        self.save_meta({"format": FIELD_FORMAT, "key": key, "components": json_safe(components),
                        "status": "running"})

    def save_meta(self, meta: dict[str, Any]) -> None:
        if self.write:
            text = json.dumps(json_safe(meta), indent=1, sort_keys=True).encode()
            atomic_write(self.dir / META, lambda f: f.write(text))

    def meta(self) -> dict[str, Any]:
        return read_meta(self.dir / META)

    def _path(self, side: int, index: int) -> Path:
        return self.dir / CHUNKS / f"s{side}_{index:06d}.npz"

    def save(self, side: int, index: int, blocks: np.ndarray, chunk: ChunkSamples) -> None:
        if not self.write:
            return
        arrays = chunk.arrays()
        digest = chunk_digest(self.key, index, blocks, arrays)
        atomic_write(self._path(side, index), lambda f: np.savez(f, chunk_blocks=blocks, forwards=np.int64(
            chunk.forwards), digest=np.array(digest), **arrays))

    def _read(self, side: int, index: int) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
        """Chunk ``index``'s blocks, arrays and forwards, its digest checked; ValueError (one line) where the file
        does not read (missing, truncated, not a zip, an array missing) or changed since it was written."""
        path = self._path(side, index)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ChunkSamples.ARRAYS}
                blocks, digest, forwards = z["chunk_blocks"], str(z["digest"]), int(z["forwards"])
        except Exception as e:
            raise ValueError(f"field chunk {path} does not read ({type(e).__name__})") from None
        if digest != chunk_digest(self.key, index, blocks, arrays):
            raise ValueError(f"field chunk {path} changed since it was written (its digest does not check)")
        return blocks, arrays, forwards

    def load(self, side: int, index: int, blocks: np.ndarray) -> Optional[ChunkSamples]:
        """Chunk ``index`` when its file is there, checks and holds ``blocks``; else None (recompute it)."""
        if not self._path(side, index).exists():
            return None
        try:
            held, arrays, forwards = self._read(side, index)
        except ValueError:  # recomputed
            held = None
        if held is None or not np.array_equal(held, blocks):
            self.dropped += 1
            return None
        return ChunkSamples(**arrays, forwards=forwards)

    def samples_of(self, side: int, indices: list[int], tile: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(blocks, coarse, fine) of ``tile``'s pairs in the chunks ``indices`` (their files, checked)."""
        parts = []
        for i in indices:
            try:
                _, arrays, _ = self._read(side, i)
            except ValueError as e:
                raise ValueError(f"{e}: run the field again to recompute it") from None
            keep = arrays["tiles"] == tile
            parts.append((arrays["blocks"][keep], arrays["coarse"][keep], arrays["fine"][keep]))
        return tuple(np.concatenate(a) for a in zip(*parts))  # type: ignore[return-value]


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read as a field's description ({e}): give another folder, or "
                         "fresh=True (--fresh) to replace it") from None
    if not isinstance(meta, dict) or meta.get("format") != FIELD_FORMAT:
        raise ValueError(f"{path} is not a cem_fast field of format {FIELD_FORMAT}: give another folder, or "
                         "fresh=True (--fresh) to replace it")
    return meta
