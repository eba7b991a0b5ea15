"""The Causal Effect Map estimator (docs/method.md): coarse-to-fine or exhaustive Monte Carlo over patch interventions.

``CE_ij = Y(I) - mean_k Y(I with block ij <- p_k)`` with ``Y`` the ROI PSNR (uint8 convention). Every block gets
``coarse`` interventions; blocks whose largest |Y(I) - Y_k| reaches ``tol`` get ``fine`` fresh ones, whose mean
replaces the coarse one. Draws are keyed by (seed, block, draw index) (:func:`cem_fast.rng.patch_draws` for the
patch, the counter-based noise for DN), so the samples depend neither on the batch size, nor on the backend, nor
on which other blocks run.

Speed (``locality="auto"``, the default): blocks that cannot reach the ROI are skipped (CE exactly 0) and the rest
run on the input crop that determines the ROI, both found by probing and verified (:mod:`cem_fast.locality`).
``locality="off"`` is the exact mode. Many ROIs (:func:`causal_effect_maps`) share one set of forward passes.

This module keeps the public functions; the steps (options, plan, runner, samples, precision, assemble) live in
:mod:`cem_fast.pipeline`.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from .geometry import RoiLike
from .images import ImageLike, load_image  # noqa: F401 - importable from here since the first release
from .patches import PatchBank
from .options import DEFAULT_MAX_PIXELS, DRAW_STRIDE, MODES, RunOptions, TaskOptions  # noqa: F401
from .pipeline.run import run_cem
from .pipeline.samples import effects  # noqa: F401 - Y(I) - Y_k per sample, for compare and the benchmarks
from .result import CEMResult, CEMResults
from .tasks import Task


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
    roi_plan: str = "auto",
    windows: str = "auto",
    incremental: str = "auto",
    precision: str = "fp32",
    compile: Union[bool, str] = False,
    mode: str = "coarse-to-fine",
    samples: Optional[int] = None,
    budget: Optional[int] = None,
    half_width_rel: Optional[float] = None,
    half_width_db: Optional[float] = None,
    estimator: str = "control-variate",
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
        roi_plan: many ROIs: "auto" (default) runs one shared pass (every intervention of the union's reachable
            blocks, on the union's crop) or one run per ROI (each on its own crop), whichever moves fewer input
            pixels, counted before running (``summary.json: plan``); "shared" or "per-roi" forces one. The maps
            are the same either way.
        windows: "auto" (default): where locality is verified, each intervention runs on the smallest input
            window that determines the part of the ROIs it can change, its ROI error composed exactly from the
            unintervened one (:mod:`cem_fast.pipeline.engines.windows`; verified per run, else the crop, and
            ``summary.json: locality.windows`` says why); "crop": every intervention on the ROIs' crop.
        incremental: "auto" (default): where locality is verified and the model is made of supported ops (same-
            padded stride-1 convolutions, pointwise activations and batch norm, residual sums; scale 1), each
            intervention recomputes layer by layer only what it changes, from the unintervened activations
            (:mod:`cem_fast.pipeline.engines.incremental`; checked per run against the crop, else the windows, and
            ``summary.json: locality.incremental`` says why), where it saves enough convolution work to pay for
            its fixed cost per graph node; "on": wherever it applies and verifies, whatever it saves; "off": the
            windows or the crop.
        precision: "fp32" (default; TF32 off), "tf32", "bf16" or "fp16" (autocast); reduced precision is checked
            against fp32 on a sample of blocks and reported (``summary.json: precision_check``).
        compile: run the model through ``torch.compile`` (True: mode "reduce-overhead", i.e. CUDA graphs, on CUDA
            and the default mode on the CPU; a string: that mode). Worth it for small crops on a GPU, where launch
            overhead dominates; it costs a compilation per input shape (what it gave where measured: docs/speed.md).
        device: where to run (default: the model's CUDA device, else CUDA when available, else CPU).
        batch_size: interventions per forward; "auto" (default): the largest that fits (CUDA) or about 64k input
            pixels (CPU), remembered per model and input shape; out-of-memory errors back off and continue.
        mode: "coarse-to-fine" (the paper's), "exhaustive" (``samples`` draws for every block) or
            "adaptive": after the coarse stage (at least 2 draws), rounds of 8 more draws for every block, at least
            one round each, until its 95 % interval lies above +tol, below -tol or inside (-tol, tol) and is no
            wider than ``max(tol, half_width_rel * |effect|, half_width_db)``, up to ``fine`` more per block; a
            block's effect is estimated from all its draws.
        samples: draws per block in exhaustive mode (default ``fine``).
        budget: adaptive mode: at most this many extra forwards in all (the widest intervals draw first; once
            every block has stopped, the rest refines the widest outside the ROI, up to ``fine`` per block).
        half_width_rel, half_width_db: adaptive mode: the stopping half-width (defaults 0.2 and 0.05 dB).
        estimator: "control-variate" (default): where a block has at least 11 draws, its effect is the
            intercept of the regression of its draws' effects on the drawn patches' channel means (known mean
            over the bank), with an HC3 standard error: the same expectation as the mean with much less noise
            (measured: docs/uncertainty.md, benchmarks/results/*convergence*); "mean": the plain
            mean of the draws, as the paper and the reference.
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
    run = RunOptions(block=block, coarse=coarse, fine=fine, tol=tol, seed=seed, mode=mode, samples=samples,
                     budget=budget, half_width_rel=half_width_rel, half_width_db=half_width_db,
                     estimator=estimator, locality=locality, roi_plan=roi_plan, windows=windows,
                     incremental=incremental, precision=precision,
                     batch_size=batch_size, device=device, backend=backend, compile=compile, progress=progress,
                     cache=cache, fresh=fresh, max_pixels=max_pixels, trust_model_code=trust_model_code)
    return run_cem(model, image, task, rois, roi_grid, patches, run, TaskOptions.of(**task_options),
                   model_name=model_name, image_name=image_name)
