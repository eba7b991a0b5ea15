"""The Triton backend as torch.library operators: ``cem_fast::intervene_triton``, ``cem_fast::intervene_triton_into``
(writes a caller's buffer), ``cem_fast::roi_sq_err_triton``, ``cem_fast::roi_sq_err_multi_triton``, with kernels in
``kernels/`` (installed as ``cem_fast._kernels``), plus wrappers with the signatures of the torch reference.

Runs on CUDA tensors, or on CPU tensors under the interpreter (TRITON_INTERPRET=1, set before the kernels are
imported). Compiled kernels are defined with ``torch.library.triton_op`` and launched through ``wrap_triton``, so
torch.compile sees the kernels themselves. Interpreted kernels cannot be traced (``wrap_triton`` hands the
interpreter's function back unwrapped, and a trace would run it on fake tensors), so under the interpreter the same
bodies become opaque ``torch.library.custom_op`` operators with the shape-only fake kernels of
:mod:`cem_fast.op_args`: torch.compile then calls them like the C++ operators. The operator names are the same
either way.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from . import op_args, op_checks
from .geometry import ROI, rois_table
from .op_args import noise_sigma_units, unit_table

try:
    import triton
    from torch.library import wrap_triton

    from ._kernels.intervene import _intervene_kernel
    from ._kernels.roi_sq_err import _roi_sq_err_kernel
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


def _unit_table_for(t: torch.Tensor) -> torch.Tensor:
    """The v / 255 table on ``t``'s device. While the operator is traced (fake tensors), the cached table cannot go
    into the graph, so the graph makes it: the float64 quotient rounded to float32, which is the correctly rounded
    float32 quotient for every v (tests/ops/test_intervene.py checks all 256) however the device divides."""
    from torch._subclasses.fake_tensor import is_fake
    if is_fake(t):
        return (torch.arange(256, dtype=torch.float64, device=t.device) / 255.0).to(torch.float32)
    return unit_table(t.device)


def _channels_last(t: torch.Tensor) -> bool:
    """Channels-last (and not also planar, as a 1-channel or 1x1 tensor is): read in that memory order."""
    return t.shape[1] > 1 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _launch_intervene(base: torch.Tensor, patches: torch.Tensor, patch_idx: torch.Tensor, origins: torch.Tensor,
                      sizes: torch.Tensor, ids: Optional[torch.Tensor], seed: int, noise_sigma: float,
                      rain: Optional[torch.Tensor], window_origins: Optional[torch.Tensor],
                      out: torch.Tensor) -> None:
    C, h, w = base.shape
    K, _, wh, ww = out.shape
    noisy = noise_sigma > 0
    if out.numel() == 0:  # no interventions, or windows / a base without pixels: nothing to write (a grid of 0)
        return
    base_c = base.contiguous()
    windows = window_origins.contiguous() if window_origins is not None else \
        torch.zeros(K, 2, dtype=torch.int64, device=base.device)
    # channels-last outputs (what convolutional models get) are written in memory order: coalesced stores
    cl = _channels_last(out)
    row = ww * C if cl else ww
    block_w = min(1024, triton.next_power_of_2(row))
    grid = (K * wh if cl else K * C * wh, triton.cdiv(row, block_w))
    with on_device(base.device):
        wrap_triton(_intervene_kernel)[grid](
            out, base_c, patches.contiguous(), patch_idx.contiguous(), origins.contiguous(), sizes.contiguous(),
            windows, ids.contiguous() if noisy else patch_idx, rain.contiguous() if rain is not None else base_c,
            _unit_table_for(base), int(seed), noise_sigma_units(noise_sigma) if noisy else 0,
            C, h, w, wh, ww, patches.shape[-1], patches.shape[0], *out.stride(),
            NOISY=noisy, RAINY=rain is not None, BLOCK_W=block_w, CL=cl)


def intervene_triton_new(base: torch.Tensor, patches: torch.Tensor, patch_idx: torch.Tensor, origins: torch.Tensor,
                         sizes: torch.Tensor, ids: Optional[torch.Tensor] = None, seed: int = 0,
                         noise_sigma: float = 0.0, rain: Optional[torch.Tensor] = None,
                         window_origins: Optional[torch.Tensor] = None,
                         window_size: Optional[list[int]] = None) -> torch.Tensor:
    """cem_fast::intervene_triton: (K, C, wh, ww) float32 intervened inputs (arguments: cem_fast::intervene)."""
    out = op_args.intervene_fake(base, patches, patch_idx, origins, sizes, ids, seed, noise_sigma, rain, window_origins,
                                 window_size)
    op_checks.check_intervene(base, patches, patch_idx, origins, sizes, ids=ids, seed=seed, noise_sigma=noise_sigma,
                              rain=rain, window_origins=window_origins, window_size=window_size,
                              op="cem_fast::intervene_triton")
    _launch_intervene(base, patches, patch_idx, origins, sizes, ids, seed, noise_sigma, rain, window_origins, out)
    return out


def intervene_triton_into(base: torch.Tensor, patches: torch.Tensor, patch_idx: torch.Tensor, origins: torch.Tensor,
                          sizes: torch.Tensor, buffer: torch.Tensor, ids: Optional[torch.Tensor] = None, seed: int = 0,
                          noise_sigma: float = 0.0, rain: Optional[torch.Tensor] = None,
                          window_origins: Optional[torch.Tensor] = None,
                          window_size: Optional[list[int]] = None) -> None:
    """cem_fast::intervene_triton_into: writes every element of ``buffer`` (K, C, wh, ww), any float dtype and
    layout (arguments: cem_fast::intervene_into)."""
    op_args.intervene_into_fake(base, patches, patch_idx, origins, sizes, buffer, ids, seed, noise_sigma, rain,
                                window_origins, window_size)
    op_checks.check_intervene(base, patches, patch_idx, origins, sizes, ids=ids, seed=seed, noise_sigma=noise_sigma,
                              rain=rain, window_origins=window_origins, window_size=window_size, out=buffer,
                              op="cem_fast::intervene_triton_into")
    _launch_intervene(base, patches, patch_idx, origins, sizes, ids, seed, noise_sigma, rain, window_origins, buffer)


def _launch_roi_sq_err(res: torch.Tensor, row_stride: int, outputs: torch.Tensor, target: torch.Tensor, roi: tuple,
                       rois: Optional[torch.Tensor], n: int, block_width: int) -> None:
    """One launch writing res[k * row_stride + r] for ``n`` ROIs of the (n, 4) ``rois`` table (MULTI), or for the
    single ``roi`` (y, x, h, w) with n = 1."""
    C = outputs.shape[1]
    cl = _channels_last(outputs)
    block = min(1024, triton.next_power_of_2(block_width * (C if cl else 1)))
    with on_device(outputs.device):
        wrap_triton(_roi_sq_err_kernel)[(outputs.shape[0], n)](
            res, outputs, target, *roi, C, *outputs.stride(), target if rois is None else rois, row_stride,
            target.shape[1], target.shape[2], outputs.shape[2], outputs.shape[3], BLOCK=block, MULTI=rois is not None,
            CL=cl)


def roi_sq_err_triton_op(outputs: torch.Tensor, target: torch.Tensor, y: int, x: int) -> torch.Tensor:
    """cem_fast::roi_sq_err_triton: (K,) float64 squared error of the ROI (y, x) of ``target``'s size."""
    res = op_args.roi_sq_err_fake(outputs, target, y, x)
    op_checks.check_roi_box("cem_fast::roi_sq_err_triton", "roi", (y, x, target.shape[1], target.shape[2]),
                            outputs.shape[2], outputs.shape[3])
    op_checks.check_roi_target("cem_fast::roi_sq_err_triton", outputs, target, tuple(target.shape[1:]))
    if res.numel():
        _, rh, rw = target.shape
        _launch_roi_sq_err(res, 1, outputs, target.to(torch.int32).contiguous(), (y, x, rh, rw), None, 1, rw)
    return res


def roi_sq_err_multi_triton_op(outputs: torch.Tensor, target: torch.Tensor, rois: torch.Tensor,
                               max_width: int = 0) -> torch.Tensor:
    """cem_fast::roi_sq_err_multi_triton: (K, n) float64 for the (n, 4) int64 ``rois`` on the outputs' device (their
    bounds checked by the caller, like the CUDA operator's); ``max_width``, the widest ROI (0: the outputs' width),
    sizes the kernel's row blocks. Above MAX_ROIS_PER_LAUNCH ROIs, one launch per MAX_ROIS_PER_LAUNCH: launch j
    reads the table from ROI j on and writes from res[0, j] on with the row stride n."""
    res = op_args.roi_sq_err_multi_fake(outputs, target, rois)
    op_checks.check_rois_table("cem_fast::roi_sq_err_multi_triton", rois, outputs.shape[2], outputs.shape[3])
    op_checks.check_roi_target("cem_fast::roi_sq_err_multi_triton", outputs, target, None)
    K, n = res.shape
    if K == 0 or n == 0:
        return res
    t, table, width = target.to(torch.int32).contiguous(), rois.contiguous(), max_width or outputs.shape[3]
    if n <= MAX_ROIS_PER_LAUNCH:  # the usual case: the result itself, no view of it, goes to the kernel
        _launch_roi_sq_err(res, n, outputs, t, (0, 0, 1, 1), table, n, width)
        return res
    for j in range(0, n, MAX_ROIS_PER_LAUNCH):
        part = min(MAX_ROIS_PER_LAUNCH, n - j)
        _launch_roi_sq_err(res.view(-1)[j:], n, outputs, t, (0, 0, 1, 1), table[j:j + part], part, width)
    return res


def _define(name: str, fn, mutates_args: tuple, fake):
    """``name`` traceable into the kernels (triton_op) when they are compiled; opaque with a fake kernel under the
    interpreter (see the module's docstring)."""
    from triton.runtime.jit import JITFunction
    if isinstance(_intervene_kernel, JITFunction):
        return torch.library.triton_op(name, fn, mutates_args=mutates_args)
    op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
    op.register_fake(fake)
    return op


if IMPORT_ERROR is None:
    _define("cem_fast::intervene_triton", intervene_triton_new, (), op_args.intervene_fake)
    _define("cem_fast::intervene_triton_into", intervene_triton_into, ("buffer",), op_args.intervene_into_fake)
    _define("cem_fast::roi_sq_err_triton", roi_sq_err_triton_op, (), op_args.roi_sq_err_fake)
    _define("cem_fast::roi_sq_err_multi_triton", roi_sq_err_multi_triton_op, (), op_args.roi_sq_err_multi_fake)


# --- the backend: the operators with the signatures of the torch reference ----------------------------------------

def intervene_triton(base, patches, patch_idx, origins, sizes, **kwargs):
    return op_args.call_intervene(torch.ops.cem_fast.intervene_triton, torch.ops.cem_fast.intervene_triton_into,
                                  base, patches, patch_idx, origins, sizes, **kwargs)


def roi_sq_err_triton(outputs: torch.Tensor, target: torch.Tensor, roi: ROI) -> torch.Tensor:
    return torch.ops.cem_fast.roi_sq_err_triton(outputs, target, roi.y, roi.x)


def roi_sq_err_multi_triton(outputs: torch.Tensor, target: torch.Tensor, rois: "list[ROI]") -> torch.Tensor:
    table = rois_table(rois, outputs.shape[2], outputs.shape[3], outputs.device)  # bounds checked here
    widest = max([0] + [r.width for r in rois])  # not max(..., default=0): torch.compile cannot trace that
    return torch.ops.cem_fast.roi_sq_err_multi_triton(outputs, target, table, widest)
