"""The samples of a run and what they give: the two stages of interventions and the effects.

``CE_ij = Y(I) - mean_k Y(I with block ij <- p_k)``. Every block that can reach some ROI gets ``coarse`` draws;
a block whose largest ``|Y(I) - Y_k|`` reaches ``tol`` for a ROI is gated for it and gets ``fine`` fresh draws,
whose mean replaces the coarse one. Exhaustive mode is ``coarse = 0``: every block gated, ``fine`` draws.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch

from ..geometry import ROI
from ..options import HALF_WIDTH_DB, HALF_WIDTH_REL, intervention_ids

if TYPE_CHECKING:
    from .runner import Runner


@dataclass
class Samples:
    """What the two stages ran, held for the blocks that ran only (an 8192x8192 input has a million blocks, of
    which about a hundred reach the ROI: dense (blocks, 50) arrays per ROI would cost 400 MB and most of a run).

    ``coarse``: (n_rois, len(run), coarse) ROI PSNRs of the blocks in ``run``; ``fine``: (n_rois, len(fine_run),
    fine) of those in ``fine_run``; ``gated``: (n_rois, blocks); ``reach``: (n_rois, blocks).

    Adaptive mode (``pooled``): a block's effect is estimated from all its draws, coarse and later ones, and
    ``fine_drawn`` (len(fine_run),) says how many of the ``fine`` columns each block drew (the rest are padding).

    ``covariates(blocks (B,), draws (B, K)) -> (B, K, q)``: each draw's control variates (:func:`patch_covariates`),
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
        from ..intervals import block_estimates
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


def sample_stages(runner: "Runner", grid, reach: np.ndarray, psnr_origin: np.ndarray, coarse: int, fine: int,
                  tol: float, covariates=None) -> Samples:
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
    return Samples(run, got_coarse, fine_run, got_fine, gated, flat_reach, np.asarray(psnr_origin, np.float64),
                   covariates=covariates)


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


ADAPTIVE_STEP = 8  # draws added per round to every block still drawing


def stop_targets(mean: np.ndarray, tol: float, rel: float, floor_db: float) -> np.ndarray:
    """The 95 % half-width a block's interval must reach to stop: ``max(tol, rel * |effect|, floor_db)``."""
    return np.maximum(np.maximum(tol, rel * np.abs(mean)), floor_db)


def sample_adaptive(runner: "Runner", grid, reach: np.ndarray, psnr_origin: np.ndarray, coarse: int, cap: int,
                    tol: float, budget: Optional[int] = None, rel: float = HALF_WIDTH_REL,
                    floor_db: float = HALF_WIDTH_DB, covariates=None,
                    roi_blocks: Optional[np.ndarray] = None) -> Samples:
    """The coarse stage, then rounds of ``ADAPTIVE_STEP`` more draws for every block that has not stopped, until
    all have stopped or drawn ``cap`` extra draws. A block stops after at least one round (three draws give no
    interval to trust, measured) once its 95 % interval decides it (above +tol, below -tol or inside (-tol, tol))
    and is no wider than :func:`stop_targets` (a decided sign is not yet a precise value). With ``budget``, at
    most that many extra forwards: the widest intervals draw first, and what is left once every block has
    stopped refines the widest ones further, up to ``cap``. A ROI's own blocks (``roi_blocks``, (n_rois,
    blocks): not rated, painted green) draw until they stop but are never refined for it. Each block's effect is
    estimated from all its draws. Draws stay keyed by (seed, block, draw index): the first extra draws of a block
    are those coarse-to-fine would make, and a rerun with the same cache reuses them."""
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
    origin = np.asarray(psnr_origin, np.float64)
    samples = Samples(run, got_coarse, run, fine, gated, flat_reach, origin, drawn, pooled=True,
                      covariates=covariates)
    gated[:, run] = flat_reach[:, run]  # while drawing, every reachable block is read with its draws so far
    spent, rounds = 0, 0
    min_extra = min(ADAPTIVE_STEP, cap)
    while True:
        widest = np.zeros(len(run))  # per block, its widest 95 % half-width over the ROIs that rate it
        going = drawn < min_extra
        for j in range(n):
            mean, se, _, df = (a[run] for a in samples.estimate(j))
            on = flat_reach[j][run]
            half = np.where(on, t975(df) * se, 0.0)
            with np.errstate(divide="ignore", invalid="ignore"):  # a zero target asks for the cap
                ratio = np.where(half == 0, 0.0, half / stop_targets(mean, tol, rel, floor_db))
            going |= on & ((decide(mean - half, mean + half, tol) == UNDECIDED) | (ratio > 1) | np.isnan(ratio))
            own = roi_blocks[j][run] if roi_blocks is not None else False
            widest = np.maximum(widest, np.where(own, 0.0, np.nan_to_num(half, nan=np.inf)))
        left = None if budget is None else budget - spent
        active = np.flatnonzero(going & (drawn < cap))
        if left is not None and not len(active):  # every block stopped: the rest of the budget refines
            active = np.flatnonzero((drawn < cap) & (widest > 0))
        if not len(active) or left == 0:
            break
        if left is not None:  # the widest intervals first, as many as the budget pays a round for
            active = active[np.argsort(-widest[active], kind="stable")]
            cost = np.cumsum(np.minimum(ADAPTIVE_STEP, cap - drawn[active]))
            active = active[:max(1, int(np.searchsorted(cost, left, side="right")))]
        steps = np.minimum(ADAPTIVE_STEP, cap - drawn[active])
        if left is not None and steps.sum() > left:  # one block left, a partial round
            steps = np.minimum(steps, left)
        rounds += 1
        blocks = np.repeat(run[active], steps)
        first = np.repeat(np.cumsum(steps) - steps, steps)
        draws = coarse + np.repeat(drawn[active], steps) + np.arange(int(steps.sum())) - first
        got = runner.run(f"adaptive{rounds}", torch.from_numpy(blocks), torch.from_numpy(draws))
        at = 0
        for a, k in zip(active, steps):
            fine[:, a, drawn[a]:drawn[a] + k] = got[at:at + k].T
            at += k
        drawn[active] += steps
        spent += int(steps.sum())
    extra = drawn > 0
    gated[:] = False
    gated[:, run[extra]] = flat_reach[:, run[extra]]
    return Samples(run, got_coarse, run[extra], fine[:, extra], gated, flat_reach, origin, drawn[extra],
                   pooled=True, covariates=covariates)


def covariate_table(bank_in: torch.Tensor) -> np.ndarray:
    """(P, q) the control variates of each patch of the bank (as pasted into the input): its mean per channel,
    centred on the mean over the bank, reduced to independent columns (a grey bank's three equal channel means
    are one covariate, not a singular fit; the rotation onto the principal directions leaves the intercept and
    its HC3 error unchanged)."""
    bank = bank_in.detach().to("cpu", torch.float64)
    means = bank.mean(dim=tuple(range(2, bank.dim()))).numpy()
    means = means - means.mean(axis=0)
    _, sv, vt = np.linalg.svd(means, full_matrices=False)
    return means @ vt[:int((sv > 1e-9 * max(sv.max(initial=0.0), 1e-300)).sum())].T


def draw_covariates(table: np.ndarray, seed: int, blocks: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """(B, K, q) the covariates of draws ``draws`` (B, K) of ``blocks`` (B,): the rows of ``table`` of the patches
    those draws use (keyed by (seed, block, draw), as the runner draws them)."""
    from ..rng import patch_draws
    ids = intervention_ids(np.asarray(blocks, np.int64)[:, None], np.asarray(draws, np.int64))
    pidx = patch_draws(seed, torch.from_numpy(ids.reshape(-1)), len(table)).numpy()
    return table[pidx].reshape(ids.shape + (table.shape[1],))


def patch_covariates(plan) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The control variates of a run's draws (:func:`covariate_table`): each drawn patch's brightness and colour
    explain much of a block's effect (a median R^2 of 0.71 for blocks with |CE| >= 0.1 dB on the shipped SR and
    DN defaults), and their mean over the bank is known exactly (draws are uniform over it), so the regression
    on them removes that part of the noise. The table is kept as ``.table`` (results carry it, for compare)."""
    table = covariate_table(plan.bank_in)

    def covariates(blocks: np.ndarray, draws: np.ndarray) -> np.ndarray:
        return draw_covariates(table, plan.seed, blocks, draws)
    covariates.table = table
    return covariates
