"""The CUDA backend: the ``torch.ops.cem_fast`` operators of ``cem_fast._C`` built with csrc/*.cu, on CUDA tensors.
They are the cpp backend's operators: for CUDA tensors the dispatcher runs their CUDA kernels
(:mod:`cem_fast._extension` gives them the signatures of the torch reference)."""
from __future__ import annotations

import torch

from . import _extension


def cuda_reasons(device: torch.device) -> list[str]:
    if _extension.IMPORT_ERROR:
        return [_extension.IMPORT_ERROR]
    reasons = []
    if not _extension.HAS_CUDA_KERNELS:
        reasons.append(f"cem_fast._C was built without CUDA (torch {torch.__version__}, CUDA "
                       f"{torch.version.cuda or 'none'}); rebuild on a CUDA machine")
    if device.type != "cuda":
        reasons.append(f"the cuda backend runs on CUDA tensors, got {device}")
    return reasons


intervene_cuda = _extension.intervene
roi_sq_err_cuda = _extension.roi_sq_err
roi_sq_err_multi_cuda = _extension.roi_sq_err_multi
