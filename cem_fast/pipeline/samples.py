"""The samples of a run and what they give: the two stages of interventions and the effects.

``CE_ij = Y(I) - mean_k Y(I with block ij <- p_k)``. Every block that can reach some ROI gets ``coarse`` draws;
a block whose largest ``|Y(I) - Y_k|`` reaches ``tol`` for a ROI is gated for it and gets ``fine`` fresh draws,
whose mean replaces the coarse one. Exhaustive mode is ``coarse = 0``: every block gated, ``fine`` draws.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch

from ..geometry import ROI

if TYPE_CHECKING:
    from .runner import Runner


@dataclass
class Samples:
    """What the two stages ran, held for the blocks that ran only (an 8192x8192 input has a million blocks, of
    which about a hundred reach the ROI: dense (blocks, 50) arrays per ROI would cost 400 MB and most of a run).

    ``coarse``: (n_rois, len(run), coarse) ROI PSNRs of the blocks in ``run``; ``fine``: (n_rois, len(fine_run),
    fine) of those in ``fine_run``; ``gated``: (n_rois, blocks); ``reach``: (n_rois, blocks)."""

    run: np.ndarray
    coarse: np.ndarray
    fine_run: np.ndarray
    fine: np.ndarray
    gated: np.ndarray
    reach: np.ndarray
    origin: np.ndarray

    def effect(self, j: int) -> np.ndarray:
        """(blocks,) ROI j's Y(I) - mean Y_k: the fine mean where gated (and fine > 0), else the coarse mean; 0 for
        blocks that cannot reach the ROI (their samples are Y(I) exactly)."""
        nb = self.gated.shape[1]
        out = np.zeros(nb)
        reach, gated, o = self.reach[j], self.gated[j], self.origin[j]
        if self.coarse.shape[2] and len(self.run):
            keep = reach[self.run]
            out[self.run[keep]] = effects(o, self.coarse[j][keep]).mean(axis=-1)
        if self.fine.shape[2] and len(self.fine_run):
            keep = reach[self.fine_run] & gated[self.fine_run]
            out[self.fine_run[keep]] = effects(o, self.fine[j][keep]).mean(axis=-1)
        return out

    def spread(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(blocks,) standard error of ROI j's effect (the sample standard deviation of the draws that made it,
        over the square root of their number: fine draws where gated, else coarse) and (blocks,) that number;
        0 and 0 for blocks that cannot reach the ROI (their effect is exactly 0); NaN with a single draw."""
        nb = self.gated.shape[1]
        se, n = np.zeros(nb), np.zeros(nb, dtype=np.int64)
        reach, gated, o = self.reach[j], self.gated[j], self.origin[j]
        for blocks, vals, keep in ((self.run, self.coarse[j], reach[self.run]),
                                   (self.fine_run, self.fine[j], reach[self.fine_run] & gated[self.fine_run])):
            k = vals.shape[-1]
            if not k or not len(blocks):
                continue
            d = effects(o, vals[keep])
            with np.errstate(invalid="ignore", divide="ignore"):
                se[blocks[keep]] = d.std(axis=-1, ddof=1) / np.sqrt(k) if k > 1 else np.nan
            n[blocks[keep]] = k
        return se, n

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
            if bad.any():
                i, k = np.argwhere(bad)[0]
                return stage, int(bad.sum()), int(blocks[i]), int(k)
        return None


def sample_stages(runner: "Runner", grid, reach: np.ndarray, psnr_origin: np.ndarray, coarse: int, fine: int,
            tol: float) -> Samples:
    """Run the coarse stage on every block that reaches some ROI and the fine stage on every block gated for some
    ROI. A block outside a ROI's reach gets Y_k = Y(I) exactly for that ROI (it cannot change it)."""
    n = len(psnr_origin)
    nb = grid.num_blocks
    flat_reach = reach.reshape(n, nb)
    run = runner.order(np.flatnonzero(flat_reach.any(0))) if coarse else np.zeros(0, np.int64)
    # the progress total: every reachable block's fine stage as an upper bound, the real count once gated
    runner.expect(len(run) * coarse + int(flat_reach.any(0).sum()) * fine)
    got_coarse = np.zeros((n, len(run), coarse))
    if coarse:
        if len(run):
            b = torch.from_numpy(run).repeat_interleave(coarse)
            d = torch.arange(coarse).repeat(len(run))
            got_coarse = runner.run("coarse", b, d).reshape(len(run), coarse, n).transpose(2, 0, 1)
        gated = np.zeros((n, nb), dtype=bool)
        origin = psnr_origin.reshape(n, 1, 1)
        gated[:, run] = (np.abs(effects(origin, got_coarse)) >= tol).any(axis=2) & flat_reach[:, run]
    else:
        gated = np.ones((n, nb), dtype=bool)
    fine_run = runner.order(np.flatnonzero((gated & flat_reach).any(0))) if fine else np.zeros(0, np.int64)
    runner.expect(len(run) * coarse + len(fine_run) * fine)
    got_fine = np.zeros((n, len(fine_run), fine))
    if len(fine_run):
        b = torch.from_numpy(fine_run).repeat_interleave(fine)
        d = coarse + torch.arange(fine).repeat(len(fine_run))
        got_fine = runner.run("fine", b, d).reshape(len(fine_run), fine, n).transpose(2, 0, 1)
    return Samples(run, got_coarse, fine_run, got_fine, gated, flat_reach, np.asarray(psnr_origin, np.float64))


def dense(build: Callable[[int], np.ndarray], j: int, grid) -> np.ndarray:
    return build(j).reshape(grid.rows, grid.cols, -1)


SAMPLE_BYTES = 64  # host bytes per intervention and ROI: scores, done flags, block / draw / id arrays, copies


def available_memory() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_sample_memory(blocks: int, coarse: int, fine: int, n_rois: int) -> None:
    """Refuse, before allocating, a sampling plan whose per-intervention arrays would not fit in host memory."""
    need = blocks * max(coarse, fine, 1) * n_rois * SAMPLE_BYTES
    avail = available_memory()
    if avail is not None and need > avail // 2:
        raise ValueError(f"coarse={coarse}, fine={fine} for {blocks} blocks x {n_rois} ROIs needs about "
                         f"{need / 2**30:.1f} GiB of host memory for the samples, more than half of the "
                         f"{avail / 2**30:.1f} GiB available: lower coarse / fine / samples")


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
