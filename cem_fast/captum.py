"""Captum adapter: Causal Effect Maps as a Captum perturbation attribution (needs ``pip install "cem_fast[captum]"``).

>>> from cem_fast.captum import CausalEffect
>>> ce = CausalEffect(model, task="DN", sigma=25)                # model: (N, 3, h, w) [0, 1] -> (N, 3, H, W)
>>> attr = ce.attribute(images, target=(16, 16, 16), seed=0)    # images: (N, 3, H, W) clean, float in [0, 1]
>>> attr.shape == images.shape                                   # each block's causal effect in dB on its pixels

The "input" of the attribution is the clean image: for every image of ``inputs`` (attributed separately) the
task degrades it into the model input, each ``block x block`` block of the clean image is replaced by natural
patches (and degraded again), and the block's attribution is the mean drop of the ROI's PSNR (dB) that this
causes: ``CE = Y(I) - mean_k Y(I with block <- p_k)``. Positive: the block's content helps the model restore the
ROI; negative: it hurts it. Every pixel (and channel) of a block carries the block's value, as Captum's
:class:`~captum.attr.Occlusion` spreads a window's difference over the window. The numbers are exactly those of
:func:`cem_fast.causal_effect_map` run with the same image, task, ROI, seed and options: the adapter calls it.

Mapping of Captum's arguments:

- ``forward_func``: the image-to-image model (an ``nn.Module`` or any callable ``(N, 3, h, w) -> (N, 3, H, W)``).
- ``inputs``: the clean images, an (N, 3, H, W) float tensor in [0, 1] (or a 1-tuple of it; the result is then a
  1-tuple). Like every cem_fast input, each image is quantised to 8 bits (``round(x * 255)``) first.
- ``target``: the ROI in output pixels, ``(y, x, size)`` or ``(y, x, height, width)`` (also a
  :class:`cem_fast.ROI` or a dict), one for every image, or a list of N of them, one per image. Required.
- ``additional_forward_args``: passed unchanged after the model input to every forward (tensors are not split per
  example: each forward holds interventions of one image).
- ``perturbations_per_eval``: interventions per forward (cem_fast's ``batch_size``). Default ``"auto"`` (cem_fast's
  memory-based choice), not Captum's 1: the attributions do not depend on it, only the speed does.
- ``show_progress``: cem_fast's progress bar.

The method's options (``task`` and its ``scale`` / ``sigma`` / ``noise_seed`` / ``rain_*``, ``block``,
``coarse``, ``fine``, ``tol``, ``patches``, ``seed``, ``mode``, ``samples``, ``locality``, ``precision``,
``device``, ``backend``, ``cache``, ...; see :func:`cem_fast.causal_effect_maps`) are given to the constructor as
defaults and may be overridden for one call as keyword arguments of :meth:`CausalEffect.attribute`. ``values``
chooses the map: ``"cem"`` (default: ``res.cem``, |CE| < ``tol`` set to 0, as displayed) or ``"effect"``
(``res.effect``, unthresholded). The ROI's own blocks are 0 in the attributions by default: intervening on the
ROI itself moves its PSNR by several dB (7-8 dB for a denoiser, against 0.05-0.2 dB for the blocks around it), so
kept, they would take the whole colour scale of a plot such as ``captum.attr.visualization.visualize_image_attr``
(one square on the ROI, nothing else visible), as they are left out of cem_fast's own counts, ranges and colour
scales. ``include_roi=True`` keeps them. ``return_results=True`` also returns the :class:`cem_fast.CEMResult` of
every image (all samples, statistics, ``save()``: the ROI's blocks are there in any case); the last call's results
stay in ``last_results``.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

try:
    from captum.attr import PerturbationAttribution
    from captum.log import log_usage
except ImportError as _e:  # one line, with the way out
    raise ImportError(f'cem_fast.captum needs Captum >= 0.9: pip install "cem_fast[captum]" (or pip install '
                      f'"captum>=0.9"); importing it failed: {str(_e).splitlines()[0] if str(_e) else _e!r}') from None

import cem_fast
from cem_fast import CEMResult, ROI

__all__ = ["CausalEffect"]

VALUES = ("cem", "effect")
# cem_fast arguments that have a Captum name, or that the adapter sets itself
_RESERVED = {
    "batch_size": "perturbations_per_eval", "progress": "show_progress", "roi": "target", "rois": "target",
    "roi_grid": "target (one ROI per image)", "model": "forward_func", "image": "inputs",
}


class _ForwardWithArgs(nn.Module):
    """``forward_func(x, *args)`` as a module (cem_fast runs modules). A module ``forward_func``, or the module of
    a bound method such as ``model.forward``, is a child, so moving, ``eval()`` and the channels_last choice reach
    it."""

    def __init__(self, forward_func: Callable, args: tuple):
        super().__init__()
        self.forward_func = forward_func
        owner = getattr(forward_func, "__self__", None)
        if not isinstance(forward_func, nn.Module) and isinstance(owner, nn.Module):
            self.owner = owner
        self.args = args

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_func(x, *self.args)


def _func_name(forward_func: Callable) -> str:
    if isinstance(forward_func, nn.Module):
        return type(forward_func).__name__
    if isinstance(getattr(forward_func, "__self__", None), nn.Module):  # model.forward
        return type(forward_func.__self__).__name__
    return getattr(forward_func, "__name__", None) or type(forward_func).__name__


class CausalEffect(PerturbationAttribution):
    r"""Causal Effect Maps (Hu et al., TPAMI 2025) of an image-to-image model, as a Captum attribution.

    For each image, each block of the clean image is intervened on (replaced by natural patches, degraded by the
    task again) and its attribution is the mean change of the ROI's PSNR in dB, positive when the block's content
    helps restore the ROI. See the module docstring for the mapping of Captum's arguments.

    Args:
        forward_func: the model, an ``nn.Module`` or a callable ``(N, 3, h, w) float [0, 1] -> (N, 3, H, W)``.
        task: "SR", "DN", "DR", "identity" or a :class:`cem_fast.Task` (default "DN").
        values: "cem" (default; the thresholded map ``res.cem``) or "effect" (``res.effect``).
        include_roi: keep the ROI's own blocks in the attributions (default False: they are 0, because their
            effect, several dB, would swamp every plot of the blocks around them).
        **options: the options of :func:`cem_fast.causal_effect_map` / :func:`cem_fast.causal_effect_maps` and
            of the task, with their defaults there: ``block``, ``coarse``, ``fine``, ``tol``, ``patches``,
            ``seed``, ``mode``, ``samples``, ``scale`` (SR), ``sigma`` (DN), ``locality``, ``precision``,
            ``device``, ``backend``, ``cache``, ... (checked by cem_fast when :meth:`attribute` runs).

    Every option is a default: :meth:`attribute` takes the same keywords for one call.
    """

    def __init__(self, forward_func: Callable, task: Union[str, "cem_fast.Task"] = "DN", *, values: str = "cem",
                 include_roi: bool = False, **options: Any) -> None:
        if not callable(forward_func):
            raise TypeError(f"forward_func: expected an nn.Module or a callable, got {type(forward_func).__name__}"
                            " (for a model spec such as 'bicubic:x4' use cem_fast.load_model(spec)[0])")
        PerturbationAttribution.__init__(self, forward_func)
        # only what was given: the rest keeps cem_fast's own defaults (block 8, coarse 3, fine 50, tol 0.01, seed 0)
        self.options = self._checked({"task": task, "values": values, "include_roi": include_roi, **options})
        self.last_results: list[CEMResult] = []

    # Captum: perturbation attributions are "global" (they measure the effect of replacing the input's content,
    # not a local slope), so the inherited ``multiplies_by_inputs = True`` holds; no convergence delta.
    def has_convergence_delta(self) -> bool:
        return False

    @staticmethod
    def _checked(options: dict) -> dict:
        """The adapter's own checks; cem_fast checks the rest (names and values) when :meth:`attribute` runs."""
        for key in options:
            if key in _RESERVED:
                raise ValueError(f"{key}: given through Captum's argument {_RESERVED[key]} here, not as an option")
        values = options.get("values", "cem")
        if values not in VALUES:
            raise ValueError(f"values: expected one of {', '.join(VALUES)}, got {values!r}")
        if not isinstance(options.get("include_roi", False), bool):
            raise ValueError(f"include_roi: expected True or False, got {options['include_roi']!r}")
        return options

    @log_usage(part_of_slo=True)
    def attribute(  # type: ignore[override]
        self,
        inputs: Union[torch.Tensor, tuple],
        target: Any = None,
        additional_forward_args: Optional[object] = None,
        perturbations_per_eval: Union[int, str, None] = "auto",
        show_progress: bool = False,
        return_results: bool = False,
        **options: Any,
    ):
        r"""Causal effect (dB) of every block of every image in ``inputs`` on the PSNR of its ``target`` ROI.

        Args:
            inputs: clean images, (N, 3, H, W) float in [0, 1] (or a 1-tuple of it).
            target: the ROI in output pixels, ``(y, x, size)`` or ``(y, x, height, width)``, for every image, or
                a list of N ROIs, one per image. Required.
            additional_forward_args: extra arguments given unchanged after the model input to every forward.
            perturbations_per_eval: interventions per forward (cem_fast's ``batch_size``; "auto" by default).
                The attributions do not depend on it.
            show_progress: show cem_fast's progress bar.
            return_results: also return the list of :class:`cem_fast.CEMResult`, one per image.
            **options: overrides of the constructor's options for this call (``seed``, ``task``, ``sigma``,
                ``block``, ``values``, ``include_roi``, ...).

        Returns:
            attributions shaped and typed like ``inputs`` (uint8 inputs give float32): every pixel and channel of
            a block holds the block's value in dB; the ROI's own blocks hold 0 unless ``include_roi``; pixels
            outside the grid (SR: rows and columns that the crop to a multiple of the scale drops) hold 0. With ``return_results``: ``(attributions, results)``.
        """
        opts = {**self.options, **self._checked(options)}
        values = opts.pop("values")
        include_roi = opts.pop("include_roi", False)
        task = opts.pop("task")
        is_tuple = isinstance(inputs, tuple)
        images = self._images(inputs)
        n = images.shape[0]
        rois = self._targets(target, n)
        if perturbations_per_eval is not None and perturbations_per_eval != "auto":
            if isinstance(perturbations_per_eval, bool) or not isinstance(perturbations_per_eval, int) \
                    or perturbations_per_eval < 1:
                raise ValueError(f"perturbations_per_eval: expected a positive integer or 'auto', "
                                 f"got {perturbations_per_eval!r}")
        model = self.forward_func
        if additional_forward_args is not None:
            args = additional_forward_args if isinstance(additional_forward_args, tuple) \
                else (additional_forward_args,)
            opts.setdefault("model_name", _func_name(model))
            model = _ForwardWithArgs(model, args)
        elif not isinstance(model, nn.Module):
            opts.setdefault("model_name", _func_name(model))
            model = _ForwardWithArgs(model, ())

        results = []
        for i in range(n):
            try:
                results.append(cem_fast.causal_effect_map(
                    model, images[i], task, roi=rois[i], batch_size=perturbations_per_eval,
                    progress=bool(show_progress), **opts))
            except ValueError as e:
                if str(e).startswith("roi "):  # e.g. outside the output: it came in as target
                    raise ValueError(f"target{f'[{i}]' if n > 1 else ''}: {e}") from None
                raise
        self.last_results = results
        dtype = images.dtype if images.is_floating_point() else torch.float32
        maps = [getattr(r, values) if include_roi else np.where(r.roi_mask, 0.0, getattr(r, values)) for r in results]
        attributions = torch.stack([self._spread(m, r, images.shape[-2:]) for m, r in zip(maps, results)])
        attributions = attributions.to(device=images.device, dtype=dtype)
        if is_tuple:
            attributions = (attributions,)
        return (attributions, results) if return_results else attributions

    def attribute_future(self, *args: Any, **kwargs: Any):
        raise NotImplementedError("CausalEffect.attribute_future: not supported; use attribute")

    @staticmethod
    def _images(inputs: Any) -> torch.Tensor:
        if isinstance(inputs, tuple):
            if len(inputs) != 1:
                raise ValueError(f"inputs: expected one tensor of clean images (N, 3, H, W) (or a 1-tuple of it), "
                                 f"got a tuple of {len(inputs)}")
            inputs = inputs[0]
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"inputs: expected an (N, 3, H, W) tensor, got {type(inputs).__name__}")
        if inputs.dim() != 4 or inputs.shape[1] != 3 or inputs.shape[0] < 1:
            raise ValueError(f"inputs: expected an (N, 3, H, W) tensor with N >= 1 (clean RGB images), got shape "
                             f"{tuple(inputs.shape)}")
        if inputs.dtype != torch.uint8:
            if not inputs.is_floating_point():
                raise ValueError(f"inputs: expected a float tensor with values in [0, 1], got dtype {inputs.dtype}")
            x = inputs.detach()
            finite = bool(torch.isfinite(x).all())
            lo, hi = float(x.min()), float(x.max())
            if not finite or lo < 0 or hi > 1:
                what = "non-finite values" if not finite else f"values in [{lo:.4g}, {hi:.4g}]"
                raise ValueError(f"inputs: expected values in [0, 1] (clean images), got {what}")
        return inputs.detach()

    @staticmethod
    def _targets(target: Any, n: int) -> list[ROI]:
        if target is None:
            raise ValueError("target: expected the ROI in output pixels, (y, x, size) or (y, x, height, width), or a "
                             f"list of {n} of them (one per image), got None")
        def plain(t: Any) -> Any:  # tensors and arrays as lists (numbers stay numbers)
            return t.tolist() if hasattr(t, "tolist") and not isinstance(t, (list, tuple)) else t

        target = plain(target)
        if isinstance(target, (list, tuple)):
            target = [plain(t) for t in target]

        def parse(t: Any) -> ROI:
            try:
                return ROI.parse(t)
            except ValueError as e:
                raise ValueError(f"target: {e}") from None

        def one_roi(t: Any) -> bool:  # (y, x, size), (y, x, h, w), an ROI, a dict or a string
            return isinstance(t, (ROI, dict, str)) or (
                isinstance(t, Sequence) and len(t) > 0 and not isinstance(t[0], (Sequence, dict, ROI)))

        if one_roi(target):
            return [parse(target)] * n
        if not isinstance(target, Sequence):
            raise ValueError(f"target: expected (y, x, size), (y, x, height, width) or a list of them, "
                             f"got {type(target).__name__}")
        if len(target) != n:
            raise ValueError(f"target: expected one ROI for every image or a list of {n} (one per image in inputs), "
                             f"got a list of {len(target)}")
        return [parse(t) for t in target]

    @staticmethod
    def _spread(block_map, res: CEMResult, size: Sequence[int]) -> torch.Tensor:
        """(3, H, W) float64: every pixel of block (r, c) holds ``block_map[r, c]``; pixels off the grid 0."""
        m = torch.as_tensor(block_map, dtype=torch.float64)
        b = int(res.block)
        out_h, out_w = res.gt.shape[-2:]
        dense = m.repeat_interleave(b, 0).repeat_interleave(b, 1)[:out_h, :out_w]
        full = torch.zeros(int(size[0]), int(size[1]), dtype=torch.float64)
        full[:out_h, :out_w] = dense
        return full.expand(3, -1, -1)

