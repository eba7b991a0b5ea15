"""Public ops with backend dispatch: ``intervene`` and ``roi_psnr``.

``backend="auto"`` (or the ``CEM_FAST_BACKEND`` environment variable) picks, for CUDA tensors,
cuda -> triton -> torch and, for CPU tensors, cpp -> torch. Every backend explains why it cannot run; when none
can, the error lists all the reasons. The torch backend (:mod:`cem_fast.reference`) always runs.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from . import cpp_ops, cuda_ops, reference, triton_ops
from .geometry import ROI

BACKENDS = ("torch", "triton", "cuda", "cpp")
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}


def _torch_reasons(device: torch.device) -> list[str]:
    return []


# name -> (function returning why the backend cannot run on a device, op table)
_REGISTRY: dict[str, tuple[Callable[[torch.device], list[str]], dict[str, Callable]]] = {
    "torch": (_torch_reasons, {"intervene": reference.intervene_ref, "roi_sq_err": reference.roi_sq_err_ref,
                               "roi_sq_err_multi": reference.roi_sq_err_multi_ref}),
    "triton": (triton_ops.triton_reasons, {"intervene": triton_ops.intervene_triton,
                                           "roi_sq_err": triton_ops.roi_sq_err_triton,
                                           "roi_sq_err_multi": triton_ops.roi_sq_err_multi_triton}),
    "cuda": (cuda_ops.cuda_reasons, {"intervene": cuda_ops.intervene_cuda, "roi_sq_err": cuda_ops.roi_sq_err_cuda,
                                     "roi_sq_err_multi": cuda_ops.roi_sq_err_multi_cuda}),
    "cpp": (cpp_ops.cpp_reasons, {"intervene": cpp_ops.intervene_cpp, "roi_sq_err": cpp_ops.roi_sq_err_cpp,
                                  "roi_sq_err_multi": cpp_ops.roi_sq_err_multi_cpp}),
}


def backend_reasons(name: str, device: torch.device, op: Optional[str] = None) -> list[str]:
    """Why backend ``name`` cannot run on ``device`` (op ``op``, if given); empty list: it can."""
    if name not in _REGISTRY:
        return [f"unknown backend {name!r}; expected one of {', '.join(('auto',) + BACKENDS)}"]
    reasons = _REGISTRY[name][0](torch.device(device))
    if op is not None and op not in _REGISTRY[name][1]:
        reasons = reasons + [f"the {name} backend has no {op} kernel yet"]
    return reasons


def resolve_backend(backend: Optional[str], device: torch.device, op: Optional[str] = None) -> str:
    """The backend that will run on ``device`` for the request ``backend`` (None/"auto": env var, then auto);
    with ``op``, only backends that implement it (``auto`` then falls back to torch)."""
    device = torch.device(device)
    requested = backend or os.environ.get("CEM_FAST_BACKEND") or "auto"
    requested = requested.lower()
    if requested == "auto":
        candidates = AUTO_ORDER["cuda" if device.type == "cuda" else "cpu"]
    elif requested in BACKENDS:
        candidates = (requested,)
    else:
        raise ValueError(f"backend must be one of {', '.join(('auto',) + BACKENDS)}, got {requested!r}")
    why: list[str] = []
    for name in candidates:
        reasons = backend_reasons(name, device, op)
        if not reasons:
            return name
        why.append(f"{name}: " + "; ".join(reasons))
    raise RuntimeError(f"no backend can run on {device} for backend={requested!r}: " + " | ".join(why))


def check_devices(op: str, anchor: str, tensors: dict) -> None:
    """Every tensor argument on the device of ``tensors[anchor]``: a kernel given a host pointer for a device one
    reads the wrong memory (an illegal memory access on CUDA), so this is refused before any launch."""
    dev = tensors[anchor].device
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device != dev:
            raise ValueError(f"{op}: {name} is on {t.device}, expected {dev} like {anchor}")


def intervene(base: torch.Tensor, patches: torch.Tensor, patch_idx: torch.Tensor, origins: torch.Tensor,
              sizes: torch.Tensor, *, backend: Optional[str] = None, **kwargs) -> torch.Tensor:
    """K intervened inputs (K, C, h', w'); see :func:`cem_fast.reference.intervene_ref` for the arguments."""
    check_devices("intervene", "base", {"base": base, "patches": patches, "patch_idx": patch_idx,
                                        "origins": origins, "sizes": sizes, **kwargs})
    name = resolve_backend(backend, base.device)
    return _REGISTRY[name][1]["intervene"](base, patches, patch_idx, origins, sizes, **kwargs)


def roi_sq_err(outputs: torch.Tensor, target: torch.Tensor, roi: ROI, *,
               backend: Optional[str] = None) -> torch.Tensor:
    """(K,) float64 ROI sum of squared errors, uint8 convention; see :func:`cem_fast.reference.roi_sq_err_ref`."""
    check_devices("roi_sq_err", "outputs", {"outputs": outputs, "target": target})
    name = resolve_backend(backend, outputs.device)
    return _REGISTRY[name][1]["roi_sq_err"](outputs, target, roi)


def roi_sq_err_multi(outputs: torch.Tensor, target: torch.Tensor, rois: "list[ROI]", *,
                     backend: Optional[str] = None) -> torch.Tensor:
    """(K, n_rois) float64 squared errors for many ROIs from one pass; ``target`` (C, H, W) is the ground truth or,
    GT-free, the quantised unintervened output. See :func:`cem_fast.reference.roi_sq_err_multi_ref`."""
    check_devices("roi_sq_err_multi", "outputs", {"outputs": outputs, "target": target})
    name = resolve_backend(backend, outputs.device, "roi_sq_err_multi")
    return _REGISTRY[name][1]["roi_sq_err_multi"](outputs, target, rois)


def roi_psnr(outputs: torch.Tensor, target: torch.Tensor, roi: ROI, *,
             backend: Optional[str] = None) -> torch.Tensor:
    """(K,) float64 ROI PSNR in dB of outputs (K, C, H, W) against target (C, roi.height, roi.width) in 0..255."""
    return reference.psnr_from_sq_err(roi_sq_err(outputs, target, roi, backend=backend), target.numel())
