"""JSON that every reader accepts (cem_fast/jsonsafe.py)."""
import numpy as np
import pytest


def test_json_safe_refuses_values_nested_too_deep_or_holding_themselves():
    from cem_fast.jsonsafe import json_safe
    deep: list = []
    inner = deep
    for _ in range(10_000):
        inner.append([])
        inner = inner[0]
    itself: list = [1]
    itself.append(itself)
    for value in (deep, itself, {"a": {"b": itself}}):
        with pytest.raises(ValueError, match=r"^json_safe: values may nest 100 levels deep, got more \(or a value "
                                             r"holds itself\)$"):
            json_safe(value)
    assert json_safe({"a": [[np.float32(1.5), float("inf")]], 2: np.arange(2)}) == {"a": [[1.5, "inf"]],
                                                                                     "2": [0, 1]}
