"""Paired comparison of models with common random numbers.

Run with the same seed, every model sees the same interventions (same patches, same noise) for every block and
draw, so the per-draw difference ``(Y_a(I) - Y_a,k) - (Y_b(I) - Y_b,k)`` cancels most of the sampling noise: the
difference map's confidence intervals are far narrower than those of two independent maps.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .pipeline.samples import effects
from .fileio import atomic_write
from .jsonsafe import json_bytes
from .result import CEMResult

Z95 = 1.959963984540054


@dataclass
class MapDifference:
    """``diff`` (rows, cols) dB: CE of model a minus CE of model b, from paired draws; ``half_width`` the 95 %
    confidence half-width (normal approximation; inf with a single draw); ``draws`` the paired draws used;
    ``significant`` where the interval excludes 0."""

    name_a: str
    name_b: str
    diff: np.ndarray
    half_width: np.ndarray
    draws: np.ndarray

    @property
    def significant(self) -> np.ndarray:
        return np.abs(self.diff) > self.half_width

    def summary(self) -> dict[str, Any]:
        return {"a": self.name_a, "b": self.name_b, "max_abs_diff_db": float(np.abs(self.diff).max()),
                "significant_blocks": int(self.significant.sum()),
                "median_half_width_db": float(np.median(self.half_width[np.isfinite(self.half_width)]))
                if np.isfinite(self.half_width).any() else None}


def _check_paired(a: CEMResult, b: CEMResult) -> None:
    for what, va, vb in (("grid", a.cem.shape, b.cem.shape), ("roi", a.roi, b.roi), ("seed", a.seed, b.seed),
                         ("task", a.task, b.task), ("patch bank", a.patch_bank.get("digest"),
                                                    b.patch_bank.get("digest")),
                         ("coarse draws", a.samples_coarse.shape, b.samples_coarse.shape),
                         ("fine draws", a.samples_fine.shape, b.samples_fine.shape)):
        if va != vb:
            raise ValueError(f"paired comparison needs the same {what} for both maps, got {va} and {vb}")


def difference(a: CEMResult, b: CEMResult) -> MapDifference:
    """Paired difference of two maps computed with the same seed, task, ROI, grid and patch bank."""
    _check_paired(a, b)
    ea_c, eb_c = effects(a.psnr_origin, a.samples_coarse), effects(b.psnr_origin, b.samples_coarse)
    both_fine = a.gated & b.gated & (a.samples_fine.shape[2] > 0)
    with np.errstate(invalid="ignore"):
        d_fine = effects(a.psnr_origin, a.samples_fine) - effects(b.psnr_origin, b.samples_fine)
    rows, cols = a.cem.shape
    diff = np.zeros((rows, cols))
    half = np.full((rows, cols), np.inf)
    draws = np.zeros((rows, cols), dtype=np.int64)
    for r in range(rows):  # blocks both models sent to the fine stage pair their fine draws, others the coarse ones
        for c in range(cols):
            dk = d_fine[r, c] if both_fine[r, c] else ea_c[r, c] - eb_c[r, c]
            diff[r, c] = dk.mean() if dk.size else 0.0
            draws[r, c] = dk.size
            if dk.size > 1:
                half[r, c] = Z95 * dk.std(ddof=1) / np.sqrt(dk.size)
    return MapDifference(a.model_name, b.model_name, diff, half, draws)


def save_difference(d: MapDifference, res: CEMResult, out_dir: "str | os.PathLike") -> dict[str, str]:
    """Write diff.npz, diff.json and diff.png (difference map; blocks whose interval contains 0 faded)."""
    from .plotting import difference_figure, _save_fig
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "diff.npz", diff=d.diff, half_width=d.half_width, draws=d.draws,
                        significant=d.significant)
    atomic_write(out / "diff.json", lambda f: f.write(json_bytes(d.summary())))
    _save_fig(difference_figure(d, res), out / "diff.png")
    return {"npz": "diff.npz", "json": "diff.json", "png": "diff.png"}


def compare_models(models: Sequence, image, **kwargs) -> tuple[list[CEMResult], list[MapDifference]]:
    """CEMs of every model on ``image`` with the same draws, and each model's paired difference to the first.
    ``kwargs`` are those of :func:`cem_fast.causal_effect_map` (the seed is shared)."""
    from .estimator import causal_effect_map
    if len(models) < 2:
        raise ValueError(f"compare needs at least two models, got {len(models)}")
    results = [causal_effect_map(m, image, **kwargs) for m in models]
    return results, [difference(r, results[0]) for r in results[1:]]
