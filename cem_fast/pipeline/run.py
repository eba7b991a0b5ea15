"""One CEM run from end to end: plan -> run -> samples -> assemble (see :mod:`cem_fast.pipeline`)."""
from __future__ import annotations

import os
import sys
import time
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..geometry import RoiLike
from ..images import ImageLike
from ..patches import PatchBank
from ..result import CEMResults
from ..tasks import Task
from .assemble import assemble, pictures, run_extra, timings
from .model import eval_for_run, remember_batch_size
from ..options import RunOptions, TaskOptions
from .origin import check_reproduced, refuse_undefined_origin, start_origin
from .plan import RunPlan, budget_line, forward_budget, per_roi_pixels, plan_sampling, prepare
from .precision import check_precision
from .runner import Runner
from .samples import (Samples, patch_covariates, refuse_infinite_effects, refuse_nan_samples, sample_adaptive,
                      sample_stages)


def run_cem(model: Union[nn.Module, str], image: ImageLike, task: Union[str, Task],
            rois: Union[RoiLike, Sequence[RoiLike], None], roi_grid: Optional[int] = None,
            patches: Union[None, str, os.PathLike, PatchBank] = None, options: RunOptions = RunOptions(),
            task_options: TaskOptions = TaskOptions(), model_name: Optional[str] = None,
            image_name: Optional[str] = None) -> CEMResults:
    """The maps of ``model`` for ``rois`` (or every ``roi_grid`` tile) of its output on ``image``. Under a
    ``torch.distributed`` process group each rank computes a share of the interventions, and every rank returns
    the whole result (:mod:`cem_fast.distributed`)."""
    # an error on one rank fails the run on all, and they go on together; the model runs in eval mode throughout
    with distributed.agreed_step("run"), eval_for_run(model) as switched:
        results = _run_cem(model, image, task, rois, roi_grid, patches, options, task_options, model_name,
                           image_name)
    if switched:
        for res in results:
            res.extra["switched_to_eval"] = switched
    return results


def _run_cem(model, image, task, rois, roi_grid, patches, options, task_options, model_name, image_name):
    t0 = time.perf_counter()
    options.check()
    plan = prepare(model, image, task, rois, roi_grid, patches, options, task_options, model_name, image_name)
    plan.progress = sys.stderr.isatty() if options.progress is None else bool(options.progress)
    plan.progress = plan.progress and distributed.is_lead()  # one progress bar for the study
    plan.marks["prepare"] = time.perf_counter()
    with torch.inference_mode():
        plan_sampling(plan)
        plan.marks["probe"] = time.perf_counter()
        budget = forward_budget(plan)
        roi_plan = choose_roi_plan(plan, budget)
        if roi_plan["chosen"] == "per-roi":
            return _run_per_roi(plan, roi_plan)
        plan.say(budget_line(budget, len(plan.rois)))
        runner = Runner(plan, cache=plan.cache, progress=plan.progress)
        try:
            psnr_origin, sampled = _sample(plan, runner)
        finally:
            runner.close()
        if plan.batch_key is not None:
            remember_batch_size(plan.model, plan.batch_key, runner.batch_size)
        refuse_nan_samples(sampled, plan.grid, plan.name)
        origin_check = check_reproduced(plan, runner, psnr_origin)  # the model gives Y(I) again at the end
        plan.marks["sampling"] = time.perf_counter()
        grid = plan.grid
        estimates = [sampled.estimate(j) for j in range(len(plan.rois))]  # (effect, se, draws, df) per ROI
        effects = [e[0].reshape(grid.rows, grid.cols) for e in estimates]
        for j, e in enumerate(effects):
            refuse_infinite_effects(e, float(psnr_origin[j]), plan.rois[j], plan.name)
        precision_check = None
        if options.precision != "fp32" and options.mode == "adaptive":
            precision_check = {"skipped": "adaptive mode (its draws depend on the decisions; not re-run in fp32)"}
        elif options.precision != "fp32":
            precision_check = check_precision(plan, effects, psnr_origin, sampled.gated)
        pics = pictures(plan, runner)
    wall = time.perf_counter() - t0
    extra = run_extra(plan, runner, timings(t0, plan.marks, wall), precision_check)
    extra["origin_check"] = origin_check
    extra["plan"] = {**budget, **({"rois": roi_plan} if len(plan.rois) > 1 else {})}
    if runner.by_rank is not None:
        extra["distributed"] = {"world_size": len(runner.by_rank), "interventions_per_rank": runner.by_rank.tolist()}
    return assemble(plan, runner, sampled, estimates, psnr_origin, pics, extra, wall)


PER_ROI_MARGIN = 1.25  # one run per ROI also probes each ROI: chosen only when clearly cheaper


def choose_roi_plan(plan: RunPlan, budget: dict) -> dict:
    """Many ROIs: one shared pass (every intervention of the union's reachable blocks, on the crop of the union)
    or one run per ROI (each on its own crop), whichever moves fewer input pixels (counted, before running)."""
    if len(plan.rois) == 1:
        return {"chosen": "shared"}
    shared = plan.windows.pixels() if plan.windows is not None else budget["blocks"] * budget["input_px_per_forward"]
    per_roi = per_roi_pixels(plan)  # without locality every ROI reaches every block: n x the shared pass
    asked = plan.options.roi_plan
    chosen = asked if asked != "auto" else ("per-roi" if per_roi * PER_ROI_MARGIN < shared else "shared")
    why = "asked (roi_plan)" if asked != "auto" else \
        f"counted input pixels per draw: shared pass {shared:,}, one run per ROI {per_roi:,}"
    if plan.shared_too_big:
        chosen, why = "per-roi", plan.shared_too_big
    return {"chosen": chosen, "why": why, "shared_px_per_draw": int(shared), "per_roi_px_per_draw": int(per_roi)}


def _run_per_roi(plan: RunPlan, roi_plan: dict) -> CEMResults:
    """One run per ROI, each exactly the single-ROI run (its own locality crop, cache entry and draws)."""
    plan.say(f"{len(plan.rois)} ROIs as one run each ({roi_plan['why']})")
    results = CEMResults()
    for j, roi in enumerate(plan.rois):
        one = run_cem(plan.model, plan.clean, plan.task, [roi.as_tuple()], None, plan.bank, plan.options,
                      plan.task_options, model_name=plan.name, image_name=plan.image_name)[0]
        one.extra["plan"]["rois"] = {**roi_plan, "roi_index": j, "rois": len(plan.rois)}
        results.append(one)
    return results


def _sample(plan: RunPlan, runner: Runner) -> tuple[np.ndarray, Samples]:
    """Y(I) per ROI (from the whole-input output when the run is not cropped) and the two stages' samples."""
    psnr_origin = distributed.from_rank0(start_origin(plan, runner), "Y(I)")  # every rank gates alike
    refuse_undefined_origin(plan, psnr_origin)
    o = plan.options
    coarse, fine = o.stages
    cv = patch_covariates(plan) if o.estimator == "control-variate" else None
    if o.mode == "adaptive":
        return psnr_origin, sample_adaptive(runner, plan.grid, plan.locality.reach, psnr_origin, coarse, fine,
                                            o.tol, o.budget, o.half_width_rel_or_default,
                                            o.half_width_db_or_default, covariates=cv,
                                            roi_blocks=np.stack([plan.grid.roi_blocks(r).numpy().reshape(-1)
                                                                 for r in plan.rois]))
    return psnr_origin, sample_stages(runner, plan.grid, plan.locality.reach, psnr_origin, coarse, fine, o.tol,
                                      covariates=cv)
