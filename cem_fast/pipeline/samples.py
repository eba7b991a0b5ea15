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
    fine) of those in ``fine_run``; ``gated``: (n_rois, blocks); ``reach``: (n_rois, blocks).

    Adaptive mode (``pooled``): a block's effect is the mean of all its draws, coarse and later ones, and
    ``fine_drawn`` (len(fine_run),) says how many of the ``fine`` columns each block drew (the rest are padding)."""

    run: np.ndarray
    coarse: np.ndarray
    fine_run: np.ndarray
    fine: np.ndarray
    gated: np.ndarray
    reach: np.ndarray
    origin: np.ndarray
    fine_drawn: Optional[np.ndarray] = None
    pooled: bool = False

    def _pooled(self, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Adaptive mode, ROI j: (blocks, mean, standard error, draws) of the blocks that drew more than the
        coarse stage, over all their draws."""
        keep = self.reach[j][self.fine_run] & self.gated[j][self.fine_run]
        blocks = self.fine_run[keep]
        row = np.full(self.gated.shape[1], -1)
        row[self.run] = np.arange(len(self.run))
        o = self.origin[j]
        d = np.concatenate([effects(o, self.coarse[j][row[blocks]]), effects(o, self.fine[j][keep])], axis=1)
        c = self.coarse.shape[2]
        mask = np.arange(d.shape[1])[None, :] < (c + self.fine_drawn[keep])[:, None]
        n = mask.sum(1)
        mean = np.where(mask, d, 0.0).sum(1) / n
        with np.errstate(invalid="ignore", divide="ignore"):
            se = np.sqrt(np.where(mask, (d - mean[:, None]) ** 2, 0.0).sum(1) / (n - 1) / n)
        return blocks, mean, se, n

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
            if self.pooled:
                blocks, mean, _, _ = self._pooled(j)
                out[blocks] = mean
                return out
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
        if self.pooled and self.fine.shape[2] and len(self.fine_run):
            blocks, _, pooled_se, pooled_n = self._pooled(j)
            se[blocks], n[blocks] = pooled_se, pooled_n
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
            if stage == "fine" and self.fine_drawn is not None and vals.size:  # adaptive: padding is not a sample
                bad &= np.arange(vals.shape[-1])[None, :] < self.fine_drawn[:, None]
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


WINDOW_TABLE_BYTES = 48  # host bytes per reachable block and ROI of the windows' tables (changed rectangles)


def shared_pass_bytes(blocks: int, coarse: int, fine: int, n_rois: int) -> int:
    """Host bytes that one pass serving ``n_rois`` ROIs holds per (block, ROI): samples and the windows' tables."""
    return blocks * n_rois * (max(coarse, fine, 1) * SAMPLE_BYTES + WINDOW_TABLE_BYTES)


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


ADAPTIVE_STEP = 8  # draws added per round to every undecided block
# None: a block stops once decided (the rule: fewest forwards); a fraction: it also needs its 95 %
# half-width within that fraction of |effect| (or tol) - measured in benchmarks/results/*convergence*
ADAPTIVE_PRECISION: Optional[float] = None


def sample_adaptive(runner: "Runner", grid, reach: np.ndarray, psnr_origin: np.ndarray, coarse: int, cap: int,
                    tol: float, budget: Optional[int] = None) -> Samples:
    """The coarse stage, then rounds of ``ADAPTIVE_STEP`` more draws for every block still undecided for some ROI
    (its 95 % interval neither above +tol, below -tol, nor inside (-tol, tol)), until every block is decided, has
    ``cap`` extra draws, or ``budget`` extra forwards are spent (the widest intervals first). A block's effect is
    the mean of all its draws. Draws stay keyed by (seed, block, draw index): the first extra draws of a block are
    those coarse-to-fine would make."""
    from ..intervals import UNDECIDED, decide, t975
    n, nb = len(psnr_origin), grid.num_blocks
    flat_reach = reach.reshape(n, nb)
    run = runner.order(np.flatnonzero(flat_reach.any(0)))
    runner.expect(len(run) * (coarse + cap) if budget is None else len(run) * coarse + budget)
    got_coarse = np.zeros((n, len(run), coarse))
    if len(run):
        b = torch.from_numpy(run).repeat_interleave(coarse)
        got_coarse = runner.run("coarse", b, torch.arange(coarse).repeat(len(run))).reshape(
            len(run), coarse, n).transpose(2, 0, 1)
    fine = np.full((n, len(run), cap), np.nan)
    drawn = np.zeros(len(run), dtype=np.int64)
    gated = np.zeros((n, nb), dtype=bool)
    samples = Samples(run, got_coarse, run, fine, gated, flat_reach, np.asarray(psnr_origin, np.float64), drawn,
                      pooled=True)
    spent, rounds = 0, 0
    gated[:, run] = flat_reach[:, run]  # while drawing, _pooled reads every reachable block with its draws so far
    while True:
        undecided = np.zeros(len(run), dtype=bool)
        width = np.zeros(len(run))
        for j in range(n):
            _, mean, se, k = samples._pooled(j)  # the reachable blocks of ROI j, in the order of run
            idx = np.flatnonzero(flat_reach[j][run])
            half = t975(k - 1) * se
            lost = decide(mean - half, mean + half, tol) == UNDECIDED
            if ADAPTIVE_PRECISION is not None:
                lost |= half > np.maximum(tol, ADAPTIVE_PRECISION * np.abs(mean))
            undecided[idx] |= lost
            width[idx] = np.maximum(width[idx], np.where(lost, half, 0))
        active = np.flatnonzero(undecided & (drawn < cap))
        left = None if budget is None else budget - spent
        if not len(active) or left == 0:
            break
        step = min(ADAPTIVE_STEP, cap - int(drawn[active].min()))
        if left is not None and len(active) * step > left:  # the widest intervals first
            active = active[np.argsort(-width[active], kind="stable")][:max(1, left // step)]
            step = min(step, left // len(active)) or 1
        rounds += 1
        blocks = np.repeat(run[active], step)
        draws = coarse + np.repeat(drawn[active], step) + np.tile(np.arange(step), len(active))
        got = runner.run(f"adaptive{rounds}", torch.from_numpy(blocks), torch.from_numpy(draws))
        got = got.reshape(len(active), step, n).transpose(2, 0, 1)
        for i, a in enumerate(active):
            fine[:, a, drawn[a]:drawn[a] + step] = got[:, i]
        drawn[active] += step
        spent += len(active) * step
    extra = drawn > 0
    gated[:] = False
    gated[:, run[extra]] = flat_reach[:, run[extra]]
    return Samples(run, got_coarse, run[extra], fine[:, extra], gated, flat_reach,
                   np.asarray(psnr_origin, np.float64), drawn[extra], pooled=True)
