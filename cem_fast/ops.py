"""Public ops with backend dispatch: ``intervene``, ``roi_sq_err``, ``roi_sq_err_multi`` and ``roi_psnr``.

``backend="auto"`` (or the ``CEM_FAST_BACKEND`` environment variable) picks, for CUDA tensors,
cuda -> triton -> torch and, for CPU tensors, cpp -> torch. Every backend explains why it cannot run; when none
can, the error lists all the reasons. The torch backend (:mod:`cem_fast.reference`) always runs.

Every backend has every op. The compiled backends are torch.library operators with fake kernels: cpp and cuda are
``torch.ops.cem_fast.intervene`` / ``intervene_into`` / ``roi_sq_err`` / ``roi_sq_err_multi`` (cem_fast._C, one
operator per op, CPU and CUDA kernels: :mod:`cem_fast._extension`), triton is ``torch.ops.cem_fast.*_triton``
(:mod:`cem_fast.triton_ops`). So ``torch.compile(fullgraph=True)`` traces through these functions on every backend
(the torch backend is plain PyTorch, traced op by op).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import _extension, cpp_ops, cuda_ops, op_checks, reference, triton_ops
from .geometry import ROI
from .options import BACKENDS

AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}
OPS = ("intervene", "roi_sq_err", "roi_sq_err_multi")


@dataclass(frozen=True)
class Backend:
    reasons: Callable[[torch.device], list[str]]  # why it cannot run on a device; empty: it can
    intervene: Callable
    roi_sq_err: Callable
    roi_sq_err_multi: Callable


def _torch_reasons(device: torch.device) -> list[str]:
    return []


_REGISTRY: dict[str, Backend] = {
    "torch": Backend(_torch_reasons, reference.intervene_ref, reference.roi_sq_err_ref,
                     reference.roi_sq_err_multi_ref),
    "triton": Backend(triton_ops.triton_reasons, triton_ops.intervene_triton, triton_ops.roi_sq_err_triton,
                      triton_ops.roi_sq_err_multi_triton),
    "cuda": Backend(cuda_ops.cuda_reasons, cuda_ops.intervene_cuda, cuda_ops.roi_sq_err_cuda,
                    cuda_ops.roi_sq_err_multi_cuda),
    "cpp": Backend(cpp_ops.cpp_reasons, cpp_ops.intervene_cpp, cpp_ops.roi_sq_err_cpp, cpp_ops.roi_sq_err_multi_cpp),
}


def backend_reasons(name: str, device: torch.device) -> list[str]:
    """Why backend ``name`` cannot run on ``device``; empty list: it can (with every op of OPS)."""
    if name not in _REGISTRY:
        return [f"unknown backend {name!r}; expected one of {', '.join(('auto',) + BACKENDS)}"]
    return _REGISTRY[name].reasons(torch.device(device))


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """The backend that will run on ``device`` for the request ``backend`` (None/"auto": env var, then auto)."""
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
        reasons = backend_reasons(name, device)
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


def _trusted(run: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A backend call whose indices were checked here or built by the pipeline: the operators skip their own value
    checks (while tracing there are no values to check and no context to enter)."""
    if torch.compiler.is_compiling():
        return run()
    compiled_checks = contextlib.nullcontext() if op_checks.check_internal_ops() else _extension.trusted_indices()
    with op_checks.trusted_indices(), compiled_checks:
        return run()


def _dispatch(op: str, backend: Optional[str], tensors: dict, validate: Callable[[], None], checked: bool,
              call: Callable[[Callable], torch.Tensor]) -> torch.Tensor:
    """Devices first (the value checks read the tensors), then ``validate`` when ``checked``, then ``call`` with
    the chosen backend's ``op``."""
    anchor = next(iter(tensors))
    check_devices(op, anchor, tensors)
    if checked:
        validate()
    kernel = getattr(_REGISTRY[resolve_backend(backend, tensors[anchor].device)], op)
    return _trusted(lambda: call(kernel))


def _intervene(checked: bool, base, patches, patch_idx, origins, sizes, backend, kwargs: dict) -> torch.Tensor:
    tensors = {"base": base, "patches": patches, "patch_idx": patch_idx, "origins": origins, "sizes": sizes, **kwargs}
    return _dispatch("intervene", backend, tensors,
                     lambda: op_checks.check_intervene(base, patches, patch_idx, origins, sizes, **kwargs), checked,
                     lambda kernel: kernel(base, patches, patch_idx, origins, sizes, **kwargs))


def intervene(base: torch.Tensor, patches: torch.Tensor, patch_idx: torch.Tensor, origins: torch.Tensor,
              sizes: torch.Tensor, *, backend: Optional[str] = None, ids: Optional[torch.Tensor] = None, seed: int = 0,
              noise_sigma: float = 0.0, rain: Optional[torch.Tensor] = None,
              window_origins: Optional[torch.Tensor] = None, window_size: Optional[tuple[int, int]] = None,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """K intervened inputs (K, C, h', w'); see :func:`cem_fast.reference.intervene_ref` for the arguments. Every
    argument is checked first (:func:`cem_fast.op_checks.check_intervene`), the same for every backend."""
    kwargs = dict(ids=ids, seed=seed, noise_sigma=noise_sigma, rain=rain, window_origins=window_origins,
                  window_size=window_size, out=out)
    return _intervene(True, base, patches, patch_idx, origins, sizes, backend, kwargs)


def intervene_unchecked(base: torch.Tensor, patches: torch.Tensor, patch_idx: torch.Tensor, origins: torch.Tensor,
                        sizes: torch.Tensor, *, backend: Optional[str] = None, **kwargs) -> torch.Tensor:
    """:func:`intervene` without its value checks, for the pipeline, which builds the indices itself (devices are
    still checked; ``CEM_FAST_CHECK_INTERNAL_OPS=1`` checks everything, as the test suite does)."""
    return _intervene(op_checks.check_internal_ops(), base, patches, patch_idx, origins, sizes, backend, kwargs)


def roi_sq_err(outputs: torch.Tensor, target: torch.Tensor, roi: ROI, *,
               backend: Optional[str] = None) -> torch.Tensor:
    """(K,) float64 ROI sum of squared errors, uint8 convention; see :func:`cem_fast.reference.roi_sq_err_ref`.
    ``target`` is (C, roi.height, roi.width) of integers 0..255; the ROI must lie inside the outputs."""
    return _dispatch("roi_sq_err", backend, {"outputs": outputs, "target": target},
                     lambda: op_checks.check_roi_sq_err(outputs, target, roi), True,
                     lambda kernel: kernel(outputs, target, roi))


def roi_sq_err_unchecked(outputs: torch.Tensor, target: torch.Tensor, roi: ROI, *,
                         backend: Optional[str] = None) -> torch.Tensor:
    """:func:`roi_sq_err` without its value checks (the pipeline's fast path; see :func:`intervene_unchecked`)."""
    return _dispatch("roi_sq_err", backend, {"outputs": outputs, "target": target},
                     lambda: op_checks.check_roi_sq_err(outputs, target, roi), op_checks.check_internal_ops(),
                     lambda kernel: kernel(outputs, target, roi))


def roi_sq_err_multi(outputs: torch.Tensor, target: torch.Tensor, rois: "list[ROI]", *,
                     backend: Optional[str] = None) -> torch.Tensor:
    """(K, n_rois) float64 squared errors for many ROIs from one pass; ``target`` (C, H, W) is the ground truth or,
    GT-free, the quantised unintervened output. See :func:`cem_fast.reference.roi_sq_err_multi_ref`."""
    return _dispatch("roi_sq_err_multi", backend, {"outputs": outputs, "target": target},
                     lambda: op_checks.check_roi_sq_err_multi(outputs, target, rois), True,
                     lambda kernel: kernel(outputs, target, rois))


def roi_sq_err_multi_unchecked(outputs: torch.Tensor, target: torch.Tensor, rois: "list[ROI]", *,
                               backend: Optional[str] = None) -> torch.Tensor:
    """:func:`roi_sq_err_multi` without its value checks (the pipeline's fast path)."""
    return _dispatch("roi_sq_err_multi", backend, {"outputs": outputs, "target": target},
                     lambda: op_checks.check_roi_sq_err_multi(outputs, target, rois), op_checks.check_internal_ops(),
                     lambda kernel: kernel(outputs, target, rois))


def roi_psnr(outputs: torch.Tensor, target: torch.Tensor, roi: ROI, *,
             backend: Optional[str] = None) -> torch.Tensor:
    """(K,) float64 ROI PSNR in dB of outputs (K, C, H, W) against target (C, roi.height, roi.width) in 0..255.

    ``roi`` is a :class:`cem_fast.ROI` (``cem_fast.ROI(y, x, height, width)``; its size must be the target's),
    whereas the operator underneath, ``torch.ops.cem_fast.roi_sq_err(outputs, target, y, x)``, takes the ROI's
    top-left corner as two integers (its size is the target's) and returns the sum of squared errors:
    ``roi_psnr(o, t, ROI(y, x, h, w)) == 10 * log10(255**2 * t.numel() / torch.ops.cem_fast.roi_sq_err(o, t, y,
    x))``."""
    return reference.psnr_from_sq_err(roi_sq_err(outputs, target, roi, backend=backend), target.numel())
