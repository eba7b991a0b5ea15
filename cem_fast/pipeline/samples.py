"""The samples of a run and what they give: the effects, their errors, and the refusals of samples no map may
average (the stages that draw them: :mod:`.stages`).

``CE_ij = Y(I) - mean_k Y(I with block ij <- p_k)``. Every block that can reach some ROI gets ``coarse`` draws;
a block whose largest ``|Y(I) - Y_k|`` reaches ``tol`` for a ROI is gated for it and gets ``fine`` fresh draws,
whose mean replaces the coarse one. Exhaustive mode is ``coarse = 0``: every block gated, ``fine`` draws.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from ..geometry import ROI
from ..intervals import block_estimates


@dataclass
class Samples:
    """What the two stages ran, held for the blocks that ran only (an 8192x8192 input has a million blocks, of
    which about a hundred reach the ROI: dense (blocks, 50) arrays per ROI would cost 400 MB and most of a run).

    ``coarse``: (n_rois, len(run), coarse) ROI PSNRs of the blocks in ``run``; ``fine``: (n_rois, len(fine_run),
    fine) of those in ``fine_run``; ``gated``: (n_rois, blocks); ``reach``: (n_rois, blocks).

    Adaptive mode (``pooled``): a block's effect is estimated from all its draws, coarse and later ones, and
    ``fine_drawn`` (len(fine_run),) says how many of the ``fine`` columns each block drew (the rest are padding).

    ``covariates(blocks (B,), draws (B, K)) -> (B, K, q)``: each draw's control variates (:func:`.covariates.patch_covariates`),
    or None for plain means."""

    run: np.ndarray
    coarse: np.ndarray
    fine_run: np.ndarray
    fine: np.ndarray
    gated: np.ndarray
    reach: np.ndarray
    origin: np.ndarray
    fine_drawn: Optional[np.ndarray] = None
    pooled: bool = False
    covariates: Optional[Callable[[np.ndarray, np.ndarray], np.ndarray]] = None
    _tables: dict = field(default_factory=dict, repr=False)  # (first draw, draws) -> (blocks, covariates)

    def _groups(self, j: int):
        """ROI j's reachable blocks by the draws that make their effect: (blocks, ROI PSNRs (B, K), which are real
        (B, K), draw indices (B, K), screened). Coarse-to-fine: the fine draws where gated, else the coarse ones
        (screened: the gate chose them for their small spread); exhaustive: its draws; adaptive: all a block's
        draws, coarse ones included."""
        reach, gated, c = self.reach[j], self.gated[j], self.coarse.shape[2]
        kf = self.fine.shape[2]
        in_fine = np.zeros(len(reach), dtype=bool)
        groups = []
        if kf and len(self.fine_run):
            keep = reach[self.fine_run] & gated[self.fine_run]
            blocks = self.fine_run[keep]
            in_fine[blocks] = True
            vals = self.fine[j][keep]
            draws = np.broadcast_to(c + np.arange(kf), vals.shape)
            mask = np.ones(vals.shape, dtype=bool)
            if self.pooled:  # all the block's draws: its coarse ones, then those it drew of the padded ``fine``
                row = np.full(len(reach), -1)
                row[self.run] = np.arange(len(self.run))
                vals = np.concatenate([self.coarse[j][row[blocks]], vals], axis=1)
                draws = np.broadcast_to(np.arange(c + kf), vals.shape)
                mask = np.arange(c + kf)[None, :] < (c + self.fine_drawn[keep])[:, None]
            groups.append((blocks, vals, mask, draws, False))
        if c and len(self.run):
            keep = reach[self.run] & ~in_fine[self.run]
            vals = self.coarse[j][keep]
            screened = bool(kf) and not self.pooled
            groups.append((self.run[keep], vals, np.ones(vals.shape, dtype=bool),
                           np.broadcast_to(np.arange(c), vals.shape), screened))
        return groups

    def estimate(self, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(blocks,) ROI j's effect Y(I) - E[Y_k], its standard error, the number of draws behind it and the
        degrees of freedom of its interval (:func:`cem_fast.intervals.block_estimates`: the control-variate
        estimate where ``covariates`` is given and a block has enough draws, else the mean). Blocks that cannot
        reach the ROI: 0, 0, 0 (their samples are Y(I) exactly). Coarse-to-fine's screened blocks (not gated):
        the coarse mean with standard error NaN: three draws chosen for their small spread give no interval we
        could defend."""
        nb = self.gated.shape[1]
        effect, se, n, df = np.zeros(nb), np.zeros(nb), np.zeros(nb, dtype=np.int64), np.zeros(nb)
        for blocks, vals, mask, draws, screened in self._groups(j):
            if not len(blocks) or not vals.shape[1]:
                continue
            x = self._covariates_of(blocks, int(draws[0, 0]), draws.shape[1]) \
                if self.covariates is not None and not screened else None
            m, s, f = block_estimates(effects(self.origin[j], vals), mask, x)
            effect[blocks], se[blocks], df[blocks] = m, (np.nan if screened else s), f
            n[blocks] = mask.sum(1)
        return effect, se, n, df

    def _covariates_of(self, blocks: np.ndarray, first: int, width: int) -> np.ndarray:
        """(len(blocks), width, q) covariates of draws first..first+width-1 of ``blocks``: computed once for every
        block that ran, shared by every ROI and every adaptive round (the draws of a block never change)."""
        key = (first, width)
        if key not in self._tables:
            ran = np.union1d(self.run, self.fine_run).astype(np.int64)
            draws = np.broadcast_to(first + np.arange(width), (len(ran), width))
            self._tables[key] = (ran, self.covariates(ran, draws))
        ran, table = self._tables[key]
        return table[np.searchsorted(ran, blocks)]

    def effect(self, j: int) -> np.ndarray:
        """(blocks,) ROI j's effect (see :meth:`estimate`)."""
        return self.estimate(j)[0]

    def dense_coarse(self, j: int) -> np.ndarray:
        """(blocks, coarse): the samples, Y(I) for blocks that cannot reach ROI j."""
        o = self.origin[j]
        out = np.full((self.gated.shape[1], self.coarse.shape[2]), o)
        if len(self.run):
            out[self.run] = np.where(self.reach[j][self.run][:, None], self.coarse[j], o)
        return out

    def dense_fine(self, j: int) -> np.ndarray:
        """(blocks, fine): the samples of gated blocks (Y(I) for gated blocks that cannot reach ROI j, in exhaustive
        mode), NaN for the others."""
        o, gated, reach = self.origin[j], self.gated[j], self.reach[j]
        out = np.full((self.gated.shape[1], self.fine.shape[2]), np.nan)
        out[gated & ~reach] = o
        if len(self.fine_run):
            fr = self.fine_run
            vals = np.where(reach[fr][:, None], self.fine[j], o)
            out[fr] = np.where(gated[fr][:, None], vals, np.nan)
        return out

    def first_nan(self, j: int) -> Optional[tuple[str, int, int, int]]:
        """(stage, count, block, draw) of ROI j's NaN samples among those that ran for it, or None."""
        reach, gated = self.reach[j], self.gated[j]
        for stage, blocks, vals, used in (("coarse", self.run, self.coarse[j], reach[self.run]),
                                          ("fine", self.fine_run, self.fine[j],
                                           reach[self.fine_run] & gated[self.fine_run])):
            bad = np.isnan(vals) & used[:, None] if vals.size else np.zeros(vals.shape, bool)
            if stage == "fine" and self.fine_drawn is not None and vals.size:  # adaptive: padding is not a sample
                bad &= np.arange(vals.shape[-1])[None, :] < self.fine_drawn[:, None]
            if bad.any():
                i, k = np.argwhere(bad)[0]
                return stage, int(bad.sum()), int(blocks[i]), int(k)
        return None


def dense(build: Callable[[int], np.ndarray], j: int, grid) -> np.ndarray:
    return build(j).reshape(grid.rows, grid.cols, -1)


def refuse_infinite_effects(effect: np.ndarray, psnr_origin: float, roi: ROI, name: str) -> None:
    """An infinite Y(I) (the model reproduces the ROI exactly) or an intervention that makes the ROI exact gives
    infinite effects: no map in dB can show them, so say so instead of writing inf."""
    bad = np.isinf(effect)
    if not bad.any():
        return
    r, c = (int(i) for i in np.argwhere(bad)[0])
    why = ("the model reproduces the ground truth exactly there (MSE 0), so Y(I) is infinite" if
           math.isinf(psnr_origin) else "some interventions make the model reproduce it exactly (PSNR inf)")
    raise ValueError(f"roi (y={roi.y}, x={roi.x}, {roi.height}x{roi.width}) of model {name}: {why}; the effect of "
                     f"{int(bad.sum())} block(s) is infinite (first: block ({r}, {c})): choose an ROI or image "
                     "the model does not restore perfectly")


def effects(psnr_origin: float, samples: np.ndarray) -> np.ndarray:
    """Y(I) - Y_k per sample, with an exact match on both sides (inf - inf) counted as no effect."""
    with np.errstate(invalid="ignore"):
        d = psnr_origin - samples
    both_inf = np.isinf(samples) & (samples == psnr_origin)
    return np.where(both_inf, 0.0, d)


def refuse_nan_samples(sampled: Samples, grid, name: str) -> None:
    """Interventions whose output holds NaN/Inf in a ROI: said, never averaged into a map."""
    for j in range(sampled.origin.shape[0]):
        bad = sampled.first_nan(j)
        if bad is not None:
            stage, count, b, k = bad
            r, c = divmod(b, grid.cols)
            raise ValueError(f"model {name} produced NaN/Inf outputs in the ROI for {count} {stage} "
                             f"interventions (first: block ({r}, {c}), draw {k}); refusing to average them")
