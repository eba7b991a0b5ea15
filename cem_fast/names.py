"""Names of the folders a run writes under ``--out``: one per model and image, safe on any file system, unique
in order. A ground-floor module: the CLI, compare and studies all name their folders with it."""
from __future__ import annotations

import re
import unicodedata

CACHE_DIR = ".cem_cache"  # inside --out: per-batch samples, so a re-run resumes after a crash

RESERVED = {"report.html", "compare.html", "compare", "error.json", "study.html", "study.json", "study.csv",
            "study.md", "profiles.png"}  # what the run writes beside the run folders


MAX_NAME_BYTES = 200  # a file name may hold 255 bytes: room for a _2 suffix and a temporary's


def _name_char(c: str) -> str:
    """``c`` if a letter, digit or combining mark of any script (not a variation selector) or '.', '_', '-';
    else NUL, which never is one (a separator, an emoji, a control or direction character)."""
    kind = unicodedata.category(c)[0]
    keep = c in "._-" or kind in "LN" or (kind == "M" and not unicodedata.name(c, "").startswith("VARIATION"))
    return c if keep else "\0"


def safe_name(name: str, fallback: str = "run") -> str:
    """A folder name: letters, digits and marks of any script (NFC), '.', '_' and '-', each run of anything else
    one '_'; at most MAX_NAME_BYTES in UTF-8; never starting with a dot ('..', '.', '.cem_cache' would leave the
    output folder or hide in it) and never a name the run writes itself (report.html...)."""
    safe = re.sub("\0+", "_", "".join(map(_name_char, unicodedata.normalize("NFC", name))))
    safe = safe.encode()[:MAX_NAME_BYTES].decode(errors="ignore").strip("._-") or fallback
    return safe + "_" if safe in RESERVED else safe


def unique_names(names: list[str]) -> list[str]:
    """The names made unique in order: a repeated one gets ``_2``, ``_3``, ... (never one already taken)."""
    taken: set[str] = set()
    return [take_name(n, taken) for n in names]


def take_name(name: str, taken: set) -> str:
    """``name``, or ``name_2``, ``name_3``, ... : the first not in ``taken`` (which then holds it)."""
    candidate, i = name, 1
    while candidate in taken:
        i += 1
        candidate = f"{name}_{i}"
    taken.add(candidate)
    return candidate
