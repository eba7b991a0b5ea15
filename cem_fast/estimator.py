"""The Causal Effect Map estimator (METHOD.md): coarse-to-fine or exhaustive Monte Carlo over patch interventions.

``CE_ij = Y(I) - mean_k Y(I with block ij <- p_k)`` with ``Y`` the ROI PSNR (uint8 convention). Every block gets
``coarse`` interventions; blocks whose largest |Y(I) - Y_k| reaches ``tol`` get ``fine`` fresh ones, whose mean
replaces the coarse one. Draws are keyed by (seed, block, draw index) (:func:`cem_fast.rng.patch_draws` for the
patch, the counter-based noise for DN), so the samples depend neither on the batch size, nor on the backend, nor
on which other blocks run.

Speed (``locality="auto"``, the default): blocks that cannot reach the ROI are skipped (CE exactly 0) and the rest
run on the input crop that determines the ROI, both found by probing and verified (:mod:`cem_fast.locality`).
``locality="off"`` is the exact mode. Many ROIs (:func:`causal_effect_maps`) share one set of forward passes.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
import weakref
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from . import checks, ops, reference, rng
from .cache import RunCache, digest_bytes, missing_ranges, run_key
from .geometry import ROI, RoiLike, rois_finite
from .locality import LocalityPlan, Window, plan_locality
from .checks import first_line
from .models import eval_mode, load_model, model_code_digest, model_digest
from .patches import PatchBank, load_patch_bank
from .result import CEMResult, CEMResults, Deferred
from .tasks import Prepared, Task, make_task

DRAW_STRIDE = checks.MAX_DRAWS  # intervention id = block * DRAW_STRIDE + draw index
DRAWS_VERSION = "hash-v1"  # how (seed, block, draw) map to patches and noise; part of the cache key
MODES = ("coarse-to-fine", "exhaustive")
LOCALITY = ("auto", "off")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
FULL_FORWARD_MAX_PX = 1024 * 1024  # larger inputs with locality: no full-image forward (verify on the window)
PRECISION_CHECK_BLOCKS = 8
PROBE_BATCH_CUDA = 16
ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]


DEFAULT_MAX_PIXELS = 8192 * 8192  # larger inputs are refused unless max_pixels is raised (memory grows with it)


def load_image(image: ImageLike, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, str]:
    """(3, H, W) uint8 RGB tensor and a name. Paths and PIL images: the EXIF orientation is applied, greyscale is
    replicated to RGB, an alpha channel is dropped, 16-bit and float images are scaled to 8 bits (16-bit: round(v
    / 257); float: values in [0, 1], x255, rounded; others are refused). Arrays: (H, W, 3) uint8, uint16 or float
    in [0, 1]; tensors: (3, H, W) uint8 or float in [0, 1]. Images above ``max_pixels`` are refused before they are
    decoded (None: no limit)."""
    name = "image"
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        name = path.name
        if not path.exists():
            raise ValueError(f"image {str(path)!r} does not exist")
        if not path.is_file():  # a folder, or a pipe that would never end
            raise ValueError(f"image {str(path)!r} is not a regular file")
        bomb_limit = Image.MAX_IMAGE_PIXELS
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit speaks instead
                Image.MAX_IMAGE_PIXELS = None if max_pixels is None else max(max_pixels, bomb_limit or 0)
                with Image.open(path) as im:
                    _check_pixels(f"image {str(path)!r}", im.height, im.width, max_pixels)
                    image = _pil_to_rgb8(ImageOps.exif_transpose(im), str(path))
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"image {str(path)!r} cannot be read: {first_line(e)}") from None
        finally:
            Image.MAX_IMAGE_PIXELS = bomb_limit
    if isinstance(image, Image.Image):
        image = _pil_to_rgb8(image, "image")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image array must be (H, W, 3), got {image.shape}")
        if image.dtype == np.uint16:
            image = _u16_to_u8(image)
        # the (3, H, W) copy at the end detaches the tensor from the caller's array: no copy here (0.25 s at 8192^2)
        usable = image.flags.writeable and min(image.strides) >= 0  # torch takes neither read-only nor flipped
        image = torch.from_numpy(image if usable else image.copy()).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"image must be a path, PIL image, array or tensor, got {type(image).__name__}")
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image tensor must be (3, H, W), got {tuple(image.shape)}")
    _check_pixels("image", image.shape[1], image.shape[2], max_pixels)  # every input, as it is now
    if image.dtype != torch.uint8:
        x = image.detach().float().cpu()
        if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise ValueError(f"float image values must lie in [0, 1], got [{x.min():.3g}, {x.max():.3g}]")
        image = torch.round(x * 255).to(torch.uint8)
    return image.cpu().contiguous(), name


def _check_pixels(what: str, h: int, w: int, max_pixels: Optional[int]) -> None:
    if max_pixels is not None and h * w > max_pixels:
        raise ValueError(f"{what} is {w}x{h} = {h * w:,} pixels, above max_pixels={max_pixels:,}: raise "
                         "max_pixels to run it (memory grows with the image)")


def _u16_to_u8(a: np.ndarray) -> np.ndarray:
    return np.round(a.astype(np.float64) / 257.0).astype(np.uint8)


def _pil_to_rgb8(im: Image.Image, what: str) -> np.ndarray:
    """(H, W, 3) uint8. PIL's convert("RGB") clips 16-bit and float pixels to 0..255 (a 16-bit grey PNG becomes
    two levels), so those modes are scaled here; 16-bit RGB files are already read as 8-bit RGB by PIL."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"{what}: 32-bit integer pixels in [{a.min()}, {a.max()}], expected 0..65535 (16-bit)")
        return np.repeat(_u16_to_u8(a)[..., None], 3, axis=2)
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if a.size and (not np.isfinite(a).all() or a.min() < 0 or a.max() > 1):
            raise ValueError(f"{what}: float pixels in [{np.nanmin(a):.3g}, {np.nanmax(a):.3g}], expected [0, 1]")
        return np.repeat(np.round(a * 255).astype(np.uint8)[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


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


@contextlib.contextmanager
def precision_mode(precision: str, device: torch.device):
    """fp32: true fp32 (TF32 off for cuDNN convolutions and matmuls, which torch allows by default for cuDNN);
    tf32: TF32 allowed; bf16 / fp16: autocast. Restores the global flags afterwards."""
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        if precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            with torch.autocast(device.type, dtype=dtype):
                yield
        else:
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


# batch sizes that fitted, per model, input shape, precision and device (``batch_size="auto"``)
_BATCH_MEMORY: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
CPU_BATCH_PIXELS = 1 << 16  # CPU: about this many input pixels per batch (larger ones fall out of cache: slower)
MAX_AUTO_BATCH = 4096


def auto_batch_size(model: nn.Module, forward: Callable, sample: torch.Tensor, key: tuple) -> int:
    """The batch to start with: remembered, else on CUDA what fits in half the free memory judging by the peak of a
    batch of 4, else (CPU) about ``CPU_BATCH_PIXELS`` input pixels. Out-of-memory errors still back off."""
    remembered = _BATCH_MEMORY.get(model, {}).get(key)
    if remembered:
        return remembered
    C, h, w = sample.shape
    if sample.device.type == "cuda":
        torch.cuda.synchronize(sample.device)
        torch.cuda.reset_peak_memory_stats(sample.device)
        before = torch.cuda.memory_allocated(sample.device)
        try:
            forward(sample.unsqueeze(0).repeat(4, 1, 1, 1))
        except Exception as e:
            if not _is_oom(e):
                raise
            return 1
        per_item = max(1, (torch.cuda.max_memory_allocated(sample.device) - before) // 4)
        free, _ = torch.cuda.mem_get_info(sample.device)
        return int(max(1, min(MAX_AUTO_BATCH, free // 2 // per_item)))
    return int(max(1, min(256, CPU_BATCH_PIXELS // (h * w))))


def remember_batch_size(model: nn.Module, key: tuple, batch_size: int) -> None:
    try:
        _BATCH_MEMORY.setdefault(model, {})[key] = batch_size
    except TypeError:  # not weak-referenceable
        pass


class _Runner:
    """Runs interventions in batches on the device; only the ROI PSNRs (K, n_rois) come back to the host.

    Every batch is written by the fused intervene op into one reused input buffer (the crop of the locality
    window, in the model's memory format) and reduced to ROI scores on the device; a batch's scores go to the host
    by an asynchronous copy into pinned memory and are read one batch later (:class:`_HostCopies`), so the device
    never waits for the host. With a cache, every finished batch is stored at once and a
    re-run only computes what is missing. A batch that runs out of memory is split in halves (and the batch size
    lowered) until it fits.
    """

    def __init__(self, forward, task: Task, prep: Prepared, bank_in, rois: Sequence[ROI], seed, batch_size,
                 backend, progress, cache: Optional[RunCache] = None, memory_format=torch.contiguous_format,
                 window: Optional[Window] = None):
        self.forward, self.task, self.prep, self.bank_in = forward, task, prep, bank_in
        self.seed, self.batch_size, self.backend = seed, batch_size, backend
        # the multi-ROI reduction runs on the chosen backend when it has that kernel, else on torch
        dev = prep.base.device
        self.multi_backend = backend if not ops.backend_reasons(backend, dev, "roi_sq_err_multi") else "torch"
        self.cache, self.memory_format, self.window = cache, memory_format, window
        self.rois = list(rois)
        s = task.scale
        C, h, w = prep.base.shape
        self.win = window or Window(0, 0, h, w)
        oy, ox = self.win.y * s, self.win.x * s
        self.local_rois = [ROI(r.y - oy, r.x - ox, r.height, r.width) for r in self.rois]
        gt_win = prep.gt[:, oy:oy + self.win.h * s, ox:ox + self.win.w * s]
        if len(self.rois) == 1:
            ys, xs = self.local_rois[0].slices()
            self.target = gt_win[:, ys, xs].contiguous()
        else:
            self.target = gt_win.contiguous()
        self.forwards = 0
        self.reused = 0
        self.oom_backoffs = 0
        self._buffer: Optional[torch.Tensor] = None
        self._copies = _HostCopies()
        self._roi_values: Optional[torch.Tensor] = None
        self.origin_output: Optional[torch.Tensor] = None
        self.bar = None
        if progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=0, unit="fwd", desc="CEM", leave=False, file=sys.stderr)

    def score_outputs(self, out: torch.Tensor) -> torch.Tensor:
        """(K, n_rois) float64 ROI PSNRs of outputs of the window; NaN where the ROI holds NaN/Inf."""
        if len(self.rois) == 1:
            roi = self.local_rois[0]
            scores = ops.roi_psnr(out, self.target, roi, backend=self.backend).unsqueeze(1)
        else:
            sq = ops.roi_sq_err_multi(out, self.target, self.local_rois, backend=self.multi_backend)
            if self._roi_values is None:  # made once: a host-to-device copy per batch would stall the queue
                self._roi_values = torch.tensor([r.height * r.width * out.shape[1] for r in self.local_rois],
                                                device=sq.device, dtype=torch.float64)
            scores = reference.psnr_from_sq_err(sq, self._roi_values)
        finite = rois_finite(out, self.local_rois)
        # NaN/Inf in the ROI: recorded as NaN so that it is reported, never averaged into the map
        return torch.where(finite, scores, torch.full_like(scores, float("nan")))

    def origin(self) -> np.ndarray:
        """(n_rois,) Y(I) from the unintervened window, through the same forward and reduction as the samples."""
        out = self.forward(self.win.crop(self.prep.base).unsqueeze(0))
        self.forwards += 1
        self.origin_output = out[0]  # the window's unintervened output, kept for the pictures
        return self.score_outputs(out)[0].cpu().numpy()

    def _input_buffer(self, k: int) -> torch.Tensor:
        C = self.prep.base.shape[0]
        if self._buffer is None or self._buffer.shape[0] < k:
            self._buffer = torch.empty((k, C, self.win.h, self.win.w), dtype=self.prep.base.dtype,
                                       device=self.prep.base.device).contiguous(memory_format=self.memory_format)
        return self._buffer[:k]

    def _scores(self, blocks: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        ids = blocks * DRAW_STRIDE + draws
        patch_idx = rng.patch_draws(self.seed, ids, self.bank_in.shape[0])
        out_buf = self._input_buffer(len(blocks)) if self.task.supports_windows else None
        inputs = self.task.intervene(self.prep, self.bank_in, patch_idx, blocks, ids, self.seed, self.backend,
                                     window=self.window, out=out_buf)
        return self.score_outputs(self.forward(inputs, owned=out_buf is not None))

    def run(self, stage: str, blocks: torch.Tensor, draws: torch.Tensor) -> np.ndarray:
        """(n, n_rois) ROI PSNRs of interventions (blocks[i], draws[i])."""
        n, width = blocks.shape[0], len(self.rois)
        dev = self.prep.base.device
        # the intervention ids of the rows, for the cache's chunks (from the host copies: no device round trip)
        ids = blocks.cpu().numpy().astype(np.int64) * DRAW_STRIDE + draws.cpu().numpy().astype(np.int64)
        blocks, draws = blocks.to(dev), draws.to(dev)
        if self.cache is not None:  # chunks carry the ids they hold and a checksum: others are recomputed
            scores, done = self.cache.load(stage, n, width, ids)
        else:
            scores, done = np.full((n, width), np.nan), np.zeros(n, dtype=bool)
        self.reused += int(done.sum())
        if self.bar is not None:
            self.bar.total += n
            self.bar.update(int(done.sum()))
        pending = list(missing_ranges(done, self.batch_size))[::-1]
        queued: Optional[tuple[int, int, tuple]] = None  # a batch whose scores are on their way to the host

        def collect():
            s, e, copy = queued
            chunk = self._copies.finish(copy)
            scores[s:e] = chunk
            if self.cache is not None:
                self.cache.save(stage, s, chunk, ids[s:e])
            self.forwards += e - s
            if self.bar is not None:
                self.bar.update(e - s)

        try:
            while pending:
                s, e = pending.pop()
                if e - s > self.batch_size:  # the batch size was lowered: split what was planned with the old one
                    pending += [(s + self.batch_size, e), (s, s + self.batch_size)]
                    continue
                try:
                    dev_scores = self._scores(blocks[s:e], draws[s:e])
                except Exception as err:
                    if not _is_oom(err):
                        raise
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    if e - s == 1:
                        raise RuntimeError("out of memory with a batch of 1 intervention: the model does not "
                                           f"fit on {dev}") from None
                    self._buffer = None
                    half = (e - s + 1) // 2
                    self.batch_size = half
                    self.oom_backoffs += 1
                    pending += [(s + half, e), (s, s + half)]
                    continue
                copy = self._copies.start(dev_scores)  # queued behind the batch: the host does not wait here
                if queued is not None:
                    collect()  # the previous batch, long finished while this one runs
                queued = (s, e, copy)
        except BaseException:
            if queued is not None:  # keep the finished batch (a crash or an interrupt loses nothing done)
                try:
                    collect()
                except Exception:
                    pass
            raise
        if queued is not None:
            collect()
        return scores

    def close(self):
        if self.bar is not None:
            self.bar.close()


class _HostCopies:
    """Batch scores copied to the host without stalling the device. On CUDA a batch's scores go into one of two
    pinned buffers by an asynchronous copy queued right behind the batch, with an event after it; they are read
    one batch later (:meth:`finish` waits for that event only, while the device runs the next batch), so the
    device never idles for the host. Elsewhere the scores are on the host already."""

    def __init__(self):
        self._pinned: list[Optional[torch.Tensor]] = [None, None]
        self._events: list = [None, None]
        self._turn = 0

    def start(self, dev_scores: torch.Tensor) -> tuple:
        if dev_scores.device.type != "cuda":
            return dev_scores, None
        i, self._turn = self._turn, self._turn ^ 1
        buf = self._pinned[i]
        if buf is None or buf.shape[0] < dev_scores.shape[0] or buf.shape[1:] != dev_scores.shape[1:]:
            buf = self._pinned[i] = torch.empty(dev_scores.shape, dtype=dev_scores.dtype, pin_memory=True)
            self._events[i] = torch.cuda.Event()
        host = buf[:dev_scores.shape[0]]
        host.copy_(dev_scores, non_blocking=True)
        self._events[i].record(torch.cuda.current_stream(dev_scores.device))
        return host, self._events[i]

    @staticmethod
    def finish(copy: tuple) -> np.ndarray:
        host, event = copy
        if event is not None:
            event.synchronize()
        return host.cpu().numpy()


def _private_copy(x: torch.Tensor, memory_format) -> torch.Tensor:
    out = torch.empty_like(x, memory_format=memory_format)
    return out.copy_(x)


SAMPLE_BYTES = 64  # host bytes per intervention and ROI: scores, done flags, block / draw / id arrays, copies


def _available_memory() -> Optional[int]:
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


def _check_sample_memory(blocks: int, coarse: int, fine: int, n_rois: int) -> None:
    """Refuse, before allocating, a sampling plan whose per-intervention arrays would not fit in host memory."""
    need = blocks * max(coarse, fine, 1) * n_rois * SAMPLE_BYTES
    avail = _available_memory()
    if avail is not None and need > avail // 2:
        raise ValueError(f"coarse={coarse}, fine={fine} for {blocks} blocks x {n_rois} ROIs needs about "
                         f"{need / 2**30:.1f} GiB of host memory for the samples, more than half of the "
                         f"{avail / 2**30:.1f} GiB available: lower coarse / fine / samples")


def _refuse_infinite_effects(effect: np.ndarray, psnr_origin: float, roi: ROI, name: str) -> None:
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


def _effects(psnr_origin: float, samples: np.ndarray) -> np.ndarray:
    """Y(I) - Y_k per sample, with an exact match on both sides (inf - inf) counted as no effect."""
    with np.errstate(invalid="ignore"):
        d = psnr_origin - samples
    both_inf = np.isinf(samples) & (samples == psnr_origin)
    return np.where(both_inf, 0.0, d)



def _parse_rois(rois, roi_grid: Optional[int], out_h: int, out_w: int) -> list[ROI]:
    if roi_grid is not None:
        _check_positive("roi_grid", roi_grid)
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


def causal_effect_map(
    model: Union[nn.Module, str],
    image: ImageLike,
    task: Union[str, Task] = "DN",
    roi: Optional[RoiLike] = None,
    block: int = 8,
    coarse: int = 3,
    fine: int = 50,
    tol: float = 0.01,
    patches: Union[None, str, os.PathLike, PatchBank] = None,
    seed: int = 0,
    **options: Any,
) -> CEMResult:
    """Causal Effect Map of ``model`` for the ROI ``roi`` of its output on ``image``.

    Args:
        model: an image-to-image ``nn.Module`` ((N, 3, h, w) float [0, 1] -> (N, 3, H, W)) or a model spec
            (see :func:`cem_fast.models.load_model`).
        image: the clean ground-truth image (path, PIL, (H, W, 3) array or (3, H, W) tensor).
        task: "SR", "DN", "DR", "identity" or a :class:`~cem_fast.tasks.Task`; options ``scale`` (SR, default 4),
            ``sigma`` (DN, default 50), ``noise_seed`` (DN input noise, default 0), ``input_noise`` (DN:
            "numpy", the reference's generator on the CPU, default; "counter": drawn on the device, for large
            images), ``rain_preset``,
            ``rain_beta``, ``rain_seed`` (DR) are passed as keyword arguments.
        roi: ``(y, x, size)`` or ``(y, x, height, width)`` in output pixels.
        block: block side in output pixels (a multiple of the SR scale).
        coarse, fine: interventions per block in the coarse stage and per gated block in the fine stage.
        tol: gate and display threshold in dB.
        patches: patch bank (folder, .npz, :class:`PatchBank`); default: the bank shipped in the package.
        seed: seed of the intervention draws (patch indices and intervention noise).
        **options: see :func:`causal_effect_maps` (locality, precision, batch_size, device, backend, mode,
            samples, cache, fresh, progress, names).

    Returns:
        :class:`CEMResult` with ``cem`` (rows, cols) in dB (|CE| < tol set to 0), all samples and statistics.

    Example:
        >>> import cem_fast
        >>> res = cem_fast.causal_effect_map("bicubic:x4", "img.png", task="SR", scale=4, roi=(40, 40, 16))
        >>> res.stats()["positive"], res.cem.shape
    """
    if "rois" in options or "roi_grid" in options:
        raise ValueError("causal_effect_map takes one roi; use causal_effect_maps for rois / roi_grid")
    if roi is None:  # no default: a map of somebody else's ROI would look like an answer
        raise ValueError("roi is required: (y, x, size) or (y, x, height, width) in output pixels")
    return causal_effect_maps(model, image, task, rois=[roi], block=block, coarse=coarse, fine=fine, tol=tol,
                              patches=patches, seed=seed, **options)[0]


def causal_effect_maps(
    model: Union[nn.Module, str],
    image: ImageLike,
    task: Union[str, Task] = "DN",
    rois: Union[RoiLike, Sequence[RoiLike], None] = None,
    roi_grid: Optional[int] = None,
    block: int = 8,
    coarse: int = 3,
    fine: int = 50,
    tol: float = 0.01,
    patches: Union[None, str, os.PathLike, PatchBank] = None,
    seed: int = 0,
    device: Optional[Union[str, torch.device]] = None,
    batch_size: Union[int, str, None] = "auto",
    locality: str = "auto",
    precision: str = "fp32",
    compile: Union[bool, str] = False,
    mode: str = "coarse-to-fine",
    samples: Optional[int] = None,
    backend: Optional[str] = None,
    progress: Optional[bool] = None,
    image_name: Optional[str] = None,
    model_name: Optional[str] = None,
    cache: Union[None, str, os.PathLike] = None,
    fresh: bool = False,
    max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
    trust_model_code: bool = False,
    **task_options: Any,
) -> CEMResults:
    """Causal Effect Maps of ``model`` for many ROIs of its output from one set of forward passes.

    The arguments of :func:`causal_effect_map`, plus:

    Args:
        rois: a list of ROIs (``(y, x, size)``, ``(y, x, h, w)`` or dicts); ``roi_grid=s``: every full ``s x s``
            tile of the output instead. Each map equals what a single-ROI run with the same seed gives.
        locality: "auto" (default): skip blocks that cannot reach the ROIs (CE exactly 0, no forwards) and run the
            rest on the input crop that determines them, after probing and verifying the model
            (:mod:`cem_fast.locality`); it falls back to the whole image, and says why, when verification fails.
            "off": the exact mode (every block, whole input).
        precision: "fp32" (default; TF32 off), "tf32", "bf16" or "fp16" (autocast); reduced precision is checked
            against fp32 on a sample of blocks and reported (``summary.json: precision_check``).
        compile: run the model through ``torch.compile`` (True: mode "reduce-overhead", i.e. CUDA graphs, on CUDA
            and the default mode on the CPU; a string: that mode). Worth it for small crops on a GPU, where launch
            overhead dominates; it costs a compilation per input shape (measured no gain for DnCNN on the CPU).
        device: where to run (default: the model's CUDA device, else CUDA when available, else CPU).
        batch_size: interventions per forward; "auto" (default): the largest that fits (CUDA) or about 64k input
            pixels (CPU), remembered per model and input shape; out-of-memory errors back off and continue.
        mode: "coarse-to-fine" (the paper's) or "exhaustive" (``samples`` draws for every block).
        samples: draws per block in exhaustive mode (default ``fine``).
        backend: "auto", "torch", "triton", "cuda" or "cpp" for the intervention and reduction ops.
        progress: show a progress bar (default: when stderr is a terminal).
        cache: folder of the crash-safe sample cache; a re-run with the same inputs resumes where it stopped
            (see :mod:`cem_fast.cache`). ``fresh=True`` discards this run's cached samples first.
        max_pixels: refuse larger images before decoding them (default 8192 x 8192; None: no limit).
        trust_model_code: allow a model spec that names a program file (TorchScript, torch.export ``.pt2``),
            which can run code when it is loaded; never needed for checkpoints (state dicts).

    Returns:
        :class:`CEMResults`, one :class:`CEMResult` per ROI, in order.
    """
    t0 = time.perf_counter()
    if isinstance(model, nn.Module):
        name = model_name or type(model).__name__
    else:
        model, name = load_model(model, scale=int(task_options.get("scale", 4)), trust_model_code=trust_model_code)
        name = model_name or name
    task_obj = make_task(task, **task_options)
    _check_positive("block", block)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if locality not in LOCALITY:
        raise ValueError(f"locality must be one of {', '.join(LOCALITY)}, got {locality!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if mode == "exhaustive":
        samples = fine if samples is None else samples
        _check_positive("samples", samples)
        coarse, fine = 0, samples
    else:
        _check_positive("coarse", coarse)
        _check_positive("fine", fine, allow_zero=True)
    if not (isinstance(tol, (int, float)) and tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a non-negative number of dB, got {tol!r}")
    if batch_size is not None and batch_size != "auto":
        _check_positive("batch_size", batch_size)
    checks.integer("seed", seed, 0, checks.SEED_MAX)
    if coarse + fine > DRAW_STRIDE:
        raise ValueError(f"coarse + fine (or samples) must be at most {DRAW_STRIDE} draws per block (intervention "
                         f"ids keep 20 bits for the draw index), got {coarse + fine}")
    if max_pixels is not None:
        checks.integer("max_pixels", max_pixels, 1)
    clean, default_name = load_image(image, max_pixels)
    image_name = image_name or default_name
    bank = load_patch_bank(patches)
    bank_digest = bank.digest()
    if rois is None and roi_grid is None:
        raise ValueError("give rois (a list of (y, x, size)) or roi_grid (a tile size in px)")
    dev = _pick_device(model, device)
    prep = task_obj.prepare(clean, block, image_name, dev)
    grid = prep.grid
    roi_list = _parse_rois(rois, roi_grid, grid.out_h, grid.out_w)
    n_rois = len(roi_list)
    cropped_from = list(clean.shape[-2:]) if tuple(prep.gt.shape) != tuple(clean.shape) else None

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
    if progress is None:
        progress = sys.stderr.isatty()

    def forward_in(prec: str):
        def forward(x: torch.Tensor, owned: bool = False) -> torch.Tensor:
            """``owned``: ``x`` is a batch buffer rewritten before its next use, so an in-place model may write
            into it; any other input (views of the base input, probe inputs) is copied first, so that a model
            doing ``x.mul_(0.9)`` cannot change what later forwards see."""
            x = x.contiguous(memory_format=memory_format) if owned else _private_copy(x, memory_format)
            with precision_mode(prec, dev):
                if not graphs:
                    return model(x)
                # CUDA graphs replay into the same output memory: keep a copy, since the unintervened output and
                # the locality probe's outputs are read after later forwards
                torch.compiler.cudagraph_mark_step_begin()
                return model(x).clone()
        return forward

    graphs = False  # whether the compiled model replays CUDA graphs
    if compile:
        mode_name = compile if isinstance(compile, str) else ("reduce-overhead" if dev.type == "cuda" else None)
        model = torch.compile(model, mode=mode_name, dynamic=False)
        graphs = dev.type == "cuda" and mode_name in ("reduce-overhead", "max-autotune")
    forward = forward_in(precision)
    expected = (1,) + tuple(prep.gt.shape)
    in_px = grid.in_h * grid.in_w

    def full_forward() -> torch.Tensor:
        try:
            out = forward(prep.base.unsqueeze(0))
        except Exception as e:
            raise RuntimeError(f"model {name} raised on the {tuple(prep.base.shape)} input: "
                               f"{type(e).__name__}: {first_line(e)}") from e
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"model {name} output must be {expected} for a {tuple(prep.base.shape)} input "
                             f"(task {task_obj.name} x{task_obj.scale}), got {got}")
        if not torch.isfinite(out).all():
            raise ValueError(f"model {name} output has NaN/Inf values on the unintervened input")
        return out

    marks = {"prepare": time.perf_counter()}  # where the time went, for summary.json
    with torch.inference_mode():
        use_locality = locality == "auto" and task_obj.supports_windows
        out0 = full_forward() if (not use_locality or in_px <= FULL_FORWARD_MAX_PX) else None
        auto_batch = batch_size in (None, "auto")
        # the probe's batches hold crops of a window around the ROI: a fixed, small batch is enough
        probe_batch = int(batch_size) if not auto_batch else (PROBE_BATCH_CUDA if dev.type == "cuda" else 4)

        def verification_inputs(block_ids: np.ndarray, window: Window) -> torch.Tensor:
            b = torch.from_numpy(block_ids).to(dev)
            ids = b * DRAW_STRIDE
            pidx = rng.patch_draws(int(seed), ids, bank_in.shape[0])
            return task_obj.intervene(prep, bank_in, pidx, b, ids, int(seed), backend_name, window=window)

        if use_locality:
            plan = plan_locality(forward, prep.base, grid, roi_list, batch_size=probe_batch,
                                 precision=precision, full_output=out0,
                                 interventions=verification_inputs)
        else:
            why = "exact mode (locality='off')" if locality == "off" else \
                "a custom degradation sees the whole image, so it cannot be cropped"
            plan = LocalityPlan.off(n_rois, grid, locality, why)
        if out0 is None and plan.window is None:
            out0 = full_forward()  # locality found nothing to crop: the whole image runs after all
        bs_key = None
        if auto_batch:  # sized for what the batches hold: the crop, or the whole input
            sample_in = plan.window.crop(prep.base) if plan.window is not None else prep.base
            bs_key = (tuple(sample_in.shape), precision, str(dev))
            batch = auto_batch_size(model, forward, sample_in, bs_key)
        else:
            batch = int(batch_size)

        run_cache, cache_note = None, None
        if cache is not None:
            code_digest, code_unknown = model_code_digest(model)
            components = {
                "model": model_digest(model), "model_code": code_digest,
                "gt": digest_bytes(prep.gt.cpu().numpy().tobytes()),
                "input": digest_bytes(prep.base.cpu().numpy().tobytes(), str(tuple(prep.base.shape)).encode()),
                "task": task_obj.describe(), "rois": [r.as_tuple() for r in roi_list], "block": block,
                "bank": bank_digest, "seed": int(seed), "coarse": coarse, "fine": fine, "tol": float(tol),
                "mode": mode, "locality": locality, "window": plan.window.as_list() if plan.window else None,
                "precision": precision, "draws": DRAWS_VERSION, "model_name": name, "image": image_name,
            }
            key_parts = {k: v for k, v in components.items() if k not in ("model_name", "image")}
            if code_unknown:  # a model whose code may have changed unseen: its samples are never reused
                key_parts["never_reused"] = os.urandom(16).hex()
                cache_note = f"samples not reused across runs: {code_unknown}"
            run_cache = RunCache(cache, run_key(key_parts), components, fresh=fresh)
        _check_sample_memory(int(plan.reach.reshape(n_rois, -1).any(0).sum()), coarse, fine, n_rois)
        marks["probe"] = time.perf_counter()
        runner = _Runner(forward, task_obj, prep, bank_in, roi_list, int(seed), batch, backend_name,
                         progress, run_cache, memory_format, plan.window)
        try:
            if plan.window is None and out0 is not None:
                psnr_origin = runner.score_outputs(out0)[0].cpu().numpy()
            else:
                psnr_origin = runner.origin()
            sampled = _sample(runner, grid, plan.reach, psnr_origin, coarse, fine, tol)
        finally:
            runner.close()
        if bs_key is not None:
            remember_batch_size(model, bs_key, runner.batch_size)

        for j in range(n_rois):
            bad = sampled.first_nan(j)
            if bad is not None:
                stage, count, b, k = bad
                r, c = divmod(b, grid.cols)
                raise ValueError(f"model {name} produced NaN/Inf outputs in the ROI for {count} {stage} "
                                 f"interventions (first: block ({r}, {c}), draw {k}); refusing to average them")
        marks["sampling"] = time.perf_counter()
        gated = sampled.gated.reshape(n_rois, grid.rows, grid.cols)
        effects = [sampled.effect(j).reshape(grid.rows, grid.cols) for j in range(n_rois)]
        for j, e in enumerate(effects):
            _refuse_infinite_effects(e, float(psnr_origin[j]), roi_list[j], name)
        precision_check = None
        if precision != "fp32":
            precision_check = _check_precision(
                forward_in("fp32"), task_obj, prep, bank_in, roi_list, int(seed), batch, backend_name,
                memory_format, plan, effects, psnr_origin, gated, coarse, fine)
        # pictures: made on the device now, copied to the host when first read (an 8192x8192 run need not wait
        # for 400 MB of copies it may never use)
        picture = _on_host_later(_output_picture(out0, prep, plan.window, runner.origin_output, task_obj.scale))
        degraded = _on_host_later(_to_u8(prep.base))
        gt_cpu = task_obj.crop_to_scale(clean).contiguous()

    wall = time.perf_counter() - t0
    # seconds: loading and degrading the image and model; full forward, batch sizing and locality probe; the
    # interventions; statistics, precision check and pictures
    stamps = [t0, marks["prepare"], marks["probe"], marks["sampling"], t0 + wall]
    timings = {stage: round(b - a, 4) for stage, a, b in zip(("prepare", "probe", "sampling", "finish"), stamps,
                                                              stamps[1:])}
    common_extra = {
        **({"cropped_from": cropped_from} if cropped_from else {}), "reused_from_cache": runner.reused,
        "oom_backoffs": runner.oom_backoffs, "final_batch_size": runner.batch_size,
        "batch_size": batch_size if batch_size in (None, "auto") else int(batch_size),
        "precision": precision, "locality": plan.info, "timings_s": timings,
        **({"compile": compile} if compile else {}),
        **({"precision_check": precision_check} if precision_check else {}),
        **({"rois_in_pass": n_rois} if n_rois > 1 else {}),
        **({"cache_entry": str(run_cache.dir)} if run_cache is not None else {}),
        **({"cache_note": cache_note} if cache_note else {}),
        **({"cache_dropped_chunks": run_cache.dropped} if run_cache is not None and run_cache.dropped else {}),
        **({"output_picture": "model output inside the locality crop only"} if out0 is None else {}),
    }
    results = CEMResults()
    for j, roi in enumerate(roi_list):
        effect = effects[j]
        results.append(CEMResult(
            cem=np.where(np.abs(effect) >= tol, effect, 0.0), effect=effect,
            samples_coarse=Deferred((grid.rows, grid.cols, coarse), partial(_dense, sampled.dense_coarse, j, grid)),
            samples_fine=Deferred((grid.rows, grid.cols, fine), partial(_dense, sampled.dense_fine, j, grid)),
            gated=gated[j], psnr_origin=float(psnr_origin[j]), roi=roi,
            block=block, scale=task_obj.scale, tol=float(tol), task=task_obj.describe(), seed=int(seed),
            mode=mode, model_name=name, image_name=image_name, num_forwards=runner.forwards + (out0 is not None),
            wall_time=wall, backend=backend_name, device=str(dev),
            patch_bank={"source": bank.source, "size": len(bank), "patch_size": bank.patch_size,
                        "digest": bank_digest},
            gt=gt_cpu, degraded=degraded, output=picture,
            reachable=plan.reach[j], extra=dict(common_extra)))
    return results


@dataclass
class _Samples:
    """What the two stages ran, held for the blocks that ran only (an 8192x8192 input has a million blocks, of
    which about a hundred reach the ROI: dense (blocks, 50) arrays per ROI would cost 400 MB and most of a run).

    ``coarse``: (n_rois, len(run), coarse) ROI PSNRs of the blocks in ``run``; ``fine``: (n_rois, len(fine_run),
    fine) of those in ``fine_run``; ``gated``: (n_rois, blocks); ``reach``: (n_rois, blocks)."""

    run: np.ndarray
    coarse: np.ndarray
    fine_run: np.ndarray
    fine: np.ndarray
    gated: np.ndarray
    reach: np.ndarray
    origin: np.ndarray

    def effect(self, j: int) -> np.ndarray:
        """(blocks,) ROI j's Y(I) - mean Y_k: the fine mean where gated (and fine > 0), else the coarse mean; 0 for
        blocks that cannot reach the ROI (their samples are Y(I) exactly)."""
        nb = self.gated.shape[1]
        out = np.zeros(nb)
        reach, gated, o = self.reach[j], self.gated[j], self.origin[j]
        if self.coarse.shape[2] and len(self.run):
            keep = reach[self.run]
            out[self.run[keep]] = _effects(o, self.coarse[j][keep]).mean(axis=-1)
        if self.fine.shape[2] and len(self.fine_run):
            keep = reach[self.fine_run] & gated[self.fine_run]
            out[self.fine_run[keep]] = _effects(o, self.fine[j][keep]).mean(axis=-1)
        return out

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
            if bad.any():
                i, k = np.argwhere(bad)[0]
                return stage, int(bad.sum()), int(blocks[i]), int(k)
        return None


def _sample(runner: _Runner, grid, reach: np.ndarray, psnr_origin: np.ndarray, coarse: int, fine: int,
            tol: float) -> _Samples:
    """Run the coarse stage on every block that reaches some ROI and the fine stage on every block gated for some
    ROI. A block outside a ROI's reach gets Y_k = Y(I) exactly for that ROI (it cannot change it)."""
    n = len(psnr_origin)
    nb = grid.num_blocks
    flat_reach = reach.reshape(n, nb)
    run = np.flatnonzero(flat_reach.any(0)) if coarse else np.zeros(0, np.int64)
    got_coarse = np.zeros((n, len(run), coarse))
    if coarse:
        if len(run):
            b = torch.from_numpy(run).repeat_interleave(coarse)
            d = torch.arange(coarse).repeat(len(run))
            got_coarse = runner.run("coarse", b, d).reshape(len(run), coarse, n).transpose(2, 0, 1)
        gated = np.zeros((n, nb), dtype=bool)
        origin = psnr_origin.reshape(n, 1, 1)
        gated[:, run] = (np.abs(_effects(origin, got_coarse)) >= tol).any(axis=2) & flat_reach[:, run]
    else:
        gated = np.ones((n, nb), dtype=bool)
    fine_run = np.flatnonzero((gated & flat_reach).any(0)) if fine else np.zeros(0, np.int64)
    got_fine = np.zeros((n, len(fine_run), fine))
    if len(fine_run):
        b = torch.from_numpy(fine_run).repeat_interleave(fine)
        d = coarse + torch.arange(fine).repeat(len(fine_run))
        got_fine = runner.run("fine", b, d).reshape(len(fine_run), fine, n).transpose(2, 0, 1)
    return _Samples(run, got_coarse, fine_run, got_fine, gated, flat_reach, np.asarray(psnr_origin, np.float64))


def _dense(build: Callable[[int], np.ndarray], j: int, grid) -> np.ndarray:
    return build(j).reshape(grid.rows, grid.cols, -1)


def _check_precision(forward32, task_obj, prep, bank_in, rois, seed, batch, backend, memory_format,
                     plan: LocalityPlan, effects, psnr_origin, gated, coarse, fine) -> dict:
    """Recompute a sample of blocks in fp32 (same draws, same crop): the largest effects and a few at random.
    Reports the largest |CE(precision) - CE(fp32)| and the shift of Y(I)."""
    strength = np.max([np.abs(e) for e in effects], axis=0).reshape(-1)
    reach_any = plan.reach.any(0).reshape(-1)
    candidates = np.flatnonzero(reach_any)
    top = candidates[np.argsort(-strength[candidates], kind="stable")][:PRECISION_CHECK_BLOCKS // 2]
    rest = np.setdiff1d(candidates, top)
    pick = np.random.RandomState(seed).choice(rest, min(len(rest), PRECISION_CHECK_BLOCKS - len(top)),
                                              replace=False) if len(rest) else rest
    blocks = np.sort(np.concatenate([top, pick])).astype(np.int64)
    runner = _Runner(forward32, task_obj, prep, bank_in, rois, seed, batch, backend, False, None, memory_format,
                     plan.window)
    origin32 = runner.origin()
    n = len(rois)
    draws_per_block = coarse + (fine if np.asarray(gated).reshape(n, -1)[:, blocks].any() else 0)
    b = torch.from_numpy(blocks).repeat_interleave(draws_per_block)
    d = torch.arange(draws_per_block).repeat(len(blocks))
    got = runner.run("precision", b, d).reshape(len(blocks), draws_per_block, n).transpose(2, 0, 1)
    # the checked blocks' fp32 samples, read the way the run's were
    fine_run = blocks if draws_per_block > coarse else blocks[:0]
    fp32 = _Samples(blocks, got[:, :, :coarse], fine_run, got[:, :len(fine_run), coarse:],
                    np.asarray(gated).reshape(n, -1), plan.reach.reshape(n, -1), origin32)
    worst = 0.0
    for j in range(n):
        ce32 = fp32.effect(j)[blocks]
        worst = max(worst, float(np.nanmax(np.abs(ce32 - effects[j].reshape(-1)[blocks]))))
    return {"blocks_checked": int(len(blocks)), "max_abs_delta_ce_db": round(worst, 5),
            "psnr_origin_fp32": [float(v) for v in origin32],
            "psnr_origin_delta_db": round(float(np.max(np.abs(psnr_origin - origin32))), 5),
            "forwards": runner.forwards}


def _output_picture(out0: Optional[torch.Tensor], prep: Prepared, window: Optional[Window],
                    window_output: Optional[torch.Tensor], scale: int) -> torch.Tensor:
    """(3, H, W) uint8 model output for pictures; without a full forward (large inputs), the crop's output
    ``window_output`` pasted into the degraded input (nearest-upsampled)."""
    if out0 is not None:
        return _to_u8(out0[0])
    canvas = prep.base.repeat_interleave(scale, 1).repeat_interleave(scale, 2) if scale > 1 else prep.base.clone()
    out = window_output
    s = scale
    canvas[:, window.y * s:(window.y + window.h) * s, window.x * s:(window.x + window.w) * s] = out.to(canvas.dtype)
    return _to_u8(canvas)


def _to_u8(t: torch.Tensor) -> torch.Tensor:
    """An image in [0, 1] as uint8 on its device (clamped, x255, rounded), for pictures."""
    x = t.float().clamp(0, 1)  # a new tensor: the rest is in place (an 8192x8192 input is 805 MB a copy)
    return x.mul_(255).round_().to(torch.uint8)


def _on_host_later(t: torch.Tensor) -> "torch.Tensor | Deferred":
    return t if t.device.type == "cpu" else Deferred(tuple(t.shape), t.cpu)
