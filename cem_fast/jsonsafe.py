"""JSON that every reader accepts: ``inf`` and ``nan`` (an exact ROI, an absent extreme) are written as the strings
"inf", "-inf" and "nan" instead of the bare ``Infinity`` / ``NaN`` that Python's json emits and strict parsers
refuse; numpy scalars and arrays become numbers and lists; anything else its ``str``. Values nested deeper than
MAX_DEPTH (or holding themselves) are refused with a ValueError, not a RecursionError."""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


MAX_DEPTH = 100  # a summary nests 5 levels, an array at most 64 (numpy's limit on dimensions)


def json_safe(obj: Any, _depth: int = 0) -> Any:
    """A copy of ``obj`` made only of dicts, lists, strings, finite numbers, booleans and None."""
    if isinstance(obj, (dict, list, tuple, np.ndarray)) and _depth >= MAX_DEPTH:
        raise ValueError(f"json_safe: values may nest {MAX_DEPTH} levels deep, got more (or a value holds itself)")
    if isinstance(obj, dict):
        return {str(k): json_safe(v, _depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, _depth + 1) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist(), _depth)
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else str(float(obj))
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def json_bytes(obj: Any, indent: int = 2) -> bytes:
    """``obj`` as strict JSON (``allow_nan=False`` guarantees it)."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False).encode()
