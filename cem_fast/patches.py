"""Patch banks: the natural patches that replace a block's clean content.

* :meth:`PatchBank.from_folder` loads a folder of patch images in RGB order (the reference's DIV2K bank has
  10,000 8x8 PNGs) and caches the stacked array in the user's cache (``CEM_FAST_CACHE`` or
  ``~/.cache/cem_fast``), keyed by the files' names and bytes. The key is stored in the cached file and
  checked on load. A folder whose files have not changed in the last seconds is not read again: its content key
  is remembered by each file's size, mtime, ctime, inode and device (ctime cannot be set back, so a patch
  rewritten with its old size and mtime is not served stale); a settled folder's listing is remembered by the
  folder's own figures, so a warm call stats every patch but lists nothing. Each call gets its own copy of a bank
  kept in this process (what a caller writes into it never reaches the next call). The cache is optional: where
  it cannot be written, banks are built without it (one warning).
* :meth:`PatchBank.build` crops random patches from a folder of images and records their sharpness.
* :meth:`PatchBank.default` is the bank shipped in the package (CC0 / public-domain images, see
  ``cem_fast/data/LICENSES.md``).
"""
from __future__ import annotations

import hashlib
import io
import os
import struct
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from operator import attrgetter
from pathlib import Path
from stat import S_ISREG
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from . import _extension
from .checks import first_line
from .fileio import atomic_write

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
_SUFFIX_TUPLE = tuple(IMAGE_SUFFIXES)  # str.endswith takes a tuple: the listing of 10,000 names in half the time


def cache_dir() -> Path:
    return Path(os.environ.get("CEM_FAST_CACHE", Path.home() / ".cache" / "cem_fast"))


def sharpness(patch_rgb: np.ndarray) -> float:
    """``sqrt((sum|dx|)^2 + (sum|dy|)^2)`` of the grey patch (0..255), as the reference names its patches."""
    grey = np.asarray(Image.fromarray(patch_rgb.astype(np.uint8)).convert("L"), dtype=np.float64)
    dx = np.abs(np.diff(grey, axis=1)).sum()
    dy = np.abs(np.diff(grey, axis=0)).sum()
    return float(np.sqrt(dx * dx + dy * dy))


@dataclass
class PatchBank:
    """``patches``: (P, 3, pb, pb) uint8 RGB; ``names``: one per patch; ``source``: where it came from."""

    patches: torch.Tensor
    names: list[str] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        p = self.patches
        if p.dim() != 4 or p.shape[1] != 3 or p.shape[2] != p.shape[3] or p.dtype != torch.uint8:
            raise ValueError(f"patch bank must be (P, 3, pb, pb) uint8, got {tuple(p.shape)} {p.dtype}")
        if p.shape[0] == 0:
            raise ValueError(f"patch bank {self.source or ''} is empty: expected at least one patch")

    def __len__(self) -> int:
        return self.patches.shape[0]

    @property
    def patch_size(self) -> int:
        return self.patches.shape[-1]

    def digest(self) -> str:
        """Content hash of the patches (for caches and summaries)."""
        return hashlib.sha256(self.patches.contiguous().numpy().tobytes()).hexdigest()[:16]

    def sample(self, generator: torch.Generator, shape: Sequence[int]) -> torch.Tensor:
        """Patch indices drawn uniformly with replacement, int64 of ``shape``."""
        return torch.randint(len(self), tuple(shape), generator=generator)

    @classmethod
    def from_folder(cls, folder: "str | os.PathLike", use_cache: bool = True) -> "PatchBank":
        return cls._from_folder(folder, use_cache)[0]

    @classmethod
    def _from_folder(cls, folder: "str | os.PathLike", use_cache: bool = True) -> "tuple[PatchBank, Optional[str]]":
        """The folder's bank and, when it was kept in this process, its :meth:`digest` (else None)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"patch folder {str(folder)!r} does not exist or is not a folder")
        names, rows = _patch_files(folder)
        if not names:
            raise ValueError(f"patch folder {str(folder)!r} holds no images (expected .png/.jpg patches)")
        stat_key = _settled_stat_key(folder, names, rows) if use_cache else None
        if stat_key is not None:
            known = _bank_by_stat(stat_key, str(folder))
            if known is not None:
                return known
        # keyed by content: names and bytes (with lengths, so no two file lists share a key). The bytes read
        # here are the ones decoded below, so a file changed meanwhile cannot be cached under the old key.
        h = hashlib.sha256(b"cem_fast patch bank v2\n")
        datas = []
        for name in names:
            try:
                data = (folder / name).read_bytes()
            except OSError as err:
                raise ValueError(f"patch {str(folder / name)!r} cannot be read: {err}") from None
            datas.append(data)
            for part in (name.encode(), data):
                h.update(len(part).to_bytes(8, "little"))
                h.update(part)
        key = h.hexdigest()
        cache = _cached_bank_path(key)
        if use_cache:
            cached = _cached_bank(key, str(folder))
            if cached is not None:
                return _remember(stat_key, key, cached), None
        arrays, size = [], None
        for name, data in zip(names, datas):
            try:
                a = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            except Exception as err:
                raise ValueError(f"patch {str(folder / name)!r} cannot be read as an image: {err}") from None
            if size is None:
                size = a.shape[:2]
            if a.shape[:2] != size or size[0] != size[1]:
                raise ValueError(f"patch {name} is {a.shape[0]}x{a.shape[1]}: expected square patches of one "
                                 f"size ({size[0]}x{size[1]} like the first)")
            arrays.append(a)
        patches = np.stack(arrays).transpose(0, 3, 1, 2).copy()
        bank = cls(torch.from_numpy(patches), list(names), str(folder))
        if use_cache:
            try:
                _atomic_savez(cache, patches=patches, names=np.array(bank.names), key=np.array(key))
            except OSError as err:  # read-only or full cache, or none can be made: the bank is fine without
                _warn_cache_once(cache.parent, err)
            _remember(stat_key, key, bank)
        return bank, None

    @classmethod
    def build(cls, images: Sequence["str | os.PathLike"], count: int, size: int = 8, seed: int = 0) -> "PatchBank":
        """``count`` random ``size x size`` crops spread evenly over ``images``, named like the reference's
        bank: ``<image>_<x>_<y>_sharpness-<s>.png``."""
        if count <= 0 or size <= 0:
            raise ValueError(f"count and size must be positive, got count={count}, size={size}")
        if not images:
            raise ValueError("images must name at least one image to crop patches from")
        rs = np.random.RandomState(seed)
        patches, names = [], []
        for i in range(count):
            path = Path(images[i % len(images)])
            img = np.asarray(Image.open(path).convert("RGB"))
            H, W = img.shape[:2]
            if H < size or W < size:
                raise ValueError(f"image {path.name} ({H}x{W}) is smaller than the patch size {size}")
            y, x = rs.randint(0, H - size + 1), rs.randint(0, W - size + 1)
            p = img[y:y + size, x:x + size]
            patches.append(p)
            names.append(f"{path.name}_{x}_{y}_sharpness-{sharpness(p):.1f}.png")
        arr = np.stack(patches).transpose(0, 3, 1, 2).copy()
        return cls(torch.from_numpy(arr), names, "built from " + ", ".join(Path(p).name for p in images))

    def save(self, path: "str | os.PathLike") -> None:
        _atomic_savez(Path(path), patches=self.patches.numpy(), names=np.array(self.names))

    @classmethod
    def load(cls, path: "str | os.PathLike") -> "PatchBank":
        """A bank written by :meth:`save`: arrays ``patches`` and (optionally) ``names``."""
        try:
            z = np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - not a file numpy reads, or one holding pickles
            raise ValueError(f"patch bank {str(path)!r} cannot be read as an .npz archive: {first_line(e)}") from None
        if not hasattr(z, "files"):  # a plain .npy array
            raise ValueError(f"patch bank {str(path)!r} is not an .npz archive (as written by PatchBank.save)")
        with z:
            if "patches" not in z.files:
                raise ValueError(f"patch bank {str(path)!r} has no array 'patches' (expected 'patches' and "
                                 f"'names', as written by PatchBank.save)")
            try:  # arrays are read here, lazily: an object (pickled) array is refused at this point
                names = [str(n) for n in z["names"]] if "names" in z.files else []
                patches = z["patches"]
            except ValueError as e:
                raise ValueError(f"patch bank {str(path)!r} holds an array that needs pickle, which is never loaded "
                                 f"({first_line(e)}); expected 'patches' uint8 and 'names' text") from None
            return cls(torch.from_numpy(patches), names, str(path))

    @classmethod
    def default(cls) -> "PatchBank":
        """The bank shipped in the package: 8x8 patches from CC0 / public-domain photographs."""
        with resources.as_file(resources.files("cem_fast") / "data" / "default_patches.npz") as p:
            bank = cls.load(p)
        bank.source = "cem_fast default bank (CC0 / public domain, see cem_fast/data/LICENSES.md)"
        return bank


# A folder's content key, remembered by what the file system says of each patch (name, size, mtime_ns, ctime_ns,
# inode, device) and of the folder's path: a warm call lists and stats the folder (milliseconds) instead of reading
# and hashing every file (which grows with the bank). Any change of those figures (a file rewritten, added,
# removed, renamed, replaced) gives another stat key, so the content is read and hashed again; ctime cannot be set
# back (utime sets mtime only), so a rewrite with its old mtime restored is seen too. Timestamps are coarse (a
# clock tick), so as git does with its index, a folder with a change in the last SETTLE_NS is never remembered:
# a rewrite within the same tick would keep every figure. In this process the bank itself is kept (a few banks at
# most); across processes the stat key names the content key, whose cached bank is loaded and checked against it.
_BANKS_BY_STAT: "dict[tuple[str, str], tuple[PatchBank, str]]" = {}  # (stat key, cache folder) -> (bank, digest)
SETTLE_NS = 2_000_000_000
# The stat of every patch is the cost of a warm call (one system call each); each is made relative
# to the open folder (no path walk per file), and the folder's listing itself is remembered in this process by the
# folder's own figures (device, inode, mtime_ns, ctime_ns): a name added, removed or renamed in it changes its
# mtime and ctime, so a remembered listing whose folder figures still hold is the listing. It is remembered, as
# the stat key, only once the folder settled. What each listed name is (a regular file, a link to one, a dangling
# link, something else) is asked of every name on every call.
_LISTINGS: "dict[str, tuple[tuple, list[str], list[bytes]]]" = {}  # real path -> (figures, names, as bytes)
LISTINGS_KEPT = 8
_DIR_FD = os.stat in os.supports_dir_fd and os.listdir in os.supports_fd and hasattr(os, "O_DIRECTORY")
_STAT_ROW = struct.Struct("<qqqQQ")  # size, mtime_ns, ctime_ns, inode, device


def _patch_files(folder: Path) -> "tuple[list[str], bytes]":
    """The folder's patch files in name order and their stat rows (:data:`_STAT_ROW` each): regular files (or links
    to them) named with an image suffix (a bare ".png" is a name without a suffix, as os.path.splitext reads it),
    never a pipe named like a patch (it would never finish reading)."""
    if not _DIR_FD:  # no stat relative to an open folder here: by path, and the listing is not remembered
        names = _patch_names(os.listdir(folder))
        return _regular(names, [os.path.join(folder, n) for n in names], os.stat)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        names, encoded = _listing(os.path.realpath(folder), fd)
        native = _native_stat_rows()
        if native is not None:  # one C loop over fstatat: half of what os.stat per name costs
            rows, kinds = native(fd, encoded)
            return _keep_regular(names, rows, kinds)
        return _regular(names, encoded, partial(os.stat, dir_fd=fd))
    finally:
        os.close(fd)


def _native_stat_rows():
    """``cem_fast._C.stat_rows`` when the extension is built, else None (the stats are then made in Python)."""
    return getattr(_extension._C, "stat_rows", None) if _extension._C is not None else None


def _keep_regular(names: list[str], rows: bytes, kinds: bytes) -> "tuple[list[str], bytes]":
    """The names the native stat found to be regular files (kind 0), and their rows."""
    if not any(kinds):
        return names, rows
    keep = [i for i, k in enumerate(kinds) if k == 0]
    table = np.frombuffer(rows, dtype=np.int64).reshape(-1, 5)[keep]
    return [names[i] for i in keep], table.tobytes()


def _patch_names(names) -> list[str]:
    """The names with an image suffix, sorted."""
    return sorted(n for n in names if n.lower().endswith(_SUFFIX_TUPLE) and (n[0] != "." or os.path.splitext(n)[1]))


def _listing(real: str, fd: int) -> "tuple[list[str], list[bytes]]":
    """The open folder's patch names, and as bytes (stat takes them without encoding each): remembered by the
    folder's figures (taken before it is listed, so a change during the listing is seen at the next call)."""
    st = os.stat(fd)
    figures = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
    kept = _LISTINGS.get(real)
    if kept is not None and kept[0] == figures:
        return kept[1], kept[2]
    names = _patch_names(os.listdir(fd))
    encoded = [os.fsencode(n) for n in names]
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) >= SETTLE_NS:
        if len(_LISTINGS) >= LISTINGS_KEPT:
            _LISTINGS.pop(next(iter(_LISTINGS)))
        _LISTINGS[real] = (figures, names, encoded)
    return names, encoded


def _regular(names: list[str], paths: list, stat) -> "tuple[list[str], bytes]":
    """``names`` that are regular files (following links, as ``DirEntry.is_file``: a dangling link is none) and
    their stat rows (``stat(paths[i])``)."""
    try:
        stats = list(map(stat, paths))
    except FileNotFoundError:  # a dangling link, or a file removed meanwhile: name by name
        stats = [_stat_or_none(stat, p) for p in paths]
    if not (None not in stats and all(map(S_ISREG, map(attrgetter("st_mode"), stats)))):
        keep = [i for i, s in enumerate(stats) if s is not None and S_ISREG(s.st_mode)]
        names, stats = [names[i] for i in keep], [stats[i] for i in keep]
    return names, b"".join([_STAT_ROW.pack(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
                            for st in stats])


def _stat_or_none(stat, path) -> "Optional[os.stat_result]":
    try:
        return stat(path)
    except FileNotFoundError:
        return None


def _settled_stat_key(folder: Path, names: list[str], rows: bytes) -> "Optional[str]":
    """The stat key of the folder's patches (``rows``: their :data:`_STAT_ROW` rows), or None while a patch
    changed in the last SETTLE_NS."""
    now = time.time_ns()
    table = np.frombuffer(rows, dtype=np.int64).reshape(-1, 5)
    if now - int(table[:, 1:3].max()) < SETTLE_NS:
        return None
    h = hashlib.sha256(f"cem_fast patch folder stat v2\0{os.path.realpath(folder)}\0\0".encode("utf-8",
                                                                                               "surrogateescape"))
    h.update("\0".join(names).encode("utf-8", "surrogateescape"))  # no name holds \0
    h.update(b"\0\0")
    h.update(rows)
    return h.hexdigest()


def _stat_index(stat_key: str) -> Path:
    return cache_dir() / "patch_banks" / "by_stat" / f"{stat_key[:32]}.txt"


def _bank_by_stat(stat_key: str, source: str) -> "Optional[tuple[PatchBank, str]]":
    """A copy of the bank whose folder had these figures and its digest: from this process, or from the bank cache
    through the key the index file names (the cached bank must still carry that content key)."""
    memo = (stat_key, str(cache_dir()))  # per cache folder: a bank is cached in each one it is asked for with
    if memo not in _BANKS_BY_STAT:
        try:
            text = _stat_index(stat_key).read_text().split()
        except OSError:  # absent or unreadable: the folder is read and hashed instead
            return None
        bank = _cached_bank(text[1], source) if len(text) == 2 and text[0] == stat_key else None
        if bank is None:
            return None
        _keep(memo, bank)
    kept, digest = _BANKS_BY_STAT[memo]
    # a copy: what a caller does to its bank (patches written in place) never reaches the kept one
    return PatchBank(torch.from_numpy(kept.patches.numpy().copy()), list(kept.names), source), digest


def _keep(memo: "tuple[str, str]", bank: "PatchBank") -> None:
    """Keep a copy of ``bank`` (never handed out) with its digest."""
    if len(_BANKS_BY_STAT) >= 8:
        _BANKS_BY_STAT.clear()
    kept = PatchBank(torch.from_numpy(bank.patches.numpy().copy()), list(bank.names), bank.source)
    _BANKS_BY_STAT[memo] = (kept, kept.digest())


def _cached_bank_path(key: str) -> Path:
    return cache_dir() / "patch_banks" / f"{key[:24]}.npz"


def _cached_bank(key: str, source: str) -> "Optional[PatchBank]":
    """The cached bank of content key ``key``, or None: absent, unreadable, damaged, or another bank's (or an
    older format's) file under that name."""
    try:
        with np.load(_cached_bank_path(key), allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            return PatchBank(torch.from_numpy(z["patches"]), [str(n) for n in z["names"]], source)
    except Exception:  # noqa: BLE001 - whatever is wrong with the file, the bank is rebuilt from the folder
        return None


def _remember(stat_key: "Optional[str]", key: str, bank: "PatchBank") -> "PatchBank":
    if stat_key is None:  # not settled, or the cache is off: nothing is remembered
        return bank
    _keep((stat_key, str(cache_dir())), bank)
    try:
        atomic_write(_stat_index(stat_key), lambda f: f.write(f"{stat_key} {key}\n".encode()))
    except OSError:
        pass  # an unwritable cache: the next process reads the folder again
    return bank


def _atomic_savez(path: Path, **arrays) -> None:
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


_cache_warned = False  # the bank cache's warning is given once per process, not once per bank


def _warn_cache_once(folder: Path, err: OSError) -> None:
    global _cache_warned
    if not _cache_warned:
        _cache_warned = True
        warnings.warn(f"patch bank cache {str(folder)!r} cannot be written ({err}); patch folders are read "
                      f"without it (set CEM_FAST_CACHE to a writable folder to cache them)", stacklevel=3)


def load_patch_bank(spec: "str | os.PathLike | PatchBank | None") -> PatchBank:
    """``None``/"default": the shipped bank; a folder of patch images; an ``.npz`` saved by :meth:`PatchBank.save`."""
    return load_patch_bank_with_digest(spec, digest=False)[0]


def load_patch_bank_with_digest(spec: "str | os.PathLike | PatchBank | None",
                                digest: bool = True) -> "tuple[PatchBank, Optional[str]]":
    """:func:`load_patch_bank` and the bank's :meth:`PatchBank.digest` (None with ``digest=False``): a folder's
    bank kept in this process comes with the digest taken when it was kept (the bank handed out is a copy, which
    nothing has touched yet)."""
    if isinstance(spec, PatchBank):
        return spec, spec.digest() if digest else None
    if spec is None or (isinstance(spec, str) and spec == "default"):
        bank = PatchBank.default()
        return bank, bank.digest() if digest else None
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(f"patches must be None, 'default', a folder of patch images, an .npz file or a PatchBank, "
                         f"got {type(spec).__name__}")
    p = Path(spec)
    bank, known = (PatchBank.load(p), None) if p.suffix == ".npz" and p.is_file() else PatchBank._from_folder(p)
    return bank, (known or bank.digest()) if digest else None
