"""The re-check of a reduced-precision run against fp32 on a sample of blocks (same draws, same crop); the mode
around each forward is :func:`cem_fast.pipeline.model.precision_mode`."""
from __future__ import annotations

import numpy as np

from .plan import RunPlan
from .runner import Runner
from .covariates import patch_covariates
from .samples import Samples
from .stages import run_draws

PRECISION_CHECK_BLOCKS = 8


def blocks_to_check(plan: RunPlan, effects: list) -> np.ndarray:
    """The blocks re-run in fp32: the strongest effects, and a few at random among the other reachable ones."""
    strength = np.max([np.abs(e) for e in effects], axis=0).reshape(-1)
    candidates = np.flatnonzero(plan.locality.reach.any(0).reshape(-1))
    top = candidates[np.argsort(-strength[candidates], kind="stable")][:PRECISION_CHECK_BLOCKS // 2]
    rest = np.setdiff1d(candidates, top)
    pick = np.random.RandomState(plan.seed).choice(rest, min(len(rest), PRECISION_CHECK_BLOCKS - len(top)),
                                                   replace=False) if len(rest) else rest
    return np.sort(np.concatenate([top, pick])).astype(np.int64)


def check_precision(plan: RunPlan, effects: list, psnr_origin: np.ndarray, gated: np.ndarray) -> dict:
    """Recompute a sample of blocks in fp32 (same draws, same crop). Reports the largest |CE(precision) -
    CE(fp32)| and the shift of Y(I)."""
    blocks = blocks_to_check(plan, effects)
    runner = Runner(plan, forward=plan.forward.at_precision("fp32"))
    origin32 = runner.origin()
    n = len(plan.rois)
    coarse, fine = plan.options.stages
    gated = np.asarray(gated).reshape(n, -1)
    draws_per_block = coarse + (fine if gated[:, blocks].any() else 0)
    got = run_draws(runner, "precision", blocks, 0, draws_per_block, n)
    # the checked blocks' fp32 samples, read the way the run's were
    fine_run = blocks if draws_per_block > coarse else blocks[:0]
    cv = patch_covariates(plan) if plan.options.estimator == "control-variate" else None
    fp32 = Samples(blocks, got[:, :, :coarse], fine_run, got[:, :len(fine_run), coarse:], gated,
                   plan.locality.reach.reshape(n, -1), origin32, covariates=cv)
    worst = 0.0
    for j in range(n):
        ce32 = fp32.effect(j)[blocks]
        worst = max(worst, float(np.nanmax(np.abs(ce32 - effects[j].reshape(-1)[blocks]))))
    return {"blocks_checked": int(len(blocks)), "max_abs_delta_ce_db": round(worst, 5),
            "psnr_origin_fp32": [float(v) for v in origin32],
            "psnr_origin_delta_db": round(float(np.max(np.abs(psnr_origin - origin32))), 5),
            "forwards": runner.forwards}
