"""Confidence intervals of a block's effect: the mean of a few draws, so Student's t (3 coarse draws need
t = 4.30, not the normal 1.96, for an honest 95 % interval)."""
from __future__ import annotations

from typing import Optional

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


# A block's draws must leave this many degrees of freedom beyond the regression's for the control variate to be
# used (with fewer, the fitted slope is too noisy and a heavy tail too likely to be missed: the plain mean is kept).
CV_MIN_DF = 7


def block_estimates(d: np.ndarray, mask: np.ndarray, x: Optional[np.ndarray]) -> tuple[np.ndarray, ...]:
    """Per block (row): (estimate, standard error, degrees of freedom) of the mean effect from its draws.

    ``d``: (B, K) effects of the draws, ``mask``: (B, K) which of them are real (adaptive rows have different
    numbers), ``x``: (B, K, q) covariates of each draw centred on their known mean, or None.

    Without covariates, or for a row with fewer than ``q + 1 + CV_MIN_DF`` draws or degenerate covariates: the
    mean, its standard error ``s / sqrt(n)`` and n - 1 degrees of freedom (NaN with one draw). Otherwise the
    control-variate estimate: the intercept of the least-squares fit ``d = a + b . x``. As the covariates' mean
    over the bank is known (0 after centring) and the draws are uniform over it, ``a`` estimates the same mean
    effect with the part of each draw's noise the covariates explain removed. Its standard error is the
    heteroscedasticity-consistent HC3 one (MacKinnon & White 1985: honest when the noise depends on the patch),
    with n - q - 1 degrees of freedom."""
    d = np.where(mask, d, 0.0)
    n = mask.sum(1)
    mean = d.sum(1) / np.maximum(n, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.where(mask, (d - mean[:, None]) ** 2, 0.0).sum(1) / (n - 1)
        se = np.sqrt(var / n)
    df = (n - 1).astype(np.float64)
    se = np.where(n > 1, se, np.nan)
    if x is None or not x.shape[-1]:
        return mean, se, df
    q = x.shape[-1]
    fit = n >= q + 1 + CV_MIN_DF
    if not fit.any():
        return mean, se, df
    w = mask[fit].astype(np.float64)
    a = np.concatenate([np.ones(w.shape + (1,)), x[fit]], axis=2) * w[..., None]  # masked design (F, K, q+1)
    y = d[fit]
    gram = np.einsum("fki,fkj->fij", a, a)
    cond = np.linalg.cond(gram)
    ok = np.isfinite(cond) & (cond < 1e10)  # covariates that do not vary (a bank of one brightness): plain mean
    inv = np.zeros_like(gram)
    inv[ok] = np.linalg.inv(gram[ok])
    coef = np.einsum("fij,fkj,fk->fi", inv, a, y)
    resid = (y - np.einsum("fkj,fj->fk", a, coef)) * w
    lev = np.einsum("fki,fij,fkj->fk", a, inv, a)
    ok &= (lev < 1 - 1e-9).all(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        hc3 = np.where(w > 0, resid ** 2 / np.maximum(1 - lev, 1e-12) ** 2, 0.0)
    cov = np.einsum("fij,fkj,fk,fkl,flm->fim", inv, a, hc3, a, inv, optimize=True)
    idx = np.flatnonzero(fit)[ok]
    mean, se, df = mean.copy(), se.copy(), df.copy()
    mean[idx] = coef[ok, 0]
    se[idx] = np.sqrt(np.maximum(cov[ok, 0, 0], 0.0))
    df[idx] = n[idx] - q - 1
    return mean, se, df
