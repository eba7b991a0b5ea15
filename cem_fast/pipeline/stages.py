"""The stages of a run's interventions (METHOD.md): coarse-to-fine (``coarse`` draws for every block that can
reach a ROI, ``fine`` fresh draws for every block gated by ``tol``), exhaustive (``coarse = 0``) and adaptive
(rounds of draws until each block's interval decides it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..cache import digest_bytes
from ..intervals import UNDECIDED, decide, t975
from ..options import HALF_WIDTH_DB, HALF_WIDTH_REL
from .runner import Runner
from .samples import Samples, effects


def run_draws(runner, stage: str, blocks: np.ndarray, first: int, k: int, n: int) -> np.ndarray:
    """(n, len(blocks), k) ROI PSNRs of draws first..first+k-1 of each of ``blocks`` (``n`` ROIs), one runner call
    (its batches, cache and shards); zeros in that shape when there is nothing to draw."""
    if not (len(blocks) and k):
        return np.zeros((n, len(blocks), k))
    b = torch.from_numpy(np.asarray(blocks)).repeat_interleave(k)
    d = first + torch.arange(k).repeat(len(blocks))
    return runner.run(stage, b, d).reshape(len(blocks), k, n).transpose(2, 0, 1)


def sample_stages(runner: Runner, grid, reach: np.ndarray, psnr_origin: np.ndarray, coarse: int, fine: int,
                  tol: float, covariates=None) -> Samples:
    """Run the coarse stage on every block that reaches some ROI and the fine stage on every block gated for some
    ROI. A block outside a ROI's reach gets Y_k = Y(I) exactly for that ROI (it cannot change it)."""
    n = len(psnr_origin)
    nb = grid.num_blocks
    flat_reach = reach.reshape(n, nb)
    run = runner.order(np.flatnonzero(flat_reach.any(0))) if coarse else np.zeros(0, np.int64)
    # the progress total: every reachable block's fine stage as an upper bound, the real count once gated
    runner.expect(len(run) * coarse + int(flat_reach.any(0).sum()) * fine)
    got_coarse = run_draws(runner, "coarse", run, 0, coarse, n)
    if coarse:
        gated = np.zeros((n, nb), dtype=bool)
        origin = psnr_origin.reshape(n, 1, 1)
        gated[:, run] = (np.abs(effects(origin, got_coarse)) >= tol).any(axis=2) & flat_reach[:, run]
    else:
        gated = np.ones((n, nb), dtype=bool)
    stage = "fine"
    if fine and coarse and n > 1 and (gated & flat_reach).any() and (flat_reach & ~gated).any():
        stage = narrowed_stage(runner, gated & flat_reach)
    fine_run = runner.order(np.flatnonzero((gated & flat_reach).any(0))) if fine else np.zeros(0, np.int64)
    runner.expect(len(run) * coarse + len(fine_run) * fine)
    got_fine = run_draws(runner, stage, fine_run, coarse, fine, n)
    return Samples(run, got_coarse, fine_run, got_fine, gated, flat_reach, np.asarray(psnr_origin, np.float64),
                   covariates=covariates)


def narrowed_stage(runner: Runner, pairs: np.ndarray) -> str:
    """Only the ROIs that gated a block read its fine draws: they compute what they change there alone
    (:meth:`Runner.narrow_to`) and score the other ROIs as unchanged. The stage's name, under which the sample cache
    keeps its rows, carries a digest of ``pairs``: a resumed run whose gates moved (Y(I) recomputed on another
    device, a coarse chunk recomputed) computes its fine stage again instead of reading an unchanged score as the
    sample of a pair that gates now."""
    runner.narrow_to(pairs)
    packed = np.packbits(np.ascontiguousarray(pairs, dtype=bool))
    return "fine-" + digest_bytes(np.array(pairs.shape, "<i8").tobytes(), packed.tobytes())[:16]


ADAPTIVE_STEP = 8  # draws added per round to every block still drawing


@dataclass(frozen=True)
class AdaptiveRule:
    """When adaptive sampling stops: at most ``cap`` extra draws per block, ``budget`` extra forwards in all (None:
    no limit); a block stops once its 95 % interval decides it against ``tol`` and is no wider than
    :func:`stop_targets` (``rel`` of |effect|, at least ``floor_db``)."""

    cap: int
    tol: float
    budget: Optional[int] = None
    rel: float = HALF_WIDTH_REL
    floor_db: float = HALF_WIDTH_DB


def stop_targets(mean: np.ndarray, tol: float, rel: float, floor_db: float) -> np.ndarray:
    """The 95 % half-width a block's interval must reach to stop: ``max(tol, rel * |effect|, floor_db)``."""
    return np.maximum(np.maximum(tol, rel * np.abs(mean)), floor_db)


def _undecided(samples: Samples, run: np.ndarray, drawn: np.ndarray, rule: AdaptiveRule,
               roi_blocks: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per block of ``run``: whether it draws on (too few draws yet, or for some ROI that rates it an undecided or
    too wide interval) and its widest 95 % half-width over those ROIs (0 for a ROI's own blocks)."""
    widest = np.zeros(len(run))
    going = drawn < min(ADAPTIVE_STEP, rule.cap)
    for j in range(samples.origin.shape[0]):
        mean, se, _, df = (a[run] for a in samples.estimate(j))
        on = samples.reach[j][run]
        half = np.where(on, t975(df) * se, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):  # a zero target asks for the cap
            ratio = np.where(half == 0, 0.0, half / stop_targets(mean, rule.tol, rule.rel, rule.floor_db))
        going |= on & ((decide(mean - half, mean + half, rule.tol) == UNDECIDED) | (ratio > 1) | np.isnan(ratio))
        own = roi_blocks[j][run] if roi_blocks is not None else False
        widest = np.maximum(widest, np.where(own, 0.0, np.nan_to_num(half, nan=np.inf)))
    return going, widest


def _next_round(going: np.ndarray, widest: np.ndarray, drawn: np.ndarray, rule: AdaptiveRule,
                left: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    """(blocks of ``run`` that draw in the next round, how many draws each); empty when sampling stops."""
    cap = rule.cap
    active = np.flatnonzero(going & (drawn < cap))
    if left is not None and not len(active):  # every block stopped: the rest of the budget refines
        active = np.flatnonzero((drawn < cap) & (widest > 0))
    if not len(active) or left == 0:
        return active[:0], active[:0]
    if left is not None:  # the widest intervals first, as many as the budget pays a round for
        active = active[np.argsort(-widest[active], kind="stable")]
        cost = np.cumsum(np.minimum(ADAPTIVE_STEP, cap - drawn[active]))
        active = active[:max(1, int(np.searchsorted(cost, left, side="right")))]
    steps = np.minimum(ADAPTIVE_STEP, cap - drawn[active])
    if left is not None and steps.sum() > left:  # one block left, a partial round
        steps = np.minimum(steps, left)
    return active, steps


def sample_adaptive(runner: Runner, grid, reach: np.ndarray, psnr_origin: np.ndarray, coarse: int,
                    rule: AdaptiveRule, covariates=None, roi_blocks: Optional[np.ndarray] = None) -> Samples:
    """The coarse stage, then rounds of ``ADAPTIVE_STEP`` more draws for every block that has not stopped, until
    all have stopped or drawn ``rule.cap`` extra draws. A block stops after at least one round (three draws give no
    interval to trust, measured) once its 95 % interval decides it (above +tol, below -tol or inside (-tol, tol))
    and is no wider than :func:`stop_targets` (a decided sign is not yet a precise value). With ``rule.budget``,
    at most that many extra forwards: the widest intervals draw first, and what is left once every block has
    stopped refines the widest ones further, up to the cap. A ROI's own blocks (``roi_blocks``, (n_rois,
    blocks): not rated, painted green) draw until they stop but are never refined for it. Each block's effect is
    estimated from all its draws. Draws stay keyed by (seed, block, draw index): the first extra draws of a block
    are those coarse-to-fine would make, and a rerun with the same cache reuses them."""
    n, nb, cap = len(psnr_origin), grid.num_blocks, rule.cap
    flat_reach = reach.reshape(n, nb)
    run = runner.order(np.flatnonzero(flat_reach.any(0)))
    runner.expect(len(run) * (coarse + cap) if rule.budget is None else len(run) * coarse + rule.budget)
    got_coarse = run_draws(runner, "coarse", run, 0, coarse, n)
    fine = np.full((n, len(run), cap), np.nan)  # filled in place round by round: ``samples`` reads it
    drawn = np.zeros(len(run), dtype=np.int64)
    gated = np.zeros((n, nb), dtype=bool)
    origin = np.asarray(psnr_origin, np.float64)
    samples = Samples(run, got_coarse, run, fine, gated, flat_reach, origin, drawn, pooled=True,
                      covariates=covariates)
    gated[:, run] = flat_reach[:, run]  # while drawing, every reachable block is read with its draws so far
    spent, rounds = 0, 0
    while True:
        going, widest = _undecided(samples, run, drawn, rule, roi_blocks)
        active, steps = _next_round(going, widest, drawn, rule, None if rule.budget is None else rule.budget - spent)
        if not len(active):
            break
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
