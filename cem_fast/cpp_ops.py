"""The C++ CPU backend (``cem_fast._C``, OpenMP): thin wrappers with the signatures of the torch reference."""
from __future__ import annotations

from typing import Optional

import torch

from .geometry import ROI, rois_table
from .reference import intervene_buffers, noise_sigma_units

try:
    from . import _C
    IMPORT_ERROR: Optional[str] = None
except ImportError as e:  # not built (e.g. no compiler): the torch backend takes over
    _C = None
    IMPORT_ERROR = f"cem_fast._C is not built ({e}); run `pip install --no-build-isolation -e .`"


def cpp_reasons(device: torch.device) -> list[str]:
    reasons = []
    if IMPORT_ERROR:
        reasons.append(IMPORT_ERROR)
    if device.type != "cpu":
        reasons.append(f"the cpp backend runs on CPU tensors, got {device}")
    return reasons


def extension_intervene(kernel, base, patches, patch_idx, origins, sizes, *, ids=None, seed=0, noise_sigma=0.0,
                       rain=None, window_origins=None, window_size=None, out=None):
    """Call a ``cem_fast._C`` intervene kernel (``intervene_cpu`` or ``intervene_cuda``, one signature) with the
    arguments of the torch reference; absent tensors are passed empty."""
    K = patch_idx.shape[0]
    dev = base.device
    window_origins, wh, ww, out = intervene_buffers(base, K, window_origins, window_size, out, ids, noise_sigma)
    noisy = noise_sigma > 0
    kernel(base.float().contiguous(), patches.to(torch.uint8).contiguous(), patch_idx.long().contiguous(),
           origins.long().contiguous(), sizes.long().contiguous(),
           ids.long().contiguous() if noisy else torch.empty(0, dtype=torch.int64, device=dev), int(seed),
           noise_sigma_units(noise_sigma) if noisy else 0,
           rain.float().contiguous() if rain is not None else torch.empty(0, device=dev),
           window_origins.long().contiguous(), out)
    return out


def intervene_cpp(base, patches, patch_idx, origins, sizes, **kwargs):
    return extension_intervene(_C.intervene_cpu, base, patches, patch_idx, origins, sizes, **kwargs)


def roi_sq_err_cpp(outputs: torch.Tensor, target: torch.Tensor, roi: ROI) -> torch.Tensor:
    return _C.roi_sq_err_cpu(outputs, target, roi.y, roi.x)


def roi_sq_err_multi_cpp(outputs: torch.Tensor, target: torch.Tensor, rois: "list[ROI]") -> torch.Tensor:
    return _C.roi_sq_err_multi_cpu(outputs, target, rois_table(rois, outputs.shape[2], outputs.shape[3], "cpu"))
