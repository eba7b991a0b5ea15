"""The C++ CPU backend: the ``torch.ops.cem_fast`` operators of ``cem_fast._C`` (OpenMP kernels, csrc/*.cpp) on CPU
tensors, with the signatures of the torch reference (:mod:`cem_fast._extension`)."""
from __future__ import annotations

import torch

from . import _extension


def cpp_reasons(device: torch.device) -> list[str]:
    reasons = []
    if _extension.IMPORT_ERROR:
        reasons.append(_extension.IMPORT_ERROR)
    if device.type != "cpu":
        reasons.append(f"the cpp backend runs on CPU tensors, got {device}")
    return reasons


intervene_cpp = _extension.intervene
roi_sq_err_cpp = _extension.roi_sq_err
roi_sq_err_multi_cpp = _extension.roi_sq_err_multi
