"""Why a file named in a config or a call cannot be opened, said plainly: a symlink loop is not "does not exist"."""
from __future__ import annotations

import errno
import os
import re
from typing import Optional


def missing(path: "str | os.PathLike") -> Optional[str]:
    """None if ``path`` exists (after its links); else why not: ``does not exist``, ``is a symlink loop (cannot be
    resolved)``, ``is a broken symlink (to 'target')`` or the system's reason."""
    try:
        os.stat(path)
        return None
    except ValueError:  # a NUL character: no file can have that name
        return "is not a valid path (it holds a NUL character)"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symlink loop (cannot be resolved)"
        if os.path.islink(path):
            return f"is a broken symlink (to {os.readlink(path)!r})"
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return "does not exist"
        return f"cannot be read ({e.strerror})"


FACTORY_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")  # pkg.module:factory


def looks_like_file(spec: str) -> bool:
    """Whether a model spec names a file: it has a folder or a suffix (``net.pth``), and is not a factory
    (``torch.nn:Identity``) nor a bare name (``DnCNN``, a model-zoo name of the reference code)."""
    return "/" in spec or os.sep in spec or (bool(os.path.splitext(spec)[1]) and not FACTORY_SPEC.fullmatch(spec))
