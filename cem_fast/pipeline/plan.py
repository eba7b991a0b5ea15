"""Planning a run: everything decided before the first intervention, in one :class:`RunPlan`.

:func:`prepare` loads and places (no forward pass): the model on its device in its memory format and precision,
the task applied to the image, the ROIs, the patch bank at input resolution, the backend. :func:`plan_sampling`
then runs what the plan needs (inside ``torch.inference_mode``): the unintervened forward, the locality probe
(which blocks can reach the ROIs, on which input crop), the batch size, and the cache entry keyed by every input
of the samples.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from .. import checks, distributed, ops, reference
from ..cache import RunCache, digest_bytes, run_key
from ..geometry import ROI, BlockGrid
from ..images import load_image
from ..locality import LocalityPlan, plan_locality
from ..models import load_model, model_code_digest, model_digest
from ..options import RunOptions, TaskOptions
from ..patches import PatchBank, load_patch_bank_with_digest
from ..tasks import Prepared, Task, make_task
from .draws import DRAWS_VERSION, verification_inputs
from .memory import available_memory, shared_pass_bytes
from .model import ModelForward, auto_batch_size, pick_device, place_model, unintervened_output
from .request import RunRequest

FULL_FORWARD_MAX_PX = 1024 * 1024  # larger inputs with locality: no full-image forward (verify on the window)
NO_ROIS = "give rois (a list of (y, x, size)) or roi_grid (a tile size in px)"
PROBE_BATCH = {"cuda": 16, "cpu": 4}  # the probe's batches hold crops around the ROI: small, fixed batches


@dataclass(frozen=True, eq=False)
class RunPlan:
    """One run, planned; never changed once built (each planning step makes a new one). ``model`` is the placed
    module (the key of remembered batch sizes and of the cache); ``forward`` how it is called; ``prep`` the task
    applied to the image, on ``device``; ``bank_in`` the patches at input resolution; ``progress`` whether lines
    and a bar go to stderr; ``locality`` which blocks run, on which crop; ``full_output`` the whole input's output
    when it was computed (else the pictures use the crop's); ``engine`` how the interventions are computed and
    ``verdicts`` what each candidate engine said (:mod:`.engines`)."""

    model: nn.Module
    forward: ModelForward
    name: str
    image_name: str
    task: Task
    clean: torch.Tensor
    prep: Prepared
    rois: list[ROI]
    bank: PatchBank
    bank_digest: str
    bank_in: torch.Tensor
    device: torch.device
    backend: str
    options: RunOptions
    task_options: TaskOptions
    seed: int
    progress: bool = False  # progress bar and one-line messages on stderr
    locality: Optional[LocalityPlan] = None
    full_output: Optional[torch.Tensor] = None
    batch_size: int = 1
    batch_key: Optional[tuple] = None
    shared_too_big: str = ""  # many ROIs whose shared pass would not fit in host memory: why (then one run each)
    engine: Any = None  # an engines.base.Engine
    verdicts: tuple = ()  # engines.base.Verdict of every candidate engine
    cache: Optional[RunCache] = None
    cache_note: Optional[str] = None

    def but(self, **changes: Any) -> "RunPlan":
        """This plan with ``changes``: the next planning step's."""
        return dataclasses.replace(self, **changes)

    def locality_summary(self) -> dict:
        """summary.json: ``locality``: the probe's facts and each candidate engine's verdict."""
        return {**self.locality.info, **{v.engine: v.as_dict() for v in self.verdicts}}

    def say(self, message: str) -> None:
        """A line on stderr while the run goes on (only with progress: scripts and tests stay quiet)."""
        if self.progress:
            print(f"[cem-fast] {message}", file=sys.stderr, flush=True)

    @property
    def grid(self) -> BlockGrid:
        return self.prep.grid

    @property
    def cropped_from(self) -> Optional[list]:
        """The image's (H, W) when the task cropped it (SR: to a multiple of the scale)."""
        return list(self.clean.shape[-2:]) if tuple(self.prep.gt.shape) != tuple(self.clean.shape) else None


def parse_rois(rois, roi_grid: Optional[int], out_h: int, out_w: int) -> list[ROI]:
    """The ROIs of a run: a list (of tuples or dicts), one ROI, or every tile of ``roi_grid`` px."""
    if rois is None and roi_grid is None:
        raise ValueError(NO_ROIS)
    if roi_grid is not None:
        checks.integer("roi_grid", roi_grid, 1)
        parsed = reference.roi_grid(out_h, out_w, int(roi_grid))
        if not parsed:
            raise ValueError(f"roi_grid {roi_grid} px must fit inside the {out_h}x{out_w} output")
        return parsed
    if isinstance(rois, (list, tuple)) and rois and not isinstance(rois[0], (int, np.integer, str)):
        parsed = [ROI.parse(r) for r in rois]
    else:
        parsed = [ROI.parse(rois)]
    for r in parsed:
        r.check_inside(out_h, out_w)
    return parsed


_BANKS_IN: "dict[tuple, torch.Tensor]" = {}  # (bank digest, task, block, device) -> the bank as pasted
BANKS_IN_KEPT = 4


def bank_at_input(task: Task, bank: PatchBank, digest: str, block: int, device: torch.device) -> torch.Tensor:
    """The bank as the task pastes it into the input, on ``device``: kept for the next runs of this process by the
    bank's content digest (a bank changed in place has another digest), the task and the block size."""
    key = (digest, json.dumps(task.describe(), sort_keys=True, default=str), block, str(device))
    kept = _BANKS_IN.get(key)
    if kept is None:
        kept = task.bank_at_input(bank.patches, block).to(device)
        if len(_BANKS_IN) >= BANKS_IN_KEPT:
            _BANKS_IN.pop(next(iter(_BANKS_IN)))
        _BANKS_IN[key] = kept
    return kept


def prepare(request: RunRequest) -> RunPlan:
    """Load and place everything (no forward pass yet); ``request.options`` must be checked."""
    options, task_options = request.options, request.task_options
    model = request.model
    if isinstance(model, nn.Module):
        name = request.model_name or type(model).__name__
    else:
        model, name = load_model(model, scale=int(task_options.scale), trust_model_code=options.trust_model_code)
        name = request.model_name or name
    task_obj = make_task(request.task, **task_options.as_kwargs())
    clean, default_name = load_image(request.image, options.max_pixels)
    image_name = request.image_name or default_name
    bank, digest = load_patch_bank_with_digest(request.patches)
    if request.rois is None and request.roi_grid is None:  # said before the device is touched
        raise ValueError(NO_ROIS)
    dev = pick_device(model, options.device)
    prep = task_obj.prepare(clean, options.block, image_name, dev)
    roi_list = parse_rois(request.rois, request.roi_grid, prep.grid.out_h, prep.grid.out_w)
    backend = ops.resolve_backend(options.backend, dev)
    model, forward = place_model(model, dev, options.precision, options.compile)
    progress = sys.stderr.isatty() if options.progress is None else bool(options.progress)
    return RunPlan(model=model, forward=forward, name=name, image_name=image_name, task=task_obj, clean=clean,
                   prep=prep.to(dev), rois=roi_list, bank=bank, bank_digest=digest,
                   bank_in=bank_at_input(task_obj, bank, digest, options.block, dev), device=dev,
                   backend=backend, options=options, task_options=task_options, seed=int(options.seed),
                   progress=progress and distributed.is_lead())  # one progress bar for the study


def plan_sampling(plan: RunPlan) -> RunPlan:
    """The unintervened forward and the locality plan (run under ``torch.inference_mode``); says
    when many ROIs' shared pass would not fit in host memory (one run per ROI then follows)."""
    o, grid = plan.options, plan.grid
    use_locality = o.locality == "auto" and plan.task.supports_windows
    whole = partial(unintervened_output, plan.forward, plan.prep, plan.task, plan.name)
    out0 = whole() if (not use_locality or grid.in_h * grid.in_w <= FULL_FORWARD_MAX_PX) else None
    if use_locality:
        plan.say("locality probe: which blocks can reach the ROI, and which input crop determines it ...")
        probe_batch = PROBE_BATCH["cuda" if plan.device.type == "cuda" else "cpu"] if o.auto_batch \
            else int(o.batch_size)
        locality = plan_locality(plan.forward, plan.prep.base, grid, plan.rois, batch_size=probe_batch,
                                 precision=o.precision, full_output=out0,
                                 interventions=partial(verification_inputs, plan))
    else:
        why = "exact mode (locality='off')" if o.locality == "off" else \
            "a custom degradation sees the whole image, so it cannot be cropped"
        locality = LocalityPlan.off(len(plan.rois), grid, o.locality, why)
    if out0 is None and locality.window is None:
        out0 = whole()  # locality found nothing to crop: the whole image runs after all
    plan = plan.but(locality=locality, full_output=out0)
    return plan.but(shared_too_big=_shared_too_big(plan))


def reachable_blocks(plan: RunPlan) -> int:
    """Blocks that can reach some ROI."""
    return int(plan.locality.reach.reshape(len(plan.rois), -1).any(0).sum())


def _shared_too_big(plan: RunPlan) -> str:
    """Why one shared pass for many ROIs would not fit in host memory ("" when it would, or was not chosen)."""
    coarse, fine = plan.options.stages
    n, blocks = len(plan.rois), reachable_blocks(plan)
    need, avail = shared_pass_bytes(blocks, coarse, fine, n), available_memory()
    if n > 1 and plan.options.roi_plan == "auto" and avail is not None and need > avail // 2:
        return (f"one shared pass would hold about {need / 2**30:.1f} GiB for {blocks:,} blocks x {n:,} ROIs, "
                f"more than half of the {avail / 2**30:.1f} GiB available")
    return ""


def size_batches(plan: RunPlan) -> RunPlan:
    """The plan with its batch size: ``batch_size="auto"`` sizes batches for what the engine's inputs hold (its
    windows, or the crop, or the whole input), remembered per model and input size."""
    if not plan.options.auto_batch:
        return plan.but(batch_size=int(plan.options.batch_size), batch_key=None)
    window = plan.locality.window
    sample_in = window.crop(plan.prep.base) if window is not None else plan.prep.base
    engine_px = plan.engine.budget()["input_px"]
    per_input = engine_px // max(1, reachable_blocks(plan)) if engine_px is not None else None
    key = (tuple(sample_in.shape), plan.options.precision, str(plan.device), per_input)
    return plan.but(batch_size=auto_batch_size(plan.model, plan.forward, sample_in, key, per_input), batch_key=key)


def cache_components(plan: RunPlan, code_digest: Optional[str]) -> dict[str, Any]:
    """Everything the samples depend on (and, for people reading the entry, the model's and image's names)."""
    o, prep, window = plan.options, plan.prep, plan.locality.window
    coarse, fine = o.stages
    return {
        "model": model_digest(plan.model), "model_code": code_digest,
        "gt": digest_bytes(prep.gt.cpu().numpy().tobytes()),
        "input": digest_bytes(prep.base.cpu().numpy().tobytes(), str(tuple(prep.base.shape)).encode()),
        "task": plan.task.describe(), "rois": [r.as_tuple() for r in plan.rois], "block": o.block,
        "bank": plan.bank_digest, "seed": plan.seed, "coarse": coarse, "fine": fine, "tol": float(o.tol),
        "mode": o.mode, **({"budget": o.budget} if o.mode == "adaptive" else {}), "locality": o.locality,
        "window": window.as_list() if window else None,
        "precision": o.precision, "draws": DRAWS_VERSION, **({"compile": str(o.compile)} if o.compile else {}),
        **plan.engine.cache_components(),
        "model_name": plan.name, "image": plan.image_name,
    }


def samples_key(plan: RunPlan, extra: dict[str, Any], step: str) -> tuple[str, dict[str, Any], Optional[str]]:
    """(the key of the plan's samples, what it was made of: :func:`cache_components` updated with ``extra``, why
    the model's code cannot be read or None). A model whose code may change unseen gets a key of its own, one for
    all ranks, so that its samples are never reused; ranks that planned other samples stop here (``step``)."""
    code_digest, code_unknown = model_code_digest(plan.model)
    components = {**cache_components(plan, code_digest), **extra}
    key_parts = {k: v for k, v in components.items() if k not in ("model_name", "image")}
    if code_unknown:
        token = distributed.rank0_value(int.from_bytes(os.urandom(7), "little"), f"{step} token")
        key_parts["never_reused"] = f"{token:014x}"
    return distributed.same_on_all(f"{step} key", run_key(key_parts)), components, code_unknown


def open_cache(plan: RunPlan) -> RunPlan:
    """The plan with its cache entry, keyed by every input of the samples (the engine included)."""
    if plan.options.cache is None:
        return plan
    # a narrowed fine stage (many ROIs) keeps its rows under a stage name that digests its gates
    # (stages.narrowed_stage): the key need not say it
    key, components, code_unknown = samples_key(plan, {}, "cache")
    note = f"samples not reused across runs: {code_unknown}" if code_unknown else None
    # rank 0 first: it alone clears the entry (fresh) and writes meta.json, so ranks never race on them
    cache, failed = distributed.rank0_first(lambda first: _cache_entry(plan, key, components, first), "cache")
    return plan.but(cache=cache, cache_note="; ".join(filter(None, [note, failed])) or None)


def _cache_entry(plan: RunPlan, key: str, components: dict[str, Any],
                 first: bool) -> tuple[Optional[RunCache], Optional[str]]:
    """The run's cache entry, or None and why where it cannot be made (a file where the cache folder should be, a
    read-only or full disk): the samples do not need it, so the run goes on with one warning and says so in
    summary.json: cache_note."""
    try:
        return RunCache(plan.options.cache, key, components, fresh=plan.options.fresh and first), None
    except OSError as e:
        why = f"sample cache {str(plan.options.cache)!r} cannot be used ({checks.first_line(e)})"
        warnings.warn(f"{why}: this run's samples are not cached (a crash could not resume)", stacklevel=2)
        return None, f"{why}: samples not cached"
