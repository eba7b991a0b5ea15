"""One CEM run from end to end: plan -> engine -> run -> samples -> assemble (see :mod:`cem_fast.pipeline`)."""
from __future__ import annotations

import os
import time
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..geometry import RoiLike
from ..images import ImageLike
from ..options import RunOptions, TaskOptions
from ..patches import PatchBank
from ..result import CEMResults
from ..tasks import Task
from ..threads import fitted_threads
from .assemble import assemble, pictures, run_extra, timings
from .budget import budget_line, choose_roi_plan, forward_budget
from .covariates import patch_covariates
from .engines.select import choose_engine
from .memory import check_sample_memory
from .model import eval_for_run, remember_batch_size
from .origin import check_reproduced, refuse_undefined_origin, start_origin
from .plan import RunPlan, open_cache, plan_sampling, prepare, reachable_blocks, size_batches
from .precision import check_precision
from .request import RunRequest
from .runner import Runner
from .samples import Samples, refuse_infinite_effects, refuse_nan_samples
from .stages import AdaptiveRule, sample_adaptive, sample_stages


def run_cem(model: Union[nn.Module, str], image: ImageLike, task: Union[str, Task],
            rois: Union[RoiLike, Sequence[RoiLike], None], roi_grid: Optional[int] = None,
            patches: Union[None, str, os.PathLike, PatchBank] = None, options: RunOptions = RunOptions(),
            task_options: TaskOptions = TaskOptions(), model_name: Optional[str] = None,
            image_name: Optional[str] = None) -> CEMResults:
    """The maps of ``model`` for ``rois`` (or every ``roi_grid`` tile) of its output on ``image``. Under a
    ``torch.distributed`` process group each rank computes a share of the interventions, and every rank returns
    the whole result (:mod:`cem_fast.distributed`)."""
    return run_request(RunRequest(model, image, task, rois, roi_grid, patches, options, task_options, model_name,
                                  image_name))


def run_request(request: RunRequest) -> CEMResults:
    """:func:`run_cem` of a :class:`~.request.RunRequest`."""
    # an error on one rank fails the run on all, and they go on together; the model runs in eval mode throughout
    with distributed.agreed_step("run"), eval_for_run(request.model) as switched:
        results = _run(request)
    if switched:
        for res in results:
            res.extra["switched_to_eval"] = switched
    return results


def _planned(plan: RunPlan, marks: dict) -> RunPlan:
    """The loaded plan probed, its engine chosen and its cache entry open (under ``torch.inference_mode``)."""
    plan = plan_sampling(plan)
    marks["probe"] = time.perf_counter()
    engine, verdicts = choose_engine(plan)
    plan = size_batches(plan.but(engine=engine, verdicts=verdicts))
    if not plan.shared_too_big:
        plan = open_cache(plan)
        coarse, fine = plan.options.stages
        check_sample_memory(reachable_blocks(plan), coarse, fine, len(plan.rois))
    marks["engine"] = time.perf_counter()
    return plan


def _run(request: RunRequest) -> CEMResults:
    t0 = time.perf_counter()
    request.options.check()
    plan = prepare(request)  # outside inference mode: a caller's module placed here stays a trainable module
    marks = {"prepare": time.perf_counter()}
    with fitted_threads(plan.device) as threads, torch.inference_mode():
        plan = _planned(plan, marks)
        budget = forward_budget(plan)
        roi_plan = choose_roi_plan(plan, budget)
        if roi_plan["chosen"] == "per-roi":
            return _run_per_roi(request, plan, roi_plan)
        plan.say(budget_line(budget, len(plan.rois)))
        runner = Runner(plan, cache=plan.cache, progress=plan.progress, threads=threads)
        try:
            psnr_origin, sampled = _sample(plan, runner)
        finally:
            runner.close()
        if plan.batch_key is not None:
            remember_batch_size(plan.model, plan.batch_key, runner.batch_size)
        refuse_nan_samples(sampled, plan.grid, plan.name)
        origin_check = check_reproduced(plan, runner, psnr_origin)  # the model gives Y(I) again at the end
        marks["sampling"] = time.perf_counter()
        estimates = [sampled.estimate(j) for j in range(len(plan.rois))]  # (effect, se, draws, df) per ROI
        effects = [e[0].reshape(plan.grid.rows, plan.grid.cols) for e in estimates]
        for j, e in enumerate(effects):
            refuse_infinite_effects(e, float(psnr_origin[j]), plan.rois[j], plan.name)
        precision_check = _precision_check(plan, effects, psnr_origin, sampled)
        marks["estimate"] = time.perf_counter()
        pics = pictures(plan, runner)
    wall = time.perf_counter() - t0
    extra = run_extra(plan, runner, timings(t0, marks, wall), precision_check)
    extra["origin_check"] = origin_check
    if threads.summary() is not None:
        extra["cpu_threads"] = threads.summary()
    extra["plan"] = {**budget, **({"rois": roi_plan} if len(plan.rois) > 1 else {})}
    if runner.by_rank is not None:
        extra["distributed"] = {"world_size": len(runner.by_rank), "interventions_per_rank": runner.by_rank.tolist()}
    return assemble(plan, runner, sampled, estimates, psnr_origin, pics, extra, wall)


def _precision_check(plan: RunPlan, effects: list, psnr_origin: np.ndarray, sampled: Samples) -> Optional[dict]:
    """A reduced-precision run re-checked against fp32 on a sample of blocks (what summary.json says)."""
    o = plan.options
    if o.precision == "fp32":
        return None
    if o.mode == "adaptive":
        return {"skipped": "adaptive mode (its draws depend on the decisions; not re-run in fp32)"}
    return check_precision(plan, effects, psnr_origin, sampled.gated)


def _run_per_roi(request: RunRequest, plan: RunPlan, roi_plan: dict) -> CEMResults:
    """One run per ROI, each exactly the single-ROI run (its own locality crop, cache entry and draws); the model,
    image, task and bank loaded once."""
    plan.say(f"{len(plan.rois)} ROIs as one run each ({roi_plan['why']})")
    results = CEMResults()
    for j, roi in enumerate(plan.rois):
        one = run_request(request.replace(model=plan.model, image=plan.clean, task=plan.task, rois=[roi.as_tuple()],
                                          roi_grid=None, patches=plan.bank, model_name=plan.name,
                                          image_name=plan.image_name))[0]
        one.extra["plan"]["rois"] = {**roi_plan, "roi_index": j, "rois": len(plan.rois)}
        results.append(one)
    return results


def _sample(plan: RunPlan, runner: Runner) -> tuple[np.ndarray, Samples]:
    """Y(I) per ROI (from the whole-input output when the run is not cropped) and the stages' samples."""
    psnr_origin = distributed.from_rank0(start_origin(plan, runner), "Y(I)")  # every rank gates alike
    refuse_undefined_origin(plan, psnr_origin)
    o = plan.options
    coarse, fine = o.stages
    cv = patch_covariates(plan) if o.estimator == "control-variate" else None
    if o.mode == "adaptive":
        rule = AdaptiveRule(fine, o.tol, o.budget, o.half_width_rel_or_default, o.half_width_db_or_default)
        roi_blocks = np.stack([plan.grid.roi_blocks(r).numpy().reshape(-1) for r in plan.rois])
        return psnr_origin, sample_adaptive(runner, plan.grid, plan.locality.reach, psnr_origin, coarse, rule,
                                            covariates=cv, roi_blocks=roi_blocks)
    return psnr_origin, sample_stages(runner, plan.grid, plan.locality.reach, psnr_origin, coarse, fine, o.tol,
                                      covariates=cv)
