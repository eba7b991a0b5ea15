"""Paired comparison of models with common random numbers.

Run with the same seed, every model sees the same interventions (same patches, same noise) for every block and
draw, so the per-draw difference ``(Y_a(I) - Y_a,k) - (Y_b(I) - Y_b,k)`` cancels most of the sampling noise: the
difference map's confidence intervals are far narrower than those of two independent maps.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .pipeline.samples import effects
from .fileio import atomic_write
from .intervals import t975
from .jsonsafe import json_bytes
from .names import unique_names
from .result import CEMResult



@dataclass
class MapDifference:
    """``diff`` (rows, cols) dB: CE of model a minus CE of model b, from paired draws; ``half_width`` the 95 %
    confidence half-width (Student's t; inf with a single draw); ``draws`` the paired draws used;
    ``roi_mask`` the ROI blocks (not rated: left out of the maximum, the significant blocks and the picture's
    scale, as the maps' statistics leave them out); ``tol`` the smallest difference that counts, dB."""

    name_a: str
    name_b: str
    diff: np.ndarray
    half_width: np.ndarray
    draws: np.ndarray
    roi_mask: Optional[np.ndarray] = None
    tol: float = 0.0

    def __post_init__(self) -> None:
        if self.roi_mask is None:
            self.roi_mask = np.zeros(self.diff.shape, dtype=bool)

    @property
    def significant(self) -> np.ndarray:
        """(rows, cols) bool: blocks outside the ROI whose difference is at least ``tol`` (below it the maps
        themselves show no effect) and whose 95 % interval excludes 0 (not sampling noise). Either alone is not
        enough: a difference of 0.003 dB can be certain and a difference of 0.5 dB can be noise."""
        return (np.abs(self.diff) >= self.tol) & (np.abs(self.diff) > self.half_width) & ~self.roi_mask

    def summary(self) -> dict[str, Any]:
        """The largest |diff| and the significant blocks, both outside the ROI (summary.json's stats leave the
        ROI out too), and the median 95 % half-width."""
        rated = ~self.roi_mask
        size = np.where(rated, np.abs(self.diff), -np.inf)
        top = np.unravel_index(np.argmax(size), size.shape)
        finite = np.isfinite(self.half_width) & rated
        return {"a": self.name_a, "b": self.name_b, "roi_excluded": True, "tol_db": self.tol,
                "max_abs_diff_db": float(size[top]) if rated.any() else 0.0,
                "max_abs_diff_block": [int(i) for i in top] if rated.any() else None,
                "significant_blocks": int(self.significant.sum()),
                "significant_means": "|diff| >= tol and the 95% CI excludes 0, outside the ROI",
                "median_half_width_db": float(np.median(self.half_width[finite])) if finite.any() else None}


def _check_paired(a: CEMResult, b: CEMResult) -> None:
    for what, va, vb in (("grid", a.cem.shape, b.cem.shape), ("roi", a.roi, b.roi), ("seed", a.seed, b.seed),
                         ("task", a.task, b.task), ("patch bank", a.patch_bank.get("digest"),
                                                    b.patch_bank.get("digest")),
                         ("coarse draws", a.samples_coarse.shape, b.samples_coarse.shape),
                         ("fine draws", a.samples_fine.shape, b.samples_fine.shape)):
        if va != vb:
            raise ValueError(f"paired comparison needs the same {what} for both maps, got {va} and {vb}")


def difference(a: CEMResult, b: CEMResult) -> MapDifference:
    """Paired difference of two maps computed with the same seed, task, ROI, grid and patch bank.

    Per block, the paired draws: the fine ones where both models gated the block, else the coarse ones (adaptive:
    every draw both made). Where both maps used the control variate, so does the difference, on the same
    covariates: as the fit is linear in the draws, a block both estimated from the same draws differs by exactly
    ``a.effect - b.effect``. Otherwise the mean of the paired differences."""
    from .intervals import block_estimates
    from .pipeline.covariates import draw_covariates
    _check_paired(a, b)
    rows, cols = a.cem.shape
    c, f = a.samples_coarse.shape[2], a.samples_fine.shape[2]
    d_coarse = (effects(a.psnr_origin, a.samples_coarse) - effects(b.psnr_origin, b.samples_coarse)).reshape(
        rows * cols, c)
    with np.errstate(invalid="ignore"):
        d_fine = (effects(a.psnr_origin, a.samples_fine) - effects(b.psnr_origin, b.samples_fine)).reshape(
            rows * cols, f)
    if a.mode == "adaptive":  # pooled: the coarse draws and the extra draws both made (NaN past a block's own)
        vals = np.concatenate([d_coarse, d_fine], axis=1)
        first = np.zeros(rows * cols, dtype=np.int64)
    else:
        both_fine = (a.gated & b.gated).reshape(-1) & (f > 0)
        width = max(c, f)
        vals = np.full((rows * cols, width), np.nan)
        vals[both_fine, :f] = d_fine[both_fine]
        vals[~both_fine, :c] = d_coarse[~both_fine]
        first = np.where(both_fine, c, 0)
    mask = np.isfinite(vals)
    table = a.covariate_table
    x = None
    if table is not None and np.array_equal(table, b.covariate_table) and vals.shape[1]:
        draws = first[:, None] + np.arange(vals.shape[1])[None, :]
        x = draw_covariates(table, a.seed, np.arange(rows * cols), draws)
    diff, se, df = block_estimates(np.nan_to_num(vals), mask, x)
    draws_used = mask.sum(1)
    with np.errstate(invalid="ignore"):
        half = np.where(draws_used > 1, t975(df) * se, np.inf)
    diff = np.where(draws_used > 0, diff, 0.0)
    name_a, name_b = unique_names([a.model_name, b.model_name])  # two maps of one class: "Net - Net_2"
    return MapDifference(name_a, name_b, diff.reshape(rows, cols), half.reshape(rows, cols),
                         draws_used.reshape(rows, cols), roi_mask=a.roi_mask, tol=float(a.tol))


def save_difference(d: MapDifference, res: CEMResult, out_dir: "str | os.PathLike") -> dict[str, str]:
    """Write diff.npz, diff.json and diff.png (difference map: the ROI left out of its scale, blocks that are not
    significant faded)."""
    from .plotting import difference_figure, save_figure
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "diff.npz", diff=d.diff, half_width=d.half_width, draws=d.draws,
                        significant=d.significant)
    atomic_write(out / "diff.json", lambda f: f.write(json_bytes(d.summary())))
    save_figure(difference_figure(d, res), out / "diff.png")
    return {"npz": "diff.npz", "json": "diff.json", "png": "diff.png"}


def compare_models(models: Sequence, image, names: Optional[Sequence[str]] = None,
                   **kwargs) -> tuple[list[CEMResult], list[MapDifference]]:
    """CEMs of every model on ``image`` with the same draws, and each model's paired difference to the first.
    ``names``: the models' display names (default: their class or spec names); names that repeat are made
    unique (``Upsample``, ``Upsample_2``), and each result's ``model_name`` is its unique name. ``kwargs`` are
    those of :func:`cem_fast.causal_effect_map` (the seed is shared)."""
    from .estimator import causal_effect_map
    if len(models) < 2:
        raise ValueError(f"compare needs at least two models, got {len(models)}")
    if "model_name" in kwargs:
        raise ValueError("compare_models takes names=[...] (one per model), got model_name")
    if names is not None and len(names) != len(models):
        raise ValueError(f"names must give one name per model ({len(models)}), got {len(names)}")
    results = [causal_effect_map(m, image, model_name=None if names is None else str(names[i]), **kwargs)
               for i, m in enumerate(models)]
    for r, name in zip(results, unique_names([r.model_name for r in results])):
        r.model_name = name
    return results, [difference(r, results[0]) for r in results[1:]]
