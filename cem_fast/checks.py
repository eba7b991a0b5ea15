"""Argument checks shared by the Python API, the config loader and the tasks: one-line ValueErrors that name the
argument, what was expected and what was given."""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, Optional

SEED_MAX = (1 << 63) - 1  # the intervention seed is folded into 64-bit counters
NUMPY_SEED_MAX = (1 << 32) - 1  # numpy's legacy generator (DN input noise, rain) takes 32-bit seeds
MAX_DRAWS = 1 << 20  # draws per block: an intervention id is block * MAX_DRAWS + draw index


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (a message may start with a newline), or its type."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def integer(name: str, value: Any, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """``value`` as an int in [lo, hi]; floats, strings and booleans are refused (``8.5`` is not silently 8)."""
    if not _is_int(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        kind = {(1, None): "a positive integer", (0, None): "a non-negative integer"}.get((lo, hi))
        raise ValueError(f"{name} must be {kind or 'an integer' + _range(lo, hi)}, got {value!r}")
    return int(value)


def number(name: str, value: Any, lo: Optional[float] = None, hi: Optional[float] = None,
           lo_open: bool = False) -> float:
    """``value`` as a finite float in [lo, hi] (``(lo, hi]`` with ``lo_open``)."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok:
        v = float(value)
        ok = (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or v <= hi)
    if not ok:
        bounds = "" if lo is None and hi is None else \
            f" in {'(' if lo_open else '['}{_fmt(lo, '-inf')}, {_fmt(hi, 'inf')}]"
        raise ValueError(f"{name} must be a finite number{bounds}, got {value!r}")
    return float(value)


def choice(name: str, value: Any, allowed: tuple) -> Any:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")
    return value


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def _fmt(v: Optional[float], missing: str) -> str:
    if v is None:
        return missing
    return f"{v:g}" if isinstance(v, float) else str(v)


def _range(lo: Optional[int], hi: Optional[int]) -> str:
    if lo is None and hi is None:
        return ""
    if hi is None:
        return f" >= {lo}"
    return f" in [{_fmt(lo, '-inf')}, {hi}]"
