"""The C++ CPU backend (``cem_fast._C``, OpenMP): thin wrappers with the signatures of the torch reference."""
from __future__ import annotations

from typing import Optional

import torch

from .geometry import ROI
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


def intervene_cpp(base, patches, patch_idx, origins, sizes, *, ids=None, seed=0, noise_sigma=0.0, rain=None,
                  window_origins=None, window_size=None, out=None):
    C, h, w = base.shape
    K = patch_idx.shape[0]
    window_origins, wh, ww, out = intervene_buffers(base, K, window_origins, window_size, out)
    if noise_sigma > 0 and ids is None:
        raise ValueError("ids are required when noise_sigma > 0 (they key the noise RNG)")
    empty = torch.empty(0)
    _C.intervene_cpu(base.float(), patches.to(torch.uint8), patch_idx.long(), origins.long(), sizes.long(),
                     ids.long() if ids is not None else torch.empty(0, dtype=torch.int64), int(seed),
                     noise_sigma_units(noise_sigma) if noise_sigma > 0 else 0,
                     rain.float() if rain is not None else empty, window_origins.long(), out)
    return out


def roi_sq_err_cpp(outputs: torch.Tensor, target: torch.Tensor, roi: ROI) -> torch.Tensor:
    return _C.roi_sq_err_cpu(outputs, target, roi.y, roi.x)
