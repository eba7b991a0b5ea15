"""Assembling a run's results: the pictures, where the time went, and one :class:`CEMResult` per ROI."""
from __future__ import annotations

from functools import partial
from typing import Optional

import numpy as np
import torch

from ..result import CEMResult, CEMResults, Deferred
from .plan import RunPlan
from .runner import Runner
from .samples import Samples, dense


# summary.json: timings_s, seconds per stage: loading and placing the model, the image and the bank; the unintervened
# forward and the locality probe; the engine's planning and check, the batch size and the cache entry; the
# interventions (Y(I) and its check at the end included); the estimates and the precision check; the pictures and
# the results
STAGES = ("prepare", "probe", "engine", "sampling", "estimate", "finish")


def output_picture(plan: RunPlan, window_output: Optional[torch.Tensor]) -> torch.Tensor:
    """(3, H, W) uint8 model output for pictures; without a full forward (large inputs), the crop's output
    ``window_output`` pasted into the degraded input (nearest-upsampled)."""
    if plan.full_output is not None:
        return to_u8(plan.full_output[0])
    s, window, base = plan.task.scale, plan.locality.window, plan.prep.base
    canvas = base.repeat_interleave(s, 1).repeat_interleave(s, 2) if s > 1 else base.clone()
    canvas[:, window.y * s:(window.y + window.h) * s, window.x * s:(window.x + window.w) * s] = \
        window_output.to(canvas.dtype)
    return to_u8(canvas)


def to_u8(t: torch.Tensor) -> torch.Tensor:
    """An image in [0, 1] as uint8 on its device (clamped, x255, rounded), for pictures."""
    x = t.float().clamp(0, 1)  # a new tensor: the rest is in place (an 8192x8192 input is 805 MB a copy)
    return x.mul_(255).round_().to(torch.uint8)


def on_host_later(t: torch.Tensor) -> "torch.Tensor | Deferred":
    """Made on the device now, copied to the host when first read (an 8192x8192 run need not wait for 400 MB of
    copies it may never use)."""
    return t if t.device.type == "cpu" else Deferred(tuple(t.shape), t.cpu)


def pictures(plan: RunPlan, runner: Runner) -> dict:
    return {"output": on_host_later(output_picture(plan, runner.origin_output)),
            "degraded": on_host_later(to_u8(plan.prep.base)),
            "gt": plan.task.crop_to_scale(plan.clean).contiguous()}


def timings(t0: float, marks: dict, wall: float) -> dict:
    """Seconds per stage (:data:`STAGES`) from the time each stage ended (``marks``, the last one's is the wall)."""
    stamps = [t0, *(marks[stage] for stage in STAGES[:-1]), t0 + wall]
    return {stage: round(b - a, 4) for stage, a, b in zip(STAGES, stamps, stamps[1:])}


def run_extra(plan: RunPlan, runner: Runner, times: dict, precision_check: Optional[dict]) -> dict:
    """What summary.json says about how the run went (beyond the map)."""
    o, cache = plan.options, plan.cache
    cropped_from = plan.cropped_from
    return {
        **({"cropped_from": cropped_from} if cropped_from else {}), "reused_from_cache": runner.reused,
        "oom_backoffs": runner.oom_backoffs, "final_batch_size": runner.batch_size,
        "batch_size": o.batch_size if o.auto_batch else int(o.batch_size),
        "precision": o.precision, "locality": plan.locality_summary(), "timings_s": times,
        **({"compile": o.compile} if o.compile else {}),
        **({"precision_check": precision_check} if precision_check else {}),
        **({"rois_in_pass": len(plan.rois)} if len(plan.rois) > 1 else {}),
        **({"cache_entry": str(cache.dir)} if cache is not None else {}),
        **({"cache_note": note} if (note := cache_note(plan)) else {}),
        **({"cache_dropped_chunks": cache.dropped} if cache is not None and cache.dropped else {}),
        **({"output_picture": "model output inside the locality crop only"} if plan.full_output is None else {}),
    }


def cache_note(plan: RunPlan) -> str:
    """Why samples were not reused or not cached: the plan's reasons and the entry's (a chunk that could not be
    written: the run went on without the cache)."""
    failed = plan.cache.failed if plan.cache is not None else None
    return "; ".join(filter(None, [plan.cache_note, failed and f"sample cache skipped from then on: {failed}"]))


def assemble(plan: RunPlan, runner: Runner, sampled: Samples, estimates: list, psnr_origin: np.ndarray,
             pics: dict, extra: dict, wall: float) -> CEMResults:
    """One :class:`CEMResult` per ROI, in order; samples built on first read."""
    o, grid = plan.options, plan.grid
    coarse, fine = o.stages
    gated = sampled.gated.reshape(len(plan.rois), grid.rows, grid.cols)
    bank = plan.bank
    results = CEMResults()
    for j, roi in enumerate(plan.rois):
        effect, se, used, df = (a.reshape(grid.rows, grid.cols) for a in estimates[j])
        results.append(CEMResult(
            cem=np.where(np.abs(effect) >= o.tol, effect, 0.0), effect=effect,
            samples_coarse=Deferred((grid.rows, grid.cols, coarse), partial(dense, sampled.dense_coarse, j, grid)),
            samples_fine=Deferred((grid.rows, grid.cols, fine), partial(dense, sampled.dense_fine, j, grid)),
            gated=gated[j], psnr_origin=float(psnr_origin[j]), roi=roi,
            block=o.block, scale=plan.task.scale, tol=float(o.tol), task=plan.task.describe(), seed=plan.seed,
            mode=o.mode, model_name=plan.name, image_name=plan.image_name,
            num_forwards=runner.forwards + (plan.full_output is not None), wall_time=wall, backend=plan.backend,
            device=str(plan.device),
            patch_bank={"source": bank.source, "size": len(bank), "patch_size": bank.patch_size,
                        "digest": plan.bank_digest},
            gt=pics["gt"], degraded=pics["degraded"], output=pics["output"],
            reachable=plan.locality.reach[j], extra=dict(extra),
            effect_se=se, effect_draws=used, effect_df=df,
            estimator="control-variate" if sampled.covariates is not None else "mean",
            covariate_table=getattr(sampled.covariates, "table", None)))
    return results
