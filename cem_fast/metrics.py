"""Per-map metrics with 95 % intervals: what a Causal Effect Map says, in numbers that can be compared across maps.

Every metric is over the blocks outside the ROI (the ROI's own blocks are not rated, as in ``stats()``). A block
is one of:

- *skipped*: it cannot reach the ROI (speed mode's locality probe); its effect is exactly 0, with no uncertainty;
- *screened*: coarse-to-fine's coarse gate kept it out of the fine stage (every coarse draw under ``tol``); it
  counts as 0, as the map shows it, and carries no interval;
- *rated*: every other block; its effect is the estimate ``effect`` (before the display threshold) with its
  standard error ``effect_se`` and degrees of freedom ``effect_df``.

Skipped and screened blocks are counted apart in the shares (they are neither "no effect" decided by an interval
nor undecided). The map value of a block below is its estimate where rated, else 0.

Noise adds |CE| mass: a block with no effect and a standard error s has an estimate of expected size 0.8 s, and a
map of many such blocks would show mass, radii and far shares made of noise. So every metric that is not a
linear function of the effects (the masses and their shares, the extremes, |CE| per ring, the radii) is computed
on the *noise-corrected map* ``sign(CE) * sqrt(max(CE^2 - se^2, 0))`` (``CE^2 - se^2`` is unbiased for the
squared effect: the correction removes the noise floor of blocks with no effect and changes a block of effect
well above its error by about nothing). The mean CE per ring, a linear function, is on the estimates themselves.
What no estimator can do: tell, block by block, an effect of the size of its error from none. A map with many
blocks whose effects are about their standard errors gets a mass that is too small and intervals that miss it;
where every block's effect is either 0 or several standard errors (the fine draws' usual case), the intervals
cover (the metrics tests simulate such maps and hold nominal 95 % intervals to a coverage within 90-99 %).
Extremes: the largest of several blocks of nearly equal effect is biased up (the winner's curse), and its
interval covers less than 95 %.

Metrics (dB, output px):

- shares of the outside blocks, summing to 1: ``positive_share`` / ``negative_share`` / ``no_effect_share``
  (rated blocks their 95 % interval decides: above +tol, below -tol, inside (-tol, tol); see
  :meth:`CEMResult.decided`), ``undecided_share``, ``screened_share``, ``skipped_share``. They are counts of
  decisions, with no interval of their own: the undecided share is their uncertainty;
- ``positive_mass_db`` / ``negative_mass_db``: the sums of the positive / negative map values;
  ``negative_mass_share``: the negative mass's share of the |CE| mass;
- ``effect_min_db`` / ``effect_max_db`` / ``effect_range_db``: the smallest and largest map value (0 where some
  outside block is 0) and their difference;
- ``profile``: per ring of block-centre distance from the ROI rectangle (ring k: distance in [k b, (k+1) b),
  b the block side; a block next to the ROI is in ring 0), the mean CE and the mean |CE| over the ring's outside
  blocks (skipped and screened ones as 0). Rings past the last block that can reach the ROI are all 0 and left
  out;
- ``radius50_px`` / ``radius90_px``: the smallest block-centre distance from the ROI within which 50 % / 90 % of
  the |CE| mass lies (None for a map with no mass);
- ``far_mass_share``: the share of the |CE| mass of blocks farther than ``far_px`` from the ROI (default: one ROI
  size, the larger side).

Intervals (95 %): a parametric bootstrap. Each rated block's effect is drawn ``n_boot`` times as ``effect + se *
T``, T Student's t with the block's degrees of freedom (the same t as the block's own interval; normal where
they are infinite), independently across blocks (they are estimated from independent draws); skipped and
screened blocks stay 0 and rated blocks without a standard error (a single draw) stay at their estimate. Each
metric is computed on every bootstrap map; its interval is the *basic* (reflected) bootstrap interval
``[2 m - q97.5, 2 m - q2.5]`` (m the metric of the map itself): for a sum of effects it is the t interval, and for
the metrics that do not depend linearly on the effects (|CE|, positive parts, shares of mass, extremes) it
corrects the plug-in estimate's first-order bias (noise around a zero effect adds to a |CE| mass), which the
percentile interval would keep. For the same reason their value is the bootstrap's bias-corrected estimate
``2 m - mean(m*)`` (m* the metric of the bootstrap maps; equal to m where no block has an error). The radii take
values among the blocks' distances, so they are read from the |CE| mass within each distance instead: the radius
is that of the bias-corrected mass curve, and its interval the percentile interval of the radii of the reflected
bootstrap curves ``2 M - M*`` (widened to the radius where that falls outside). Shares of mass are clipped to
[0, 1], masses to their sign, radii to >= 0. The bootstrap's generator is seeded (``boot_seed``): the same map
gives the same intervals.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import numpy as np

from .intervals import HELPS, HURTS, NO_EFFECT, UNDECIDED

BOOT_DRAWS = 2000
BOOT_SEED = 20250729
INTERVAL = ("parametric bootstrap: each rated block's effect drawn as effect + se * T, T Student's t with its "
            "degrees of freedom (normal where infinite); bias-corrected values and basic (reflected) 95 % intervals, "
            "percentile for the radii; skipped and screened blocks fixed at 0")
_CHUNK = 4_000_000  # bootstrap values held at once


def block_distances(shape: tuple[int, int], block: int, out_hw: tuple[int, int],
                    roi: tuple[int, int, int, int]) -> np.ndarray:
    """(rows, cols) float64: the Euclidean distance, output px, from each block's centre (of the part inside the
    image, for the partial edge blocks) to the ROI rectangle ``(y, x, height, width)`` (0 inside it)."""
    rows, cols = shape
    h, w = out_hw
    y0 = np.arange(rows) * block
    x0 = np.arange(cols) * block
    cy = (y0 + np.minimum(y0 + block, h)) / 2
    cx = (x0 + np.minimum(x0 + block, w)) / 2
    ry, rx, rh, rw = roi
    dy = np.maximum(np.maximum(ry - cy, cy - (ry + rh)), 0.0)
    dx = np.maximum(np.maximum(rx - cx, cx - (rx + rw)), 0.0)
    return np.hypot(dy[:, None], dx[None, :])


def _stats(x: np.ndarray, ctx: dict) -> dict[str, np.ndarray]:
    """Every bootstrappable metric of the maps ``x`` (B, m): the values of the blocks with mass, in the order of
    ``ctx`` (sorted by distance). Returns arrays of shape (B,) or (B, rings)."""
    raw = x
    se = ctx["se"]
    x = np.sign(x) * np.sqrt(np.maximum(x * x - se * se, 0.0))  # the noise-corrected map (module docstring)
    a = np.abs(x)
    pos = np.where(x > 0, x, 0.0).sum(1)
    neg = np.where(x < 0, x, 0.0).sum(1)
    total = a.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        neg_share = np.where(total > 0, -neg / total, np.nan)
        far = np.where(total > 0, a[:, ctx["far"]].sum(1) / total, np.nan)
    m = x.shape[1]
    zero = ctx["has_zero"]
    mx = np.maximum(x.max(1), 0.0) if zero and m else (x.max(1) if m else np.zeros(len(x)))
    mn = np.minimum(x.min(1), 0.0) if zero and m else (x.min(1) if m else np.zeros(len(x)))
    rings = ctx["rings"]
    ring_sum = np.zeros((len(x), rings))
    ring_abs = np.zeros((len(x), rings))
    if m:
        starts = ctx["ring_starts"]
        ring_sum[:, ctx["ring_ids"]] = np.add.reduceat(raw, starts, axis=1)  # linear: the estimates themselves
        ring_abs[:, ctx["ring_ids"]] = np.add.reduceat(a, starts, axis=1)
    count = ctx["ring_count"]
    out = {"positive_mass_db": pos, "negative_mass_db": neg, "negative_mass_share": neg_share,
           "effect_min_db": mn, "effect_max_db": mx, "effect_range_db": mx - mn, "far_mass_share": far,
           "profile_mean_db": ring_sum / count, "profile_mean_abs_db": ring_abs / count}
    # |CE| mass within each distance (B, levels): the radii are read from it (:func:`_radius`)
    out["mass_within"] = (np.cumsum(np.add.reduceat(a, ctx["level_starts"], axis=1), axis=1) if m
                          else np.zeros((len(x), 1)))
    return out


def _radius(curve: np.ndarray, levels: np.ndarray, q: float) -> np.ndarray:
    """The smallest distance level at which the (running maximum of the) mass curve (..., L) reaches ``q`` of its
    last value; NaN where that is not positive."""
    if not levels.size:
        return np.full(curve.shape[:-1], np.nan)
    c = np.maximum.accumulate(curve, axis=-1)
    total = c[..., -1:]
    first = np.argmax(c >= q * total * (1 - 1e-12), axis=-1)
    return np.where(total[..., 0] > 0, levels[first], np.nan)


def compute_metrics(effect: np.ndarray, se: Optional[np.ndarray], df: Optional[np.ndarray],
                    decided: np.ndarray, outside: np.ndarray, screened: np.ndarray, skipped: np.ndarray,
                    distance: np.ndarray, block: int, far_px: float, n_boot: int = BOOT_DRAWS,
                    boot_seed: int = BOOT_SEED) -> dict[str, Any]:
    """The metrics of one map from its arrays (all (rows, cols); see the module docstring).

    Args:
        effect: dB estimates; se: their standard errors (None: no uncertainty recorded, every interval is the
            value itself); df: degrees of freedom of each block's t (None or non-finite: normal);
        decided: codes of :meth:`CEMResult.decided` (1 helps, -1 hurts, 0 no effect, 2 undecided);
        outside: blocks outside the ROI; screened, skipped: as in the module docstring;
        distance: block-centre distance from the ROI, output px (:func:`block_distances`);
        block: block side, output px (the ring width); far_px: the distance beyond which mass is "far".
    """
    outside = outside.astype(bool)
    skipped = skipped.astype(bool) & outside
    screened = screened.astype(bool) & outside & ~skipped
    rated = outside & ~skipped & ~screened
    out = _counts(decided, outside, screened, skipped, rated)
    e, sd, dfs, ctx, no_interval = _mass_blocks(effect, se, df, outside, skipped, rated, distance, block, far_px)
    out["no_interval_blocks"] = int(no_interval.sum())
    point = {k: v[0] for k, v in _stats(e[None, :], ctx).items()}
    vary = sd > 0
    boot = _bootstrap(e, sd, dfs, ctx, list(point), n_boot, boot_seed) if vary.any() and n_boot > 0 else \
        {k: [] for k in point}
    _radii(point, boot, ctx["levels"])
    bounds = _bounded(point, boot, ctx["has_zero"])
    for key in INTERVAL_METRICS:
        v, lo, hi = bounds[key]
        out[key] = {"value": _num(v), "low": _num(lo), "high": _num(hi)}
    out["far_px"] = float(far_px)
    out["profile"] = _profile(bounds, ctx["ring_count"], ctx["rings"], block)
    out["interval"] = INTERVAL if se is not None else "none: the map records no standard errors"
    out["boot_draws"] = int(n_boot) if vary.any() else 0
    return out


def _counts(decided: np.ndarray, outside: np.ndarray, screened: np.ndarray, skipped: np.ndarray,
            rated: np.ndarray) -> dict[str, Any]:
    """The block counts and the shares of the outside blocks (decisions of the rated ones, screened, skipped)."""
    n = int(outside.sum())
    codes = decided[rated]
    shares = {"positive_share": (codes == HELPS).sum(), "negative_share": (codes == HURTS).sum(),
              "no_effect_share": (codes == NO_EFFECT).sum(), "undecided_share": (codes == UNDECIDED).sum(),
              "screened_share": screened.sum(), "skipped_share": skipped.sum()}
    out: dict[str, Any] = {"blocks_outside_roi": n, "rated_blocks": int(rated.sum()),
                           "screened_blocks": int(screened.sum()), "skipped_blocks": int(skipped.sum())}
    out.update({k: float(v) / max(n, 1) for k, v in shares.items()})
    return out


def _mass_blocks(effect, se, df, outside, skipped, rated, distance, block: int, far_px: float):
    """The blocks that can carry |CE| mass, sorted by distance: their map values, standard errors (0 where none)
    and degrees of freedom, the context of :func:`_stats` (rings, distance levels) and the rated blocks without
    a usable standard error."""
    value = np.where(rated, np.nan_to_num(effect.astype(np.float64), nan=0.0), 0.0)
    s = np.zeros(effect.shape) if se is None else np.where(rated, se, 0.0)
    no_interval = rated & ~np.isfinite(s)
    s = np.where(np.isfinite(s), s, 0.0)
    mass = outside & ((value != 0) | (s > 0))  # blocks that can carry |CE| mass
    order = np.argsort(distance[mass], kind="stable")
    d = distance[mass][order]
    e = value[mass][order]
    sd = s[mass][order]
    dfs = np.full(e.shape, np.inf) if df is None else np.asarray(df, dtype=np.float64)[mass][order]
    ring_of = np.floor(distance / block).astype(np.int64)
    reach = outside & ~skipped
    rings = int(ring_of[reach].max()) + 1 if reach.any() else 1
    ring_count = np.bincount(ring_of[outside], minlength=rings)[:rings].astype(np.float64)
    ring_count[ring_count == 0] = np.nan
    ring = np.floor(d / block).astype(np.int64)
    ring_ids, ring_starts = np.unique(ring, return_index=True)
    levels, level_starts = np.unique(d, return_index=True)
    ctx = {"se": sd, "far": d > far_px, "has_zero": bool((outside & ~mass).any()), "rings": rings, "ring_ids": ring_ids,
           "ring_starts": ring_starts, "ring_count": ring_count, "levels": levels, "level_starts": level_starts}
    return e, sd, dfs, ctx, no_interval


def _bootstrap(e: np.ndarray, sd: np.ndarray, dfs: np.ndarray, ctx: dict, keys: list, n_boot: int,
               boot_seed: int) -> dict[str, list]:
    """The metrics of ``n_boot`` bootstrap maps (module docstring), a chunk of maps at a time: key -> arrays."""
    vary = sd > 0
    boot: dict[str, list] = {k: [] for k in keys}
    gen = np.random.default_rng(boot_seed)
    step = max(1, _CHUNK // max(1, e.size))
    for start in range(0, n_boot, step):
        b = min(step, n_boot - start)
        z = gen.standard_normal((b, int(vary.sum())))
        dv = dfs[vary]
        finite = np.isfinite(dv) & (dv > 0)
        if finite.any():
            t = gen.standard_t(np.where(finite, dv, 1.0), size=z.shape)
            z = np.where(finite, t, z)
        x = np.broadcast_to(e, (b, e.size)).copy()
        x[:, vary] += sd[vary] * z
        for k, v in _stats(x, ctx).items():
            boot[k].append(v)
    return boot


def _radii(point: dict, boot: dict, levels: np.ndarray) -> None:
    """Replace the mass curves (``mass_within``) of ``point`` and ``boot`` by the radii read from them: the
    radii of the bias-corrected mass curve, their bootstrap values from the reflected bootstrap curves."""
    p = point.pop("mass_within")
    curves = boot.pop("mass_within")
    if curves:
        curves = np.concatenate(curves, axis=0)
        reflected = 2 * p[None, :] - curves
        corrected = 2 * p - curves.mean(0)
        for q in (50, 90):
            key = f"radius{q}_px"
            point[key] = _radius(corrected, levels, q / 100)
            boot[key] = [_radius(reflected, levels, q / 100)]
    else:
        for q in (50, 90):
            point[f"radius{q}_px"], boot[f"radius{q}_px"] = _radius(p, levels, q / 100), []


def _interval(key: str, point: dict, boot: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(value, low, high) of a metric: see the module docstring."""
    p = np.asarray(point[key], dtype=np.float64)
    if not boot[key]:
        return p, p, p
    draws = np.concatenate(boot[key], axis=0)
    if not np.isfinite(draws).any():
        return p, p, p
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # rings with no blocks: all NaN
        lo, hi = np.nanpercentile(draws, [2.5, 97.5], axis=0)
        mean = np.nanmean(draws, axis=0)
    if key.startswith("radius"):
        return p, np.fmin(lo, p), np.fmax(hi, p)
    value = p if key == "profile_mean_db" else 2 * p - mean  # linear: unbiased as it is
    return value, 2 * p - hi, 2 * p - lo


def _bounded(point: dict, boot: dict, has_zero: bool) -> dict[str, tuple]:
    """key -> (value, low, high) of every metric, clipped to its range (the value to its interval)."""
    clip = {"positive_mass_db": (0.0, np.inf), "negative_mass_db": (-np.inf, 0.0), "negative_mass_share": (0, 1),
            "far_mass_share": (0, 1), "effect_range_db": (0, np.inf),
            # with a block at 0 (skipped, screened, exactly 0) the largest value is >= 0 and the smallest <= 0
            "effect_max_db": (0, np.inf) if has_zero else (None, None),
            "effect_min_db": (-np.inf, 0) if has_zero else (None, None), "radius50_px": (0, np.inf),
            "radius90_px": (0, np.inf), "profile_mean_db": (None, None), "profile_mean_abs_db": (0, np.inf)}
    bounds = {}
    for key in point:
        v, lo, hi = _interval(key, point, boot)
        a, b = clip[key]
        if a is not None:
            v, lo, hi = np.clip(v, a, b), np.clip(lo, a, b), np.clip(hi, a, b)
        bounds[key] = (np.clip(v, np.fmin(lo, hi), np.fmax(lo, hi)), lo, hi)
    return bounds


def _profile(bounds: dict, ring_count: np.ndarray, rings: int, block: int) -> dict[str, list]:
    """The distance profile: per ring, its distance, its blocks, the mean CE and mean |CE| with their intervals."""
    (mv, ml, mh), (av, al, ah) = bounds["profile_mean_db"], bounds["profile_mean_abs_db"]
    return {"ring_width_px": float(block), "ring_px": [float(k * block) for k in range(rings)],
            "blocks": [int(c) if np.isfinite(c) else 0 for c in ring_count],
            "mean_db": _nums(mv), "mean_db_low": _nums(ml),
            "mean_db_high": _nums(mh), "mean_abs_db": _nums(av),
            "mean_abs_db_low": _nums(al), "mean_abs_db_high": _nums(ah)}


def _num(v) -> Optional[float]:
    v = float(v)
    return v if np.isfinite(v) else None


def _nums(v) -> list:
    return [_num(x) for x in np.asarray(v, dtype=np.float64).ravel()]


def map_metrics(res, far_px: Optional[float] = None, n_boot: int = BOOT_DRAWS,
                boot_seed: int = BOOT_SEED) -> dict[str, Any]:
    """The metrics of a :class:`~cem_fast.result.CEMResult` (see the module docstring); ``far_px`` default: the
    ROI's larger side."""
    roi = res.roi
    if far_px is None:
        far_px = float(max(roi.height, roi.width))
    elif not (isinstance(far_px, (int, float)) and np.isfinite(far_px) and far_px >= 0):
        raise ValueError(f"far_px must be a distance >= 0 in output px, got {far_px!r}")
    dist = block_distances(res.cem.shape, res.block, tuple(res.gt.shape[-2:]), roi.as_tuple())
    if res.effect_se is None:
        se, df = None, None
    else:
        se = res.effect_se
        df = res.effect_draws - 1 if res.effect_df is None else res.effect_df
        df = np.where(np.asarray(df, dtype=np.float64) >= 1, df, np.nan)
    return compute_metrics(res.effect, se, df, res.decided(), ~res.roi_mask, res.screened, ~res.reachable,
                           dist, res.block, float(far_px), n_boot=n_boot, boot_seed=boot_seed)


SCALAR_METRICS = ("positive_share", "negative_share", "no_effect_share", "undecided_share", "screened_share",
                  "skipped_share")
INTERVAL_METRICS = ("positive_mass_db", "negative_mass_db", "negative_mass_share", "effect_min_db",
                    "effect_max_db", "effect_range_db", "radius50_px", "radius90_px", "far_mass_share")


def flat_metrics(m: dict[str, Any]) -> dict[str, Any]:
    """One metrics dict as flat columns: the shares, then ``name``, ``name_low``, ``name_high`` of each metric
    with an interval, the block counts and ``far_px`` (the profile is left out: see ``m["profile"]``)."""
    row: dict[str, Any] = {k: m[k] for k in SCALAR_METRICS}
    for k in INTERVAL_METRICS:
        row[k], row[f"{k}_low"], row[f"{k}_high"] = m[k]["value"], m[k]["low"], m[k]["high"]
    for k in ("far_px", "blocks_outside_roi", "rated_blocks", "screened_blocks", "skipped_blocks"):
        row[k] = m[k]
    return row
