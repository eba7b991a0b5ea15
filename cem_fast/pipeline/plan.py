"""Planning a run: everything decided before the first intervention, in one :class:`RunPlan`.

:func:`prepare` loads and places (no forward pass): the model on its device in its memory format and precision,
the task applied to the image, the ROIs, the patch bank at input resolution, the backend. :func:`plan_sampling`
then runs what the plan needs (inside ``torch.inference_mode``): the unintervened forward, the locality probe
(which blocks can reach the ROIs, on which input crop), the batch size, and the cache entry keyed by every input
of the samples.
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .. import checks, distributed, ops, reference
from ..cache import RunCache, digest_bytes, run_key
from ..geometry import ROI, BlockGrid, RoiLike
from ..images import ImageLike, load_image
from ..locality import LocalityPlan, Window, plan_locality
from ..models import load_model, model_code_digest, model_digest
from ..patches import PatchBank, load_patch_bank
from ..tasks import Prepared, Task, make_task
from .model import ModelForward, auto_batch_size, pick_device, place_model, unintervened_output
from ..options import RunOptions, TaskOptions
from .runner import draw_patches
from .samples import available_memory, check_sample_memory, shared_pass_bytes

DRAWS_VERSION = "hash-v1"  # how (seed, block, draw) map to patches and noise; part of the cache key
FULL_FORWARD_MAX_PX = 1024 * 1024  # larger inputs with locality: no full-image forward (verify on the window)
NO_ROIS = "give rois (a list of (y, x, size)) or roi_grid (a tile size in px)"
PROBE_BATCH = {"cuda": 16, "cpu": 4}  # the probe's batches hold crops around the ROI: small, fixed batches


@dataclass
class RunPlan:
    """One run, planned. ``model`` is the placed module (the key of remembered batch sizes and of the cache);
    ``forward`` how it is called; ``prep`` the task applied to the image, on ``device``; ``bank_in`` the patches
    at input resolution; ``locality`` which blocks run, on which crop; ``full_output`` the whole input's output
    when it was computed (else the pictures use the crop's)."""

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
    locality: Optional[LocalityPlan] = None
    full_output: Optional[torch.Tensor] = None
    batch_size: int = 1
    batch_key: Optional[tuple] = None
    cache: Optional[RunCache] = None
    cache_note: Optional[str] = None
    marks: dict = field(default_factory=dict)
    progress: bool = False  # progress bar and one-line messages on stderr
    windows: Optional[Any] = None  # BlockWindows when interventions run on windows of their own
    incremental: Optional[Any] = None  # IncrementalPlan when interventions are recomputed layer by layer
    shared_too_big: str = ""  # many ROIs whose shared pass would not fit in host memory: why (then one run each)

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


def prepare(model: Union[nn.Module, str], image: ImageLike, task: Union[str, Task],
            rois: Union[RoiLike, Sequence[RoiLike], None], roi_grid: Optional[int],
            patches: Union[None, str, os.PathLike, PatchBank], options: RunOptions, task_options: TaskOptions,
            model_name: Optional[str] = None, image_name: Optional[str] = None) -> RunPlan:
    """Load and place everything (no forward pass yet); ``options`` must be checked."""
    if isinstance(model, nn.Module):
        name = model_name or type(model).__name__
    else:
        model, name = load_model(model, scale=int(task_options.scale), trust_model_code=options.trust_model_code)
        name = model_name or name
    task_obj = make_task(task, **task_options.as_kwargs())
    clean, default_name = load_image(image, options.max_pixels)
    image_name = image_name or default_name
    bank = load_patch_bank(patches)
    if rois is None and roi_grid is None:  # said before the device is touched
        raise ValueError(NO_ROIS)
    dev = pick_device(model, options.device)
    prep = task_obj.prepare(clean, options.block, image_name, dev)
    roi_list = parse_rois(rois, roi_grid, prep.grid.out_h, prep.grid.out_w)
    backend = ops.resolve_backend(options.backend, dev)
    model, forward = place_model(model, dev, options.precision, options.compile)
    return RunPlan(model=model, forward=forward, name=name, image_name=image_name, task=task_obj, clean=clean,
                   prep=prep.to(dev), rois=roi_list, bank=bank, bank_digest=bank.digest(),
                   bank_in=task_obj.bank_at_input(bank.patches, options.block).to(dev), device=dev,
                   backend=backend, options=options, task_options=task_options, seed=int(options.seed))


def verification_inputs(plan: RunPlan, block_ids: np.ndarray, window: Window) -> torch.Tensor:
    """Draw 0 of each block in ``block_ids``, written into crops of ``window``: what locality verifies with."""
    b = torch.from_numpy(block_ids).to(plan.device)
    ids, pidx = draw_patches(plan, b, torch.zeros_like(b))
    return plan.task.intervene(plan.prep, plan.bank_in, pidx, b, ids, plan.seed, plan.backend, window=window)


def plan_sampling(plan: RunPlan) -> RunPlan:
    """The unintervened forward, the locality plan, the batch size and the cache entry (run under
    ``torch.inference_mode``); refuses a sampling plan that would not fit in host memory."""
    o, grid = plan.options, plan.grid
    use_locality = o.locality == "auto" and plan.task.supports_windows
    whole = partial(unintervened_output, plan.forward, plan.prep, plan.task, plan.name)
    out0 = whole() if (not use_locality or grid.in_h * grid.in_w <= FULL_FORWARD_MAX_PX) else None
    if use_locality:
        plan.say("locality probe: which blocks can reach the ROI, and which input crop determines it ...")
        probe_batch = PROBE_BATCH["cuda" if plan.device.type == "cuda" else "cpu"] if o.auto_batch \
            else int(o.batch_size)
        plan.locality = plan_locality(plan.forward, plan.prep.base, grid, plan.rois, batch_size=probe_batch,
                                      precision=o.precision, full_output=out0,
                                      interventions=partial(verification_inputs, plan))
    else:
        why = "exact mode (locality='off')" if o.locality == "off" else \
            "a custom degradation sees the whole image, so it cannot be cropped"
        plan.locality = LocalityPlan.off(len(plan.rois), grid, o.locality, why)
    if out0 is None and plan.locality.window is None:
        out0 = whole()  # locality found nothing to crop: the whole image runs after all
    plan.full_output = out0
    _size_batches(plan)
    coarse, fine = o.stages
    n = len(plan.rois)
    blocks = int(plan.locality.reach.reshape(n, -1).any(0).sum())
    need, avail = shared_pass_bytes(blocks, coarse, fine, n), available_memory()
    if n > 1 and o.roi_plan == "auto" and avail is not None and need > avail // 2:
        plan.shared_too_big = (f"one shared pass would hold about {need / 2**30:.1f} GiB for {blocks:,} blocks x "
                               f"{n:,} ROIs, more than half of the {avail / 2**30:.1f} GiB available")
    if plan.shared_too_big:
        plan.locality.info["windows"] = plan.locality.info["incremental"] = {
            "used": False, "reason": "one run per ROI: " + plan.shared_too_big}
        return plan
    if use_locality:
        from .windows import plan_windows
        plan.locality.info["windows"] = plan_windows(plan)
        from .incremental import plan_incremental
        plan.locality.info["incremental"] = plan_incremental(plan)
    else:
        plan.locality.info["incremental"] = {"used": False, "reason": "locality was not verified: "
                                             + plan.locality.info["reason"]}
    _open_cache(plan)
    check_sample_memory(blocks, coarse, fine, n)
    return plan


def forward_budget(plan: RunPlan) -> dict[str, Any]:
    """What the sampling will cost, before it runs: blocks, forwards (the fine stage as an upper bound: every
    reachable block gated) and input pixels per forward."""
    n, grid = len(plan.rois), plan.grid
    blocks = int(plan.locality.reach.reshape(n, -1).any(0).sum())
    coarse, fine = plan.options.stages
    window = plan.locality.window
    h, w = (window.h, window.w) if window is not None else tuple(plan.prep.base.shape[1:])
    per_forward = plan.windows.pixels() // max(1, blocks) if plan.windows is not None else int(h * w)
    return {"blocks": blocks, "of_blocks": grid.num_blocks, "coarse_forwards": blocks * coarse,
            "fine_forwards_at_most": blocks * fine, "input_px_per_forward": int(per_forward),
            "input_shape": [int(h), int(w)], "batch_size": plan.batch_size,
            "windows": "intervention-centred" if plan.windows is not None else "crop",
            "incremental": plan.incremental is not None}


def budget_line(b: dict, n_rois: int) -> str:
    fine = f" + at most {b['fine_forwards_at_most']:,} fine" if b["fine_forwards_at_most"] else ""
    h, w = b["input_shape"]
    on = f"{h}x{w} input px" if b["windows"] == "crop" else \
        f"windows of their own ({b['input_px_per_forward']:,} input px on average, the crop {h}x{w})"
    if b.get("incremental"):
        on = "their changed rectangles, layer by layer"
    return (f"plan: {b['blocks']:,} of {b['of_blocks']:,} blocks can reach the {n_rois} ROI"
            f"{'s' if n_rois > 1 else ''}: {b['coarse_forwards']:,} coarse{fine} forwards on {on}, "
            f"batch {b['batch_size']}")


def per_roi_pixels(plan: RunPlan) -> int:
    """Input pixels the same sampling would cost as one run per ROI: each ROI's reachable blocks on the box of
    those blocks (an upper bound of each run's verified crop; their probes not counted)."""
    grid, total = plan.grid, 0
    for reach in plan.locality.reach:
        rows, cols = np.nonzero(reach)
        if not len(rows):
            continue
        h = min(grid.in_h, (rows.max() + 1) * grid.in_block) - rows.min() * grid.in_block
        w = min(grid.in_w, (cols.max() + 1) * grid.in_block) - cols.min() * grid.in_block
        total += len(rows) * int(h) * int(w)
    return total


def _size_batches(plan: RunPlan) -> None:
    """``batch_size="auto"``: sized for what the batches hold (the crop, or the whole input)."""
    if not plan.options.auto_batch:
        plan.batch_size = int(plan.options.batch_size)
        return
    window = plan.locality.window
    sample_in = window.crop(plan.prep.base) if window is not None else plan.prep.base
    plan.batch_key = (tuple(sample_in.shape), plan.options.precision, str(plan.device))
    plan.batch_size = auto_batch_size(plan.model, plan.forward, sample_in, plan.batch_key)


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
        **({"windows": "intervention-centred"} if plan.windows is not None else {}),
        **({"incremental": "layer by layer"} if plan.incremental is not None else {}),
        "model_name": plan.name, "image": plan.image_name,
    }


def _open_cache(plan: RunPlan) -> None:
    if plan.options.cache is None:
        return
    code_digest, code_unknown = model_code_digest(plan.model)
    components = cache_components(plan, code_digest)
    key_parts = {k: v for k, v in components.items() if k not in ("model_name", "image")}
    if code_unknown:  # a model whose code may have changed unseen: its samples are never reused
        token = distributed.rank0_value(int.from_bytes(os.urandom(7), "little"), "cache token")  # one for all ranks
        key_parts["never_reused"] = f"{token:014x}"
        plan.cache_note = f"samples not reused across runs: {code_unknown}"
    key = distributed.same_on_all("cache key", run_key(key_parts))  # ranks that planned other runs stop here
    # rank 0 first: it alone clears the entry (fresh) and writes meta.json, so ranks never race on them
    plan.cache = distributed.rank0_first(lambda first: _cache_entry(plan, key, components, first), "cache")


def _cache_entry(plan: RunPlan, key: str, components: dict[str, Any], first: bool) -> Optional[RunCache]:
    """The run's cache entry, or None where it cannot be made (a file where the cache folder should be, a
    read-only or full disk): the samples do not need it, so the run goes on with one warning and says so in
    summary.json: cache_note."""
    try:
        return RunCache(plan.options.cache, key, components, fresh=plan.options.fresh and first)
    except OSError as e:
        why = f"sample cache {str(plan.options.cache)!r} cannot be used ({checks.first_line(e)})"
        warnings.warn(f"{why}: this run's samples are not cached (a crash could not resume)", stacklevel=2)
        plan.cache_note = "; ".join(filter(None, [plan.cache_note, f"{why}: samples not cached"]))
        return None
