"""The Causal Effect Map estimator (METHOD.md): coarse-to-fine or exhaustive Monte Carlo over patch interventions.

``CE_ij = Y(I) - mean_k Y(I with block ij <- p_k)`` with ``Y`` the ROI PSNR (uint8 convention). Every block gets
``coarse`` interventions; blocks whose largest |Y(I) - Y_k| reaches ``tol`` get ``fine`` fresh ones, whose mean
replaces the coarse one. Draws are keyed by (seed, block, draw index): patch indices come from a seeded
generator over the whole (rows, cols, draws) plan and DN noise from a counter-based RNG, so the samples do not
depend on the batch size or the backend.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from . import ops
from .cache import RunCache, digest_bytes, missing_ranges, run_key
from .geometry import ROI, RoiLike
from .models import eval_mode, load_model, model_digest
from .patches import PatchBank, load_patch_bank
from .result import CEMResult
from .tasks import Prepared, Task, make_task

DRAW_STRIDE = 1 << 20  # intervention id = block * DRAW_STRIDE + draw index
MODES = ("coarse-to-fine", "exhaustive")
ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]


def load_image(image: ImageLike) -> tuple[torch.Tensor, str]:
    """(3, H, W) uint8 RGB tensor and a name. Paths and PIL images: greyscale is replicated to RGB, an alpha
    channel is dropped. Arrays: (H, W, 3) uint8 or float in [0, 1]; tensors: (3, H, W) uint8 or float in [0, 1]."""
    name = "image"
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        name = path.name
        if not path.is_file():
            raise ValueError(f"image {str(path)!r} does not exist")
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except Exception as e:
            raise ValueError(f"image {str(path)!r} cannot be read: {e}".splitlines()[0]) from None
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image array must be (H, W, 3), got {image.shape}")
        image = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"image must be a path, PIL image, array or tensor, got {type(image).__name__}")
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image tensor must be (3, H, W), got {tuple(image.shape)}")
    if image.dtype != torch.uint8:
        x = image.detach().float().cpu()
        if x.min() < 0 or x.max() > 1:
            raise ValueError(f"float image values must lie in [0, 1], got [{x.min():.3g}, {x.max():.3g}]")
        image = torch.round(x * 255).to(torch.uint8)
    return image.cpu().contiguous(), name


def _pick_device(model: nn.Module, device: Optional[Union[str, torch.device]]) -> torch.device:
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was requested but this torch has no CUDA device")
        return dev
    for p in model.parameters():
        if p.device.type == "cuda":
            return p.device
        break
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_positive(name: str, value: Any, allow_zero: bool = False) -> None:
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    ok = is_int and (value >= 0 if allow_zero else value > 0)
    if not ok:
        need = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{name} must be {need} integer, got {value!r}")


def _is_oom(e: BaseException) -> bool:
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    return isinstance(e, oom_types) or "out of memory" in str(e).lower()


class _Runner:
    """Runs interventions in batches on the device; only ROI PSNRs come back to the host.

    With a cache, every finished batch is stored at once and a re-run only computes what is missing. A batch that
    runs out of memory is split in halves (and the batch size lowered) until it fits.
    """

    def __init__(self, model, task: Task, prep: Prepared, bank_in, target, roi, seed, batch_size, backend,
                 progress, cache: Optional[RunCache] = None, memory_format=torch.contiguous_format):
        self.model, self.task, self.prep, self.bank_in = model, task, prep, bank_in
        self.target, self.roi, self.seed, self.batch_size, self.backend = target, roi, seed, batch_size, backend
        self.cache = cache
        self.memory_format = memory_format
        self.forwards = 0
        self.reused = 0
        self.oom_backoffs = 0
        self.bar = None
        if progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=0, unit="fwd", desc="CEM", leave=False, file=sys.stderr)

    def _scores(self, blocks, draws, patch_idx) -> np.ndarray:
        dev = self.prep.base.device
        b = blocks.to(dev)
        ids = b * DRAW_STRIDE + draws.to(dev)
        inputs = self.task.intervene(self.prep, self.bank_in, patch_idx.to(dev), b, ids, self.seed, self.backend)
        out = self.model(inputs.contiguous(memory_format=self.memory_format))
        scores = ops.roi_psnr(out, self.target, self.roi, backend=self.backend)
        ys, xs = self.roi.slices()
        finite = torch.isfinite(out[:, :, ys, xs]).flatten(1).all(1)
        # NaN/Inf in the ROI: recorded as NaN so that it is reported, never averaged into the map
        return torch.where(finite, scores, torch.full_like(scores, float("nan"))).cpu().numpy()

    def run(self, stage: str, blocks: torch.Tensor, draws: torch.Tensor, patch_idx: torch.Tensor) -> np.ndarray:
        n = blocks.shape[0]
        if self.cache is not None:
            scores, done = self.cache.load(stage, n)
        else:
            scores, done = np.full(n, np.nan), np.zeros(n, dtype=bool)
        self.reused += int(done.sum())
        if self.bar is not None:
            self.bar.total += n
            self.bar.update(int(done.sum()))
        pending = list(missing_ranges(done, self.batch_size))[::-1]
        while pending:
            s, e = pending.pop()
            try:
                chunk = self._scores(blocks[s:e], draws[s:e], patch_idx[s:e])
            except Exception as err:
                if not _is_oom(err):
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if e - s == 1:
                    raise RuntimeError("out of memory with a batch of 1 intervention: the model does not fit "
                                       f"on {self.prep.base.device}") from None
                half = (e - s + 1) // 2
                self.batch_size = half
                self.oom_backoffs += 1
                pending += [(s + half, e), (s, s + half)]
                continue
            scores[s:e] = chunk
            if self.cache is not None:
                self.cache.save(stage, s, chunk)
            self.forwards += e - s
            if self.bar is not None:
                self.bar.update(e - s)
        return scores

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _effects(psnr_origin: float, samples: np.ndarray) -> np.ndarray:
    """Y(I) - Y_k per sample, with an exact match on both sides (inf - inf) counted as no effect."""
    with np.errstate(invalid="ignore"):
        d = psnr_origin - samples
    both_inf = np.isinf(samples) & (samples == psnr_origin)
    return np.where(both_inf, 0.0, d)


def causal_effect_map(
    model: Union[nn.Module, str],
    image: ImageLike,
    task: Union[str, Task] = "DN",
    roi: RoiLike = (152, 96, 32),
    block: int = 8,
    coarse: int = 3,
    fine: int = 50,
    tol: float = 0.01,
    patches: Union[None, str, os.PathLike, PatchBank] = None,
    seed: int = 0,
    device: Optional[Union[str, torch.device]] = None,
    batch_size: Optional[int] = None,
    mode: str = "coarse-to-fine",
    samples: Optional[int] = None,
    backend: Optional[str] = None,
    progress: Optional[bool] = None,
    image_name: Optional[str] = None,
    model_name: Optional[str] = None,
    cache: Union[None, str, os.PathLike] = None,
    fresh: bool = False,
    **task_options: Any,
) -> CEMResult:
    """Causal Effect Map of ``model`` for the ROI ``roi`` of its output on ``image``.

    Args:
        model: an image-to-image ``nn.Module`` ((N, 3, h, w) float [0, 1] -> (N, 3, H, W)) or a model spec
            (see :func:`cem_fast.models.load_model`).
        image: the clean ground-truth image (path, PIL, (H, W, 3) array or (3, H, W) tensor).
        task: "SR", "DN", "DR", "identity" or a :class:`~cem_fast.tasks.Task`; options ``scale`` (SR, default 4),
            ``sigma`` (DN, default 50), ``noise_seed`` (DN input noise, default 0), ``rain_preset``,
            ``rain_beta``, ``rain_seed`` (DR) are passed as keyword arguments.
        roi: ``(y, x, size)`` or ``(y, x, height, width)`` in output pixels.
        block: block side in output pixels (a multiple of the SR scale).
        coarse, fine: interventions per block in the coarse stage and per gated block in the fine stage.
        tol: gate and display threshold in dB.
        patches: patch bank (folder, .npz, :class:`PatchBank`); default: the bank shipped in the package.
        seed: seed of the intervention draws (patch indices and intervention noise).
        device: where to run (default: the model's CUDA device, else CUDA when available, else CPU).
        batch_size: interventions per forward (default 256 on CUDA, 8 on CPU).
        mode: "coarse-to-fine" (the paper's) or "exhaustive" (``samples`` draws for every block).
        samples: draws per block in exhaustive mode (default ``fine``).
        backend: "auto", "torch", "triton", "cuda" or "cpp" for the intervention and reduction ops.
        progress: show a progress bar (default: when stderr is a terminal).
        cache: folder of the crash-safe sample cache; a re-run with the same inputs resumes where it stopped
            (see :mod:`cem_fast.cache`). ``fresh=True`` discards this run's cached samples first.

    Returns:
        :class:`CEMResult` with ``cem`` (rows, cols) in dB (|CE| < tol set to 0), all samples and statistics.

    Example:
        >>> import cem_fast
        >>> res = cem_fast.causal_effect_map("bicubic:x4", "img.png", task="SR", scale=4, roi=(40, 40, 16))
        >>> res.stats()["positive"], res.cem.shape
    """
    t0 = time.perf_counter()
    if isinstance(model, nn.Module):
        name = model_name or type(model).__name__
    else:
        model, name = load_model(model, scale=int(task_options.get("scale", 4)))
        name = model_name or name
    task_obj = make_task(task, **task_options)
    _check_positive("block", block)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "exhaustive":
        samples = fine if samples is None else samples
        _check_positive("samples", samples)
        coarse, fine = 0, samples
    else:
        _check_positive("coarse", coarse)
        _check_positive("fine", fine, allow_zero=True)
    if not (isinstance(tol, (int, float)) and tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a non-negative number of dB, got {tol!r}")
    clean, default_name = load_image(image)
    image_name = image_name or default_name
    roi = ROI.parse(roi)
    bank = load_patch_bank(patches)
    bank_digest = bank.digest()
    prep = task_obj.prepare(clean, block, image_name)
    grid = prep.grid
    cropped_from = list(clean.shape[-2:]) if tuple(prep.gt.shape) != tuple(clean.shape) else None
    roi.check_inside(grid.out_h, grid.out_w)

    dev = _pick_device(model, device)
    if batch_size is None:
        batch_size = 256 if dev.type == "cuda" else 8
    _check_positive("batch_size", batch_size)
    backend_name = ops.resolve_backend(backend, dev)
    # channels_last: about 2x faster convolutions on CPU and with cuDNN (results agree to fp32 round-off), but
    # slower for models without convolutions (interpolation), so only for models that have them.
    model = eval_mode(model.to(dev))
    memory_format = torch.contiguous_format
    if any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        memory_format = torch.channels_last
        try:
            model = model.to(memory_format=memory_format)
        except (NotImplementedError, RuntimeError, TypeError):
            pass  # e.g. torch.export modules; the inputs are still channels_last
    prep = prep.to(dev)
    bank_in = task_obj.bank_at_input(bank.patches, block).to(dev)
    ys, xs = roi.slices()
    target = prep.gt[:, ys, xs].contiguous()
    if progress is None:
        progress = sys.stderr.isatty()

    with torch.inference_mode():
        try:
            out0 = model(prep.base.unsqueeze(0).contiguous(memory_format=memory_format))
        except Exception as e:
            raise RuntimeError(f"model {name} raised on the {tuple(prep.base.shape)} input: "
                               f"{type(e).__name__}: {e}".splitlines()[0]) from e
        expected = (1,) + tuple(prep.gt.shape)
        if not isinstance(out0, torch.Tensor) or tuple(out0.shape) != expected:
            got = tuple(out0.shape) if isinstance(out0, torch.Tensor) else type(out0).__name__
            raise ValueError(f"model {name} output must be {expected} for a {tuple(prep.base.shape)} input "
                             f"(task {task_obj.name} x{task_obj.scale}), got {got}")
        if not torch.isfinite(out0).all():
            raise ValueError(f"model {name} output has NaN/Inf values on the unintervened input")
        psnr_origin = float(ops.roi_psnr(out0, target, roi, backend=backend_name)[0])

        gen = torch.Generator().manual_seed(int(seed))
        coarse_idx = bank.sample(gen, (grid.rows, grid.cols, coarse))
        fine_idx = bank.sample(gen, (grid.rows, grid.cols, fine))
        run_cache = None
        if cache is not None:
            components = {
                "model": model_digest(model), "gt": digest_bytes(prep.gt.cpu().numpy().tobytes()),
                "input": digest_bytes(prep.base.cpu().numpy().tobytes(), str(tuple(prep.base.shape)).encode()),
                "task": task_obj.describe(), "roi": roi.as_tuple(), "block": block, "bank": bank_digest,
                "seed": int(seed), "coarse": coarse, "fine": fine, "tol": float(tol), "mode": mode,
                "model_name": name, "image": image_name,
            }
            key_parts = {k: v for k, v in components.items() if k not in ("model_name", "image")}
            run_cache = RunCache(cache, run_key(key_parts), components, fresh=fresh)
        runner = _Runner(model, task_obj, prep, bank_in, target, roi, int(seed), batch_size, backend_name,
                         progress, run_cache, memory_format)
        try:
            nb = grid.num_blocks
            samples_coarse = np.full((grid.rows, grid.cols, coarse), np.nan)
            if coarse:
                blocks = torch.arange(nb).repeat_interleave(coarse)
                draws = torch.arange(coarse).repeat(nb)
                samples_coarse = runner.run("coarse", blocks, draws, coarse_idx.reshape(-1)).reshape(
                    grid.rows, grid.cols, coarse)
                gated = (np.abs(_effects(psnr_origin, samples_coarse)) >= tol).any(axis=2)
            else:
                gated = np.ones((grid.rows, grid.cols), dtype=bool)
            samples_fine = np.full((grid.rows, grid.cols, fine), np.nan)
            gated_ids = torch.from_numpy(np.flatnonzero(gated.reshape(-1)))
            if fine and len(gated_ids):
                blocks = gated_ids.repeat_interleave(fine)
                draws = coarse + torch.arange(fine).repeat(len(gated_ids))
                pidx = fine_idx.reshape(nb, fine)[gated_ids].reshape(-1)
                flat = samples_fine.reshape(nb, fine)
                flat[gated_ids.numpy()] = runner.run("fine", blocks, draws, pidx).reshape(-1, fine)
                samples_fine = flat.reshape(grid.rows, grid.cols, fine)
        finally:
            runner.close()

    for stage, arr, done in (("coarse", samples_coarse, np.ones_like(gated)), ("fine", samples_fine, gated)):
        bad = np.isnan(arr) & done[..., None] if arr.size else np.zeros(arr.shape, bool)
        if bad.any():
            r, c, k = np.argwhere(bad)[0]
            raise ValueError(f"model {name} produced NaN/Inf outputs in the ROI for {int(bad.sum())} {stage} "
                             f"interventions (first: block ({r}, {c}), draw {k}); refusing to average them")

    effect = np.where(gated & (fine > 0), _effects(psnr_origin, samples_fine).mean(axis=2) if fine else 0.0,
                      _effects(psnr_origin, samples_coarse).mean(axis=2) if coarse else 0.0)
    cem = np.where(np.abs(effect) >= tol, effect, 0.0)
    to_u8 = lambda t: torch.round(t.float().clamp(0, 1) * 255).to(torch.uint8).cpu()  # noqa: E731
    return CEMResult(
        cem=cem, effect=effect, samples_coarse=samples_coarse, samples_fine=samples_fine, gated=gated,
        psnr_origin=psnr_origin, roi=roi, block=block, scale=task_obj.scale, tol=float(tol),
        task=task_obj.describe(), seed=int(seed), mode=mode, model_name=name, image_name=image_name,
        num_forwards=runner.forwards + 1, wall_time=time.perf_counter() - t0, backend=backend_name,
        device=str(dev), patch_bank={"source": bank.source, "size": len(bank), "patch_size": bank.patch_size,
                                     "digest": bank_digest},
        gt=prep.gt.cpu(), degraded=to_u8(prep.base), output=to_u8(out0[0]),
        extra={**({"cropped_from": cropped_from} if cropped_from else {}), "reused_from_cache": runner.reused,
               "oom_backoffs": runner.oom_backoffs, "final_batch_size": runner.batch_size,
               **({"cache_entry": str(run_cache.dir)} if run_cache is not None else {})},
    )
