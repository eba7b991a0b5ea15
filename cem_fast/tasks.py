"""Tasks: how the clean image becomes the model input, and how an intervention is degraded.

Every task turns a clean uint8 image (C, H, W) into :class:`Prepared` (ground truth at output resolution and the
base model input) and builds intervened inputs for a batch of (block, patch) pairs through
:func:`cem_fast.ops.intervene`.

Custom degradations: pass ``CustomTask(degrade, scale=s)`` where ``degrade`` maps a batch of clean images
(N, C, H, W) float in [0, 1] to model inputs (N, C, H/s, W/s). Each intervention pastes the patch into the clean
image and calls ``degrade`` on the whole intervened image; ``degrade`` must be deterministic for Y(I) to be
meaningful (seed any randomness inside it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import checks, ops
from .geometry import BlockGrid, int64_on_device
from .options import INPUT_NOISES, TASKS, TaskOptions
from .rain import PRESETS, rain_layer, seed_from_name


@dataclass
class Prepared:
    """A task applied to one image: ``gt`` (C, H, W) uint8 at output resolution, ``base`` (C, h, w) float input."""

    gt: torch.Tensor
    base: torch.Tensor
    grid: BlockGrid
    extra: dict = field(default_factory=dict)

    def to(self, device: torch.device) -> "Prepared":
        extra = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.extra.items()}
        return Prepared(self.gt.to(device), self.base.to(device), self.grid, extra)


def resize_patches(bank: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (P, C, pb, pb) uint8 patches to ``size x size``: bicubic (a=-0.75) without antialiasing, rounded,
    like OpenCV's INTER_CUBIC that the reference uses."""
    if bank.shape[-1] == size:
        return bank
    x = F.interpolate(bank.float(), size=(size, size), mode="bicubic", align_corners=False)
    return torch.round(x).clamp(0, 255).to(torch.uint8)


class Task:
    """Base class. Subclasses set ``name`` and ``scale`` and implement ``degrade_image`` and ``intervene``."""

    name = "task"
    scale = 1

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "scale": self.scale}

    def crop_to_scale(self, clean: torch.Tensor) -> torch.Tensor:
        H, W = clean.shape[-2:]
        return clean[:, : H - H % self.scale, : W - W % self.scale]

    #: whether :meth:`degrade_image` runs where the run runs (on the GPU) rather than on the CPU
    degrades_on_device = False

    def prepare(self, clean: torch.Tensor, block: int, image_name: str = "",
                device: Optional[torch.device] = None) -> Prepared:
        """Apply the task to a clean (C, H, W) uint8 image; the grid covers the (scale-cropped) output.
        ``device``: where a task that :attr:`degrades_on_device` degrades the image (default: the image's)."""
        gt = self.crop_to_scale(clean)
        if self.degrades_on_device and device is not None:
            gt = gt.to(device)
        grid = BlockGrid(gt.shape[-2], gt.shape[-1], block, self.scale)
        base, extra = self.degrade_image(gt, image_name)
        # contiguous once here: the fused ops need it, and a (C, H, W) view of an (H, W, C) array would be copied
        # by every batch (805 MB per batch for an 8192x8192 input)
        return Prepared(gt.contiguous(), base.contiguous(), grid, extra)

    def degrade_image(self, gt: torch.Tensor, image_name: str) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def bank_at_input(self, bank: torch.Tensor, block: int) -> torch.Tensor:
        """The patch bank as pasted into the input: (P, C, block/scale, block/scale) uint8."""
        return resize_patches(bank, block // self.scale)

    #: whether :meth:`intervene` can write crops of the input (needed for locality cropping)
    supports_windows = True

    def intervene(self, prep: Prepared, bank_in: torch.Tensor, patch_idx: torch.Tensor, blocks: torch.Tensor,
                  ids: torch.Tensor, seed: int, backend: Optional[str] = None, window=None,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(K, C, h, w) inputs with block ``blocks[k]`` (row-major id) replaced by patch ``patch_idx[k]``; with
        ``window`` (a :class:`cem_fast.locality.Window`) only that crop of each input, written into ``out``; with
        ``window = (origins, (h, w))`` (origins (K, 2) input px) a window of its own for each intervention."""
        origins = prep.extra["origins"][blocks]
        sizes = prep.extra["sizes"][blocks]
        crop = {}
        if isinstance(window, tuple):
            crop = {"window_origins": window[0], "window_size": tuple(window[1])}
        elif window is not None:
            o = int64_on_device(((window.y, window.x),), prep.base.device)
            crop = {"window_origins": o.expand(len(blocks), 2).contiguous(), "window_size": (window.h, window.w)}
        return ops.intervene_unchecked(prep.base, bank_in, patch_idx, origins, sizes, ids=ids, seed=seed,
                                       backend=backend, out=out, **crop, **self.intervene_kwargs(prep))

    def intervene_kwargs(self, prep: Prepared) -> dict:
        return {}


def _with_grid_boxes(prep: Prepared) -> Prepared:
    prep.extra["origins"] = prep.grid.input_origins()
    prep.extra["sizes"] = prep.grid.input_sizes()
    return prep


class _GridTask(Task):
    def prepare(self, clean: torch.Tensor, block: int, image_name: str = "",
                device: Optional[torch.device] = None) -> Prepared:
        return _with_grid_boxes(super().prepare(clean, block, image_name, device))


class Identity(_GridTask):
    """The model input is the clean image itself (for models that enhance or for tests)."""

    name = "identity"

    def degrade_image(self, gt, image_name):
        return gt.float() / 255.0, {}


class SuperResolution(_GridTask):
    """SR x ``scale``: the input is PIL's bicubic downscale of the clean image (cropped to a multiple of scale);
    a patch is resized to ``block/scale`` input pixels (bicubic, no antialiasing) and pasted into the LR input."""

    name = "SR"

    def __init__(self, scale: int = 4):
        checks.integer("sr scale", scale, 1)
        self.scale = int(scale)

    def degrade_image(self, gt, image_name):
        H, W = gt.shape[-2:]
        pil = Image.fromarray(gt.permute(1, 2, 0).cpu().numpy())
        lr = pil.resize((W // self.scale, H // self.scale), Image.BICUBIC)
        return torch.from_numpy(np.asarray(lr).copy()).permute(2, 0, 1).float() / 255.0, {}


#: intervention id of the counter-based input noise: above every intervention id (block * 2^20 + draw)
INPUT_NOISE_ID = (1 << 62) - 1


class Denoise(_GridTask):
    """DN ``sigma``: Gaussian noise (0..255 units) added to the image in [0, 1], clipped, truncated to uint8.

    ``input_noise="numpy"`` (default): the input noise comes from numpy's legacy generator seeded with
    ``noise_seed``, the reference's convention, so Y(I) matches it. It is drawn on the CPU, one value after the
    other (a cost that grows with the image: docs/speed.md). ``"counter"``: the input noise comes from the
    counter-based RNG of the interventions, keyed by (``noise_seed``, a reserved id, pixel), and is drawn where
    the run runs by the fused intervene op; a different noise draw of the same sigma.
    Each intervention adds fresh noise of the same sigma to its patch from the counter-based RNG keyed by
    (seed, intervention id, pixel), clips and truncates.
    """

    name = "DN"

    def __init__(self, sigma: float = 50.0, noise_seed: int = 0, input_noise: str = "numpy"):
        if isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and sigma <= 0:
            raise ValueError(f"sigma must be positive (0..255 units), got {sigma}")
        self.sigma = checks.number("sigma", sigma, 0, 255, lo_open=True)
        checks.choice("input_noise", input_noise, INPUT_NOISES)
        self.noise_seed = checks.integer("noise_seed", noise_seed, 0, checks.NUMPY_SEED_MAX)
        self.input_noise = input_noise
        self.degrades_on_device = input_noise == "counter"

    def describe(self):
        return {**super().describe(), "sigma": self.sigma, "noise_seed": self.noise_seed,
                "input_noise": self.input_noise}

    NOISE_CHUNK = 1 << 20  # values per chunk: bounded float64 temporaries on large images

    def degrade_image(self, gt, image_name):
        if self.input_noise == "counter":
            return self._counter_noise(gt), {}
        hwc = gt.permute(1, 2, 0).cpu().numpy()
        H, W, C = hwc.shape
        noisy = np.empty((H, W, C), dtype=np.uint8)
        gen = np.random.RandomState(self.noise_seed)
        rows = max(1, self.NOISE_CHUNK // (W * C))
        # Row chunks draw the same normals, in the same order, as one (H, W, C) draw (the legacy generator
        # continues its stream), and the float64 arithmetic per value is the reference's: identical pixels.
        for r in range(0, H, rows):
            img = hwc[r:r + rows].astype(np.float64) / 255.0
            noise = gen.normal(0, self.sigma / 255.0, img.shape)
            noisy[r:r + rows] = (np.clip(img + noise, 0, 1) * 255).astype(np.uint8)
        return torch.from_numpy(noisy).permute(2, 0, 1).contiguous().float().div_(255.0), {}

    def _counter_noise(self, gt: torch.Tensor) -> torch.Tensor:
        """The whole image as one intervention: the clean image pasted over itself with fresh noise, by the same
        fused op (and so the same numbers on every backend) as the interventions."""
        C, H, W = gt.shape
        side = max(H, W)  # the op pastes square patches; the pad is never read (the block is H x W)
        image = F.pad(gt, (0, side - W, 0, side - H)).unsqueeze(0) if H != W else gt.unsqueeze(0)
        dev = gt.device
        one = torch.zeros(1, dtype=torch.int64, device=dev)
        # the op first copies ``base`` into its output; every pixel is then overwritten, so base is left unset
        base = torch.empty(C, H, W, dtype=torch.float32, device=dev)
        return ops.intervene_unchecked(base, image.contiguous(), one, torch.zeros(1, 2, dtype=torch.int64, device=dev),
                                       torch.tensor([[H, W]], dtype=torch.int64, device=dev),
                                       ids=one + INPUT_NOISE_ID, seed=self.noise_seed, noise_sigma=self.sigma)[0]

    def intervene_kwargs(self, prep):
        return {"noise_sigma": self.sigma}


class Derain(_GridTask):
    """DR: a synthetic rain layer (preset small/medium/large/random, seeded by ``rain_seed`` or the first integer
    in the image's file name) is added with saturation; an intervention pastes the patch into the clean image and
    re-adds the same rain."""

    name = "DR"

    def __init__(self, preset: str = "medium", beta: Optional[float] = None, rain_seed: Optional[int] = None):
        if preset not in PRESETS:
            raise ValueError(f"rain preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        if beta is not None:
            beta = checks.number("rain beta", beta, 0, 2, lo_open=True)
        if rain_seed is not None:
            rain_seed = checks.integer("rain_seed", rain_seed, 0, checks.NUMPY_SEED_MAX)
        self.preset, self.beta, self.rain_seed = preset, beta, rain_seed

    def describe(self):
        return {**super().describe(), "preset": self.preset, "beta": self.beta, "rain_seed": self.rain_seed}

    def degrade_image(self, gt, image_name):
        seed = self.rain_seed if self.rain_seed is not None else seed_from_name(image_name)
        C, H, W = gt.shape
        layer, beta = rain_layer(H, W, seed, self.preset)
        beta = self.beta if self.beta is not None else beta
        rain = torch.from_numpy(beta * layer).float().expand(C, H, W).contiguous()
        rainy = torch.floor(torch.clamp(gt.float() + rain, max=255.0))
        return rainy / 255.0, {"rain": rain, "rain_seed": seed, "beta": beta}

    def intervene_kwargs(self, prep):
        return {"rain": prep.extra["rain"]}


class CustomTask(Task):
    """A user degradation ``degrade((N, C, H, W) clean in [0, 1]) -> (N, C, H/scale, W/scale) input``."""

    def __init__(self, degrade: Callable[[torch.Tensor], torch.Tensor], scale: int = 1, name: str = "custom"):
        if not callable(degrade):
            raise ValueError(f"degrade must be callable, got {type(degrade).__name__}")
        self.degrade, self.scale, self.name = degrade, int(scale), name

    def describe(self):
        return {**super().describe(), "degrade": getattr(self.degrade, "__qualname__", repr(self.degrade))}

    def degrade_image(self, gt, image_name):
        clean = gt.float().unsqueeze(0) / 255.0
        with torch.inference_mode():
            base = self.degrade(clean)[0]
        expected = (gt.shape[0], gt.shape[1] // self.scale, gt.shape[2] // self.scale)
        if tuple(base.shape) != expected:
            raise ValueError(f"custom degrade must return inputs of shape (N, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}) for scale {self.scale}, got {tuple(base.shape)}")
        return base, {"clean": clean[0]}

    def prepare(self, clean, block, image_name="", device=None):
        prep = super().prepare(clean, block, image_name, device)
        full = BlockGrid(prep.grid.out_h, prep.grid.out_w, block, 1)  # patches go into the clean image
        prep.extra["origins"] = full.input_origins()
        prep.extra["sizes"] = full.input_sizes()
        return prep

    def bank_at_input(self, bank, block):
        return resize_patches(bank, block)

    supports_windows = False  # the degradation sees the whole intervened image

    def intervene(self, prep, bank_in, patch_idx, blocks, ids, seed, backend=None, window=None, out=None):
        if window is not None:
            raise ValueError("a custom task cannot write crops (window must be None)")
        clean = prep.extra["clean"].to(prep.base.device)
        intervened = ops.intervene_unchecked(clean, bank_in, patch_idx, prep.extra["origins"][blocks],
                                             prep.extra["sizes"][blocks], ids=ids, seed=seed, backend=backend)
        return self.degrade(intervened)


def make_task(task: "str | Task", **task_options: Any) -> Task:
    """A task from a name: ``SR`` (x ``scale``), ``DN`` (``sigma``, ``noise_seed``, ``input_noise``), ``DR``
    (``rain_preset``, ``rain_beta``, ``rain_seed``), ``identity``; the options and their defaults are those of
    :class:`~cem_fast.options.TaskOptions`."""
    o = TaskOptions.of(**task_options)
    if isinstance(task, Task):
        return task
    key = str(task).strip().upper()
    if key == "SR":
        return SuperResolution(o.scale)
    if key == "DN":
        return Denoise(o.sigma, o.noise_seed, o.input_noise)
    if key == "DR":
        return Derain(o.rain_preset, o.rain_beta, o.rain_seed)
    if key in ("IDENTITY", "ID", "NONE"):
        return Identity()
    raise ValueError(f"task must be one of {', '.join(TASKS)} (or a Task), got {task!r}")
