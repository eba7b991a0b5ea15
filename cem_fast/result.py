"""The result of a CEM run: the map, every sample, statistics, and saving to npz / JSON / PNG."""
from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .fileio import atomic_write
from .geometry import ROI, BlockGrid
from .intervals import HELPS, HURTS, NO_EFFECT, UNDECIDED, decide, t975
from .jsonsafe import json_bytes

# Colour-scale bounds of the METHOD.md picture, dB.
DISPLAY_BOUND = {"SR": 2.5, "DN": 1.0, "DR": 2.0}


@dataclass(frozen=True)
class Deferred:
    """An array made on first use: ``shape`` known now, ``build()`` returns it. The per-block samples of a large
    input (a million blocks x 50 draws, almost all of them Y(I) or NaN) are built only if someone reads them."""

    shape: tuple
    build: Any


def _deferrable(name: str) -> property:
    """A CEMResult attribute that may be given as a :class:`Deferred`: built and kept on first read."""
    key = "_" + name

    def get(self):
        value = self.__dict__[key]
        if isinstance(value, Deferred):
            value = self.__dict__[key] = value.build()
        return value

    def set(self, value):
        self.__dict__[key] = value

    return property(get, set, doc=f"{name} (built on first read when given as a Deferred)")


@dataclass
class CEMResult:
    """A Causal Effect Map.

    Attributes:
        cem: (rows, cols) float64 dB, thresholded (|CE| < tol set to 0); ROI blocks keep their values.
        effect: (rows, cols) float64 dB before thresholding.
        samples_coarse: (rows, cols, coarse) ROI PSNRs (dB) of the coarse interventions.
        samples_fine: (rows, cols, fine) ROI PSNRs of the fine interventions, NaN where a block was not gated.
            Both sample arrays may be given as :class:`Deferred`; they are built on first read.
        gated: (rows, cols) bool, blocks that went to the fine stage.
        reachable: (rows, cols) bool, blocks that can reach the ROI (locality probe; all True in exact mode).
            The others ran no forwards: their samples are Y(I) exactly and their CE is 0.
        psnr_origin: Y(I), the ROI PSNR of the unintervened input, dB.
        gt, degraded, output: (3, H, W) / (3, h, w) / (3, H, W) uint8 images for pictures, on the CPU (degraded
            and output may be given as :class:`Deferred`: a GPU run copies them to the host on first read).
        effect_se: (rows, cols) standard error of each block's effect, dB, from the draws that made it (the fine
            draws where gated, else the coarse ones; adaptive: all its draws): the control-variate estimate's
            HC3 error where ``estimator`` is "control-variate" and the block has enough draws, else the sample
            standard deviation over the square root of their number; 0 where the block cannot reach the ROI (its
            effect is exactly 0); NaN with one draw and for coarse-to-fine's screened blocks (:attr:`screened`).
        effect_draws: (rows, cols) int, the number of those draws (0 where the block cannot reach the ROI).
        effect_df: (rows, cols) degrees of freedom of each interval's Student t (None: ``effect_draws - 1``).
        estimator: how effects were estimated from the draws: "control-variate" or "mean".
        covariate_table: (P, q) the control variates of each patch of the bank (control-variate runs; with the
            seed, they give every draw's covariates, so that :func:`cem_fast.compare.difference` pairs them too).
    """

    cem: np.ndarray
    effect: np.ndarray
    samples_coarse: np.ndarray
    samples_fine: np.ndarray
    gated: np.ndarray
    psnr_origin: float
    roi: ROI
    block: int
    scale: int
    tol: float
    task: dict
    seed: int
    mode: str
    model_name: str
    image_name: str
    num_forwards: int
    wall_time: float
    backend: str
    device: str
    patch_bank: dict
    gt: torch.Tensor
    degraded: torch.Tensor
    output: torch.Tensor
    reachable: Optional[np.ndarray] = None
    extra: dict = field(default_factory=dict)
    effect_se: Optional[np.ndarray] = None
    effect_draws: Optional[np.ndarray] = None
    effect_df: Optional[np.ndarray] = None
    estimator: str = "mean"
    covariate_table: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        if self.reachable is None:
            self.reachable = np.ones(self.cem.shape, dtype=bool)

    def interval(self) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) (rows, cols): the 95 % confidence interval of each block's effect, ``effect +- t * se``
        with Student's t for its degrees of freedom (NaN with a single draw, for screened blocks or with no
        uncertainty recorded)."""
        if self.effect_se is None:
            nan = np.full(self.effect.shape, np.nan)
            return nan, nan
        df = self.effect_draws - 1 if self.effect_df is None else self.effect_df
        half = np.where(self.effect_draws > 0, t975(df) * self.effect_se, 0.0)
        return self.effect - half, self.effect + half

    @property
    def screened(self) -> np.ndarray:
        """(rows, cols) bool: coarse-to-fine's blocks that the coarse gate kept out of the fine stage (every
        coarse draw under tol). Their effect is the coarse mean, set to 0 in ``cem``; they carry no interval:
        three draws chosen for their small spread under-cover (measured: benchmarks/results/*convergence*)."""
        if self.effect_se is None or self.mode != "coarse-to-fine" or not self.draws()[1]:
            return np.zeros(self.effect.shape, dtype=bool)  # no fine stage: no gate (coarse = 1 has NaN errors)
        return self.reachable & ~self.gated & (self.effect_draws > 0) & np.isnan(self.effect_se)

    def decided(self) -> np.ndarray:
        """(rows, cols) int8: +1 helps (the interval lies above +tol), -1 hurts (below -tol), 0 no effect (inside
        (-tol, tol), which includes every block that cannot reach the ROI and, by the gate's rule, every
        screened block), 2 undecided."""
        low, high = self.interval()
        out = decide(low, high, self.tol)
        out[self.screened] = NO_EFFECT
        return out

    def uncertainty(self) -> dict[str, Any]:
        """summary.json's account of the uncertainty, ROI blocks excluded."""
        rated = ~self.roi_mask
        screened = self.screened[rated]
        d = self.decided()[rated]
        low, high = self.interval()
        half = ((high - low) / 2)[rated & (self.effect_draws > 0)] if self.effect_draws is not None else \
            np.zeros(0)
        half = half[np.isfinite(half)]
        how = ("the control-variate estimate (regression on the drawn patches' channel means) with its HC3 "
               "standard error where a block has 11 or more draws, else the mean"
               if self.estimator == "control-variate" else "the mean of the draws")
        return {"interval": f"95 % Student-t interval of {how}, from the draws that made each effect (adaptive: "
                            "all its draws; else the fine draws where gated; none where a block cannot reach "
                            "the ROI or was screened by the coarse gate)",
                "estimator": self.estimator,
                "control_variate_blocks": int((self.effect_df < self.effect_draws - 1)[rated].sum())
                if self.effect_df is not None else 0,
                "helps": int((d == HELPS).sum()), "hurts": int((d == HURTS).sum()),
                "no_effect": int(((d == NO_EFFECT) & ~screened).sum()), "screened": int(screened.sum()),
                "undecided": int((d == UNDECIDED).sum()),
                "median_half_width_db": float(np.median(half)) if half.size else None}

    def metrics(self, far_px: Optional[float] = None, n_boot: Optional[int] = None) -> dict[str, Any]:
        """Per-map metrics with 95 % intervals, over the blocks outside the ROI (skipped and screened blocks
        counted apart): the shares of blocks that help / hurt / have no effect / are undecided, the positive and
        negative |CE| masses, the extremes, the distance profile (mean CE and mean |CE| per ring of block-centre
        distance from the ROI, one block wide), the radii within which 50 % and 90 % of the |CE| mass lies and
        the share of the mass beyond ``far_px`` (default: the ROI's larger side). Intervals: a parametric
        bootstrap of each block's effect from its estimate and standard error (Student's t); see
        :mod:`cem_fast.metrics` for every definition. Deterministic: the same map gives the same numbers."""
        from .metrics import BOOT_DRAWS, map_metrics
        return map_metrics(self, far_px=far_px, n_boot=BOOT_DRAWS if n_boot is None else n_boot)

    def draws(self) -> tuple[int, int]:
        """(coarse, fine) draws per block, without building deferred sample arrays."""
        return tuple(int(self.__dict__[k].shape[2]) for k in ("_samples_coarse", "_samples_fine"))

    @property
    def grid(self) -> BlockGrid:
        return BlockGrid(self.gt.shape[-2], self.gt.shape[-1], self.block, self.scale)

    @property
    def roi_mask(self) -> np.ndarray:
        """(rows, cols) bool, blocks overlapping the ROI."""
        return self.grid.roi_blocks(self.roi).numpy()

    def stats(self) -> dict[str, Any]:
        """Counts of positive / negative / zero blocks and the effect range, ROI blocks excluded."""
        outside = ~self.roi_mask
        vals = self.cem[outside]
        rows, cols = self.cem.shape
        out: dict[str, Any] = {
            "blocks": int(rows * cols), "roi_blocks": int((~outside).sum()),
            "positive": int((vals > 0).sum()), "negative": int((vals < 0).sum()), "zero": int((vals == 0).sum()),
            "gated": int(self.gated.sum()), "skipped": int((~self.reachable).sum()),
        }
        n = max(1, vals.size)
        out.update(positive_frac=out["positive"] / n, negative_frac=out["negative"] / n)
        # the strongest helping (max > 0) and hurting (min < 0) blocks; None when there is none (not 0 at [0, 0])
        out.update(max_db=None, max_block=None, min_db=None, min_block=None, range_db=0.0)
        if out["positive"]:
            imax = np.unravel_index(np.argmax(np.where(outside, self.cem, -np.inf)), self.cem.shape)
            out.update(max_db=float(self.cem[imax]), max_block=[int(i) for i in imax])
        if out["negative"]:
            imin = np.unravel_index(np.argmin(np.where(outside, self.cem, np.inf)), self.cem.shape)
            out.update(min_db=float(self.cem[imin]), min_block=[int(i) for i in imin])
        out["range_db"] = (out["max_db"] or 0.0) - (out["min_db"] or 0.0)
        # Radius of influence: distance (output px) from the ROI centre to the farthest block centre with an effect.
        cy, cx = self.roi.y + self.roi.height / 2, self.roi.x + self.roi.width / 2
        r, c = np.nonzero((self.cem != 0) & outside)
        d = np.hypot((r + 0.5) * self.block - cy, (c + 0.5) * self.block - cx)
        out["radius_of_influence_px"] = float(d.max()) if d.size else 0.0
        return out

    def summary(self) -> dict[str, Any]:
        from ._version import __version__
        return {
            "model": self.model_name, "image": self.image_name, "task": self.task,
            "roi": {"y": self.roi.y, "x": self.roi.x, "height": self.roi.height, "width": self.roi.width},
            "block": self.block, "tol": self.tol, "seed": self.seed, "mode": self.mode,
            "coarse": self.draws()[0], "fine": self.draws()[1],
            "grid": list(self.cem.shape), "psnr_origin": _finite_or_str(self.psnr_origin),
            "stats": self.stats(), **({"uncertainty": self.uncertainty()} if self.effect_se is not None else {}),
            "metrics": self.metrics(),
            "num_forwards": self.num_forwards, "wall_time_s": round(self.wall_time, 3),
            "backend": self.backend, "device": self.device, "patch_bank": self.patch_bank,
            "versions": {"cem_fast": __version__, "torch": torch.__version__, "numpy": np.__version__,
                         "python": platform.python_version()},
            **self.extra,
        }

    def display_bound(self) -> float:
        """The paper's colour-scale bound of this map's task, dB (``scale="paper"``)."""
        b = DISPLAY_BOUND.get(str(self.task.get("task")))
        if b is None:
            m = float(np.abs(self.cem).max())
            b = m if m > 0 else 1.0
        return b

    def plot(self, path: Optional["str | os.PathLike"] = None, title: Optional[str] = None,
             scale: "str | float" = "auto", legend: bool = True, dpi: int = 150, zoom: "str | tuple" = "auto",
             background: "float | str | None" = None, locality: bool = False, caption: Optional[bool] = None):
        """The map as a matplotlib Figure, as a paper can use it: the map over the photograph, the ROI outlined in
        green (its interior shows the picture), a colour bar in dB, the strongest helping and hurting blocks
        under it (the caption) and a legend.

        Args:
            path: also save it there, in the format the suffix names: ``.png``, ``.pdf`` or ``.svg`` (vector;
                the map itself stays a pixel image inside it), or any other format matplotlib writes.
            title: default ``"<model> / <image>"``; ``""``: no title.
            scale: the colour scale. ``"auto"`` (default): +-bound with bound the 99th percentile of the non-zero
                |CE| outside the ROI rounded up to 1, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 x 10^k, linear (never 0; an
                all-zero map gets ``tol``); ``"paper"``: the paper's fixed bounds (SR 2.5, DN 1, DR 2 dB; other
                tasks the largest |CE|) with the power law |c|^(1/1.2); a number: that bound in dB, linear.
                Values beyond the bound are clipped, and the bar shows an arrow.
            legend: show the legend (ROI outline, undecided blocks, reach box, scale); ``False`` also drops the
                caption unless ``caption=True``.
            dpi: resolution of the saved picture (png; the pixel image inside pdf / svg).
            zoom: the part of the image shown, snapped to whole blocks. ``"auto"`` (default): the blocks with an
                effect and the ROI with a margin, when they hold a small part of the image (else the whole);
                ``"reach"``: the box of the blocks that can reach the ROI (speed mode; else the whole image);
                ``"full"``: the whole image; ``(y, x, height, width)``: that box in output pixels.
            background: strength of the photograph (grey ground truth) under the map, 0 (white) to 1 (full
                contrast), default 0.6 (``map_pictures.DEFAULT_BACKGROUND``): blocks with no effect show the
                photograph, saturated ones their colour on the bar; ``"paper"``: the paper's 0.9 map + 0.1 degraded
                input.
            locality: draw the grey reach box (speed mode): on whole blocks, every block outside it was
                skipped (cannot reach the ROI, CE = 0). Off by default.
            caption: show the caption (strongest blocks, zoom box) under the map; default: as ``legend``.
        """
        from .plotting import cem_figure, save_figure
        fig = cem_figure(self, title=title, scale=scale, legend=legend, zoom=zoom, background=background,
                         locality=locality, caption=caption)
        if path is not None:
            save_figure(fig, path, dpi=dpi, close=False)
        return fig

    def colour_scale(self, scale: "str | float" = "auto"):
        """The :class:`cem_fast.map_pictures.ColourScale` (bound in dB, gamma) that ``scale`` gives for this map."""
        from .map_pictures import colour_scale
        return colour_scale(scale, [self])

    def save(self, out_dir: "str | os.PathLike", summary_extra: Optional[dict] = None,
             scale: "str | float" = "auto", vector: "str | tuple" = (), zoom: "str | tuple" = "auto",
             background: "float | str | None" = None, locality: bool = False) -> Path:
        """Write result.npz, summary.json and the pictures (cem.png, overlay.png, pie.png, input.png, output.png,
        gt.png) into ``out_dir``; every file is written to a temporary name and renamed. ``scale``: the colour
        scale of cem.png and overlay.png (see :meth:`plot`; summary.json: display_scale says which bound it
        gave); ``vector``: "pdf", "svg" or both, to write cem.pdf / cem.svg beside cem.png; ``zoom``,
        ``background``, ``locality``: cem.png's, as in :meth:`plot`."""
        from . import map_pictures, plotting
        colours = map_pictures.colour_scale(scale, [self])  # all checked before anything is written
        vector = plotting.vector_formats(vector)
        map_pictures.check_background(background)
        map_pictures.zoom_box(self, zoom)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        low, high = self.interval()
        spread = {} if self.effect_se is None else dict(effect_se=self.effect_se, effect_draws=self.effect_draws,
                                                         ci_low=low, ci_high=high, decided=self.decided(),
                                                         screened=self.screened)
        if self.effect_df is not None:
            spread["effect_df"] = self.effect_df
        summary = {**self.summary(), "display_scale": colours.as_dict()}
        if summary_extra:
            summary.update(summary_extra)
        profile = summary["metrics"]["profile"]
        found = {"metrics": np.array(json_bytes(summary["metrics"]).decode()),  # as in summary.json
                 "profile_ring_px": np.array(profile["ring_px"], dtype=np.float64),
                 **{f"profile_{k}": np.array([np.nan if v is None else v for v in profile[k]], dtype=np.float64)
                    for k in ("mean_db", "mean_db_low", "mean_db_high", "mean_abs_db", "mean_abs_db_low",
                              "mean_abs_db_high")}}
        atomic_write(out / "result.npz", lambda f: np.savez_compressed(
            f, **spread, **found, cem=self.cem, effect=self.effect, samples_coarse=self.samples_coarse,
            samples_fine=self.samples_fine, gated=self.gated, reachable=self.reachable,
            psnr_origin=np.float64(self.psnr_origin),
            roi=np.array(self.roi.as_tuple()), block=np.int64(self.block), scale=np.int64(self.scale)))
        atomic_write(out / "summary.json", lambda f: f.write(json_bytes(summary)))
        plotting.save_pictures(self, out, scale=colours, vector=vector, zoom=zoom, background=background,
                               locality=locality)
        from .report import write_report  # the page to look at, beside the files (as the CLI's report)
        write_report(out, [{"model": self.model_name, "image": self.image_name, "dir": ".",
                            "summary": json.loads(json_bytes(summary))}], title=f"CEM of {self.model_name}")
        return out


# after @dataclass: its __init__ assigns these fields through the properties
CEMResult.samples_coarse = _deferrable("samples_coarse")
CEMResult.samples_fine = _deferrable("samples_fine")
CEMResult.degraded = _deferrable("degraded")
CEMResult.output = _deferrable("output")


def _finite_or_str(x: float):
    return x if math.isfinite(x) else str(x)


class CEMResults(list):
    """The maps of many ROIs computed from one set of forward passes (:func:`cem_fast.causal_effect_maps`)."""

    def summary(self) -> dict[str, Any]:
        """The run's summary (that of the first map) with one entry per ROI instead of the per-ROI fields."""
        if not self:
            return {"rois": []}
        per_roi = ("roi", "psnr_origin", "stats", "uncertainty", "metrics")
        common = {k: v for k, v in self[0].summary().items() if k not in per_roi}
        common["rois"] = [{"roi": r.summary()["roi"], "psnr_origin": _finite_or_str(r.psnr_origin),
                           "stats": r.stats(), "metrics": r.metrics(), "folder": roi_folder(i, r.roi),
                           **({"uncertainty": r.uncertainty()} if r.effect_se is not None else {})}
                          for i, r in enumerate(self)]
        return common

    def save(self, out_dir: "str | os.PathLike", scale: "str | float" = "auto", vector: "str | tuple" = ()) -> Path:
        """Each map into ``out_dir/<roi folder>/`` (as :meth:`CEMResult.save`, each on its own ``scale``), plus
        rois.json (the run and every ROI's numbers) and maps.png (all overlays, each labelled with its ROI, on one
        shared scale with one colour bar)."""
        from . import plotting
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for i, r in enumerate(self):
            r.save(out / roi_folder(i, r.roi), scale=scale, vector=vector)
        summary = self.summary()
        atomic_write(out / "rois.json", lambda f: f.write(json_bytes(summary)))
        if self:
            plotting.save_overlay_grid(self, out / "maps.png", scale=scale)
            from .report import write_report
            write_report(out, [{"model": self[0].model_name, "image": self[0].image_name, "dir": ".",
                                "rois": json.loads(json_bytes(summary))}], title=f"CEMs of {self[0].model_name}")
        return out


def roi_folder(index: int, roi: ROI) -> str:
    return f"roi_{index:03d}_y{roi.y}_x{roi.x}_{roi.height}x{roi.width}"
