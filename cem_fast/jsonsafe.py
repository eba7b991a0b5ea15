"""JSON that every reader accepts: ``inf`` and ``nan`` (an exact ROI, an absent extreme) are written as the strings
"inf", "-inf" and "nan" instead of the bare ``Infinity`` / ``NaN`` that Python's json emits and strict parsers
refuse; numpy scalars and arrays become numbers and lists; anything else its ``str``."""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


def json_safe(obj: Any) -> Any:
    """A copy of ``obj`` made only of dicts, lists, strings, finite numbers, booleans and None."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
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
