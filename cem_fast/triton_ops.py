"""The Triton backend: kernels in ``kernels/`` (installed as ``cem_fast._kernels``), wrappers with the signatures
of the torch reference. Runs on CUDA tensors, or on CPU tensors under the interpreter (TRITON_INTERPRET=1, set
before the kernels are imported)."""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from .geometry import ROI, rois_table
from .reference import intervene_buffers, noise_sigma_units, unit_table

try:
    import triton

    from ._kernels.intervene import _intervene_kernel
    from ._kernels.roi_reduce import _roi_sq_err_kernel
    IMPORT_ERROR: Optional[str] = None
except Exception as e:  # noqa: BLE001 - any failure to import means the backend is unavailable
    IMPORT_ERROR = f"triton is not importable ({type(e).__name__}: {e})".splitlines()[0]

def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_reasons(device: torch.device) -> list[str]:
    if IMPORT_ERROR:
        return [IMPORT_ERROR]
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return []
    return [f"triton runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1 set before import), got {device}"]


MAX_ROIS_PER_LAUNCH = 65535  # CUDA grids allow 65,535 programs on axis 1 (the ROIs of the multi-ROI kernel)


def on_device(device: torch.device):
    """Launch on the tensors' device, not the current one (a tensor on cuda:1 with cuda:0 current)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def intervene_triton(base, patches, patch_idx, origins, sizes, **kwargs):
    with on_device(base.device):
        return _intervene_triton(base, patches, patch_idx, origins, sizes, **kwargs)


def _intervene_triton(base, patches, patch_idx, origins, sizes, *, ids=None, seed=0, noise_sigma=0.0, rain=None,
                      window_origins=None, window_size=None, out=None):
    C, h, w = base.shape
    K = patch_idx.shape[0]
    dev = base.device
    window_origins, wh, ww, out = intervene_buffers(base, K, window_origins, window_size, out, ids, noise_sigma)
    noisy = noise_sigma > 0
    if K == 0:
        return out
    base_c = base.float().contiguous()
    # channels-last outputs (what convolutional models get) are written in memory order: coalesced stores
    cl = _channels_last(out)
    row = ww * C if cl else ww
    block_w = min(1024, triton.next_power_of_2(row))
    grid = (K * wh if cl else K * C * wh, triton.cdiv(row, block_w))
    _intervene_kernel[grid](
        out, base_c, patches.to(torch.uint8).contiguous(), patch_idx.long().contiguous(),
        origins.long().contiguous(), sizes.long().contiguous(), window_origins.long().contiguous(),
        ids.long().contiguous() if noisy else patch_idx.long(), rain.float().contiguous() if rain is not None
        else base_c, unit_table(dev), int(seed), noise_sigma_units(noise_sigma) if noisy else 0,
        C, h, w, wh, ww, patches.shape[-1], *out.stride(),
        NOISY=noisy, RAINY=rain is not None, BLOCK_W=block_w, CL=cl)
    return out


def roi_sq_err_triton(outputs: torch.Tensor, target: torch.Tensor, roi: ROI) -> torch.Tensor:
    K, C = outputs.shape[:2]
    res = torch.empty(K, dtype=torch.float64, device=outputs.device)
    if K == 0:
        return res
    t = target.to(torch.int32).contiguous()
    cl = _channels_last(outputs)
    block = min(1024, triton.next_power_of_2(roi.width * (C if cl else 1)))
    with on_device(outputs.device):
        _roi_sq_err_kernel[(K, 1)](res, outputs, t, roi.y, roi.x, roi.height, roi.width, C, *outputs.stride(),
                                   t, 1, roi.height, roi.width, BLOCK=block, MULTI=False, CL=cl, **_no_fma())
    return res


def roi_sq_err_multi_triton(outputs: torch.Tensor, target: torch.Tensor, rois: "list[ROI]") -> torch.Tensor:
    """(K, n) for n ROIs, in launches of at most MAX_ROIS_PER_LAUNCH ROIs (one launch for the usual counts)."""
    K, C, H, W = outputs.shape
    n = len(rois)
    res = torch.empty(K, n, dtype=torch.float64, device=outputs.device)
    if K == 0 or n == 0:
        return res
    t = target.to(torch.int32).contiguous()
    cl = _channels_last(outputs)
    with on_device(outputs.device):
        for j in range(0, n, MAX_ROIS_PER_LAUNCH):
            part = rois[j:j + MAX_ROIS_PER_LAUNCH]
            dest = res if len(part) == n else torch.empty(K, len(part), dtype=torch.float64, device=outputs.device)
            table = rois_table(part, H, W, outputs.device)
            block = min(1024, triton.next_power_of_2(max(r.width for r in part) * (C if cl else 1)))
            _roi_sq_err_kernel[(K, len(part))](dest, outputs, t, 0, 0, 1, 1, C, *outputs.stride(), table, len(part),
                                               t.shape[1], t.shape[2], BLOCK=block, MULTI=True, CL=cl, **_no_fma())
            if dest is not res:
                res[:, j:j + len(part)] = dest
    return res


def _channels_last(t: torch.Tensor) -> bool:
    """Channels-last (and not also planar, as a 1-channel or 1x1 tensor is): read in that memory order."""
    return t.shape[1] > 1 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _no_fma() -> dict:
    """x * 255 rounded before the round-half-even step, like the reference (the interpreter has no option)."""
    return {} if interpreting() else {"enable_fp_fusion": False}
