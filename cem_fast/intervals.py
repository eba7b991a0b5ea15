"""Confidence intervals of a block's effect: the mean of a few draws, so Student's t (3 coarse draws need
t = 4.30, not the normal 1.96, for an honest 95 % interval)."""
from __future__ import annotations

import numpy as np

# two-sided 95 % quantiles t_{0.975, df}
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042, 40: 2.021, 50: 2.009, 60: 2.000, 80: 1.990, 100: 1.984, 120: 1.980}
Z975 = 1.959963984540054


def t975(df: np.ndarray) -> np.ndarray:
    """t_{0.975, df} elementwise (NaN for df < 1): the table, linear in 1/df between its rows and towards the
    normal quantile beyond 120 (within 0.001 of the exact values)."""
    df = np.asarray(df, dtype=np.float64)
    keys = np.array(sorted(_T975), dtype=np.float64)
    inv = np.concatenate([[0.0], 1.0 / keys[::-1]])  # ascending: 0 (df = inf), 1/120, ..., 1
    vals = np.concatenate([[Z975], [_T975[int(k)] for k in keys[::-1]]])
    x = 1.0 / np.maximum(df, 1.0)
    return np.where(df >= 1, np.interp(x, inv, vals), np.nan)


HELPS, HURTS, NO_EFFECT, UNDECIDED = 1, -1, 0, 2


def decide(low: np.ndarray, high: np.ndarray, tol: float) -> np.ndarray:
    """Per block: HELPS when the interval lies above +tol, HURTS below -tol, NO_EFFECT inside (-tol, tol),
    else UNDECIDED (more draws would settle it)."""
    out = np.full(low.shape, UNDECIDED, dtype=np.int8)
    out[low >= tol] = HELPS
    out[high <= -tol] = HURTS
    out[(low > -tol) & (high < tol)] = NO_EFFECT
    return out
