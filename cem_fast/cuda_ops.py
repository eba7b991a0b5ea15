"""The CUDA backend (``cem_fast._C`` built with csrc/*.cu): wrappers with the signatures of the torch reference."""
from __future__ import annotations

import torch

from . import cpp_ops
from .geometry import ROI, rois_table


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


def intervene_cuda(base, patches, patch_idx, origins, sizes, **kwargs):
    return cpp_ops.extension_intervene(cpp_ops._C.intervene_cuda, base, patches, patch_idx, origins, sizes, **kwargs)


def roi_sq_err_cuda(outputs: torch.Tensor, target: torch.Tensor, roi: ROI) -> torch.Tensor:
    return cpp_ops._C.roi_sq_err_cuda(outputs, target, roi.y, roi.x)


MAX_ROIS_PER_LAUNCH = 65535  # grid.y of the multi-ROI kernel


def roi_sq_err_multi_cuda(outputs: torch.Tensor, target: torch.Tensor, rois: "list[ROI]") -> torch.Tensor:
    """(K, n) for n ROIs, in launches of at most MAX_ROIS_PER_LAUNCH ROIs (one launch for the usual counts)."""
    parts = []
    for j in range(0, max(len(rois), 1), MAX_ROIS_PER_LAUNCH):
        table = rois_table(rois[j:j + MAX_ROIS_PER_LAUNCH], outputs.shape[2], outputs.shape[3],
                           outputs.device)  # bounds checked here
        parts.append(cpp_ops._C.roi_sq_err_multi_cuda(outputs, target, table))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
