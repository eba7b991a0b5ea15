"""The CUDA backend (``cem_fast._C`` built with csrc/*.cu): wrappers with the signatures of the torch reference."""
from __future__ import annotations

import torch

from . import cpp_ops
from .geometry import ROI
from .reference import intervene_buffers, noise_sigma_units


def cuda_reasons(device: torch.device) -> list[str]:
    if cpp_ops.IMPORT_ERROR:
        return [cpp_ops.IMPORT_ERROR]
    reasons = []
    if not hasattr(cpp_ops._C, "intervene_cuda"):
        reasons.append(f"cem_fast._C was built without CUDA (torch {torch.__version__}, CUDA "
                       f"{torch.version.cuda or 'none'}); rebuild on a CUDA machine")
    if device.type != "cuda":
        reasons.append(f"the cuda backend runs on CUDA tensors, got {device}")
    return reasons


def intervene_cuda(base, patches, patch_idx, origins, sizes, *, ids=None, seed=0, noise_sigma=0.0, rain=None,
                   window_origins=None, window_size=None, out=None):
    C, h, w = base.shape
    K = patch_idx.shape[0]
    dev = base.device
    window_origins, wh, ww, out = intervene_buffers(base, K, window_origins, window_size, out)
    if noise_sigma > 0 and ids is None:
        raise ValueError("ids are required when noise_sigma > 0 (they key the noise RNG)")
    empty = torch.empty(0, device=dev)
    cpp_ops._C.intervene_cuda(
        base.float().contiguous(), patches.to(torch.uint8).contiguous(), patch_idx.long().contiguous(),
        origins.long().contiguous(), sizes.long().contiguous(),
        ids.long().contiguous() if ids is not None else torch.empty(0, dtype=torch.int64, device=dev), int(seed),
        noise_sigma_units(noise_sigma) if noise_sigma > 0 else 0,
        rain.float().contiguous() if rain is not None else empty, window_origins.long().contiguous(), out)
    return out


def roi_sq_err_cuda(outputs: torch.Tensor, target: torch.Tensor, roi: ROI) -> torch.Tensor:
    return cpp_ops._C.roi_sq_err_cuda(outputs, target, roi.y, roi.x)
