"""Arguments of the ops shared by every backend: checks, defaults and units.

The reference (:mod:`cem_fast.reference`) and the compiled backends (C++/CUDA through :mod:`cem_fast._extension`,
Triton through :mod:`cem_fast.triton_ops`) take their argument handling from here, so that no backend depends on
another one for it.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

# v / 255 for v = 0..255 as float32, each the correctly rounded IEEE quotient (numpy's float32 division): one
# table for every backend. torch on CUDA divides by a Python float as x * (1 / 255), which differs in the last bit
# for 126 of the 256 values, so no backend divides on the device: the reference and Triton look values up here,
# the C++ and CUDA kernels divide with IEEE rounding (__fdiv_rn), which gives these same numbers.
_UNIT_TABLE = torch.from_numpy(np.arange(256, dtype=np.float32) / np.float32(255.0))
_UNIT_TABLES: dict = {}


def unit_table(device: "torch.device | str" = "cpu") -> torch.Tensor:
    """(256,) float32 ``v / 255`` on ``device`` (built on the host and copied: never divided on the device)."""
    device = torch.device(device)
    if device not in _UNIT_TABLES:
        _UNIT_TABLES[device] = _UNIT_TABLE.to(device)
    return _UNIT_TABLES[device]


def noise_sigma_units(sigma: float) -> int:
    """sigma (0..255 units) in 1/256 steps, the resolution at which the intervention noise applies it."""
    return int(round(float(sigma) * 256))


def check_noise_ids(ids: Optional[torch.Tensor], noise_sigma: float) -> None:
    if noise_sigma > 0 and ids is None:
        raise ValueError("ids are required when noise_sigma > 0 (they key the noise RNG)")


def intervene_buffers(base: torch.Tensor, K: int, window_origins: Optional[torch.Tensor],
                      window_size: Optional[tuple[int, int]], out: Optional[torch.Tensor],
                      ids: Optional[torch.Tensor] = None, noise_sigma: float = 0.0):
    """Checks and defaults shared by every backend: noise needs ids; window origins (zeros: the whole input),
    window size and the output buffer (K, C, wh, ww) in the base's dtype. Returns ``(window_origins, wh, ww, out)``."""
    check_noise_ids(ids, noise_sigma)
    C, h, w = base.shape
    wh, ww = window_size if window_size is not None else (h, w)
    if window_origins is None:
        window_origins = torch.zeros(K, 2, dtype=torch.int64, device=base.device)
    if out is None:
        out = torch.empty(K, C, wh, ww, dtype=base.dtype, device=base.device)
    return window_origins, wh, ww, out


def intervene_op_args(base: torch.Tensor, patches: torch.Tensor, patch_idx: torch.Tensor, origins: torch.Tensor,
                      sizes: torch.Tensor, *, ids: Optional[torch.Tensor] = None, seed: int = 0,
                      noise_sigma: float = 0.0, rain: Optional[torch.Tensor] = None,
                      window_origins: Optional[torch.Tensor] = None,
                      window_size: Optional[tuple[int, int]] = None) -> tuple[tuple, dict]:
    """The reference's intervene arguments as the ``cem_fast::intervene*`` operators take them: float32 base and
    rain, uint8 patches, int64 indices (conversions only where the dtype differs), ids and rain only when used."""
    check_noise_ids(ids, noise_sigma)
    noisy = noise_sigma > 0
    positional = (base.float(), patches.to(torch.uint8), patch_idx.long(), origins.long(), sizes.long())
    keywords = dict(ids=ids.long() if noisy else None, seed=int(seed), noise_sigma=float(noise_sigma) if noisy else 0.0,
                    rain=rain.float() if rain is not None else None,
                    window_origins=window_origins.long() if window_origins is not None else None,
                    window_size=[int(v) for v in window_size] if window_size is not None else None)
    return positional, keywords


def call_intervene(functional, into, base: torch.Tensor, *args, out: Optional[torch.Tensor] = None, **kwargs):
    """Run an intervene operator pair with the reference's signature: ``into`` writes the caller's buffer ``out``
    in place (no copy, any layout and float dtype; its sixth argument); without one, ``functional`` returns a new
    float32 tensor, converted to the base's dtype as the reference allocates it (the kernels compute in float32 and
    round once either way)."""
    positional, keywords = intervene_op_args(base, *args, **kwargs)
    if out is not None:
        into(*positional, out, **keywords)
        return out
    res = functional(*positional, **keywords)
    return res if res.dtype == base.dtype else res.to(base.dtype)


# --- fake kernels: the results' shapes, dtypes and devices, with the operators' shape checks ----------------------
# Registered for the C++ operators (cem_fast/_extension.py) and the interpreted Triton ones (cem_fast/triton_ops.py);
# torch.compile and torch.export run them on fake tensors instead of the kernels. The Triton operators also allocate
# their results with them. Parameters in the operators' order: a fake gets the arguments as the operator got them.

def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def intervene_fake(base: torch.Tensor, patches: torch.Tensor, patch_idx: torch.Tensor, origins: torch.Tensor,
                   sizes: torch.Tensor, ids: Optional[torch.Tensor] = None, seed: int = 0, noise_sigma: float = 0.0,
                   rain: Optional[torch.Tensor] = None, window_origins: Optional[torch.Tensor] = None,
                   window_size: Optional[list] = None) -> torch.Tensor:
    """A new (K, C, wh, ww) float32 tensor on the base's device (the functional intervene's result)."""
    _expect(base.dim() == 3 and base.dtype == torch.float32,
            f"base must be (C, h, w) float32, got {tuple(base.shape)} {base.dtype}")
    _expect(patches.dim() == 4 and patches.dtype == torch.uint8,
            f"patches must be (P, C, pb, pb) uint8, got {tuple(patches.shape)} {patches.dtype}")
    _expect(patch_idx.dim() == 1 and patch_idx.dtype == torch.int64,
            f"patch_idx must be (K,) int64, got {tuple(patch_idx.shape)} {patch_idx.dtype}")
    K = patch_idx.shape[0]
    for name, t in (("origins", origins), ("sizes", sizes), ("window_origins", window_origins)):
        _expect(t is None or (tuple(t.shape) == (K, 2) and t.dtype == torch.int64),
                f"{name} must be ({K}, 2) int64, got {None if t is None else (tuple(t.shape), t.dtype)}")
    check_noise_ids(ids, noise_sigma)
    C, h, w = base.shape
    wh, ww = window_size if window_size is not None else (h, w)
    return base.new_empty((K, C, wh, ww), dtype=torch.float32)


def intervene_into_fake(base: torch.Tensor, patches: torch.Tensor, patch_idx: torch.Tensor, origins: torch.Tensor,
                        sizes: torch.Tensor, buffer: torch.Tensor, *options, **named_options) -> None:
    """Nothing: the ``*_into`` operators write ``buffer`` in place, once its shape is that of the functional
    result (the options: ids ... window_size, as intervene takes them)."""
    want = intervene_fake(base, patches, patch_idx, origins, sizes, *options, **named_options)
    _expect(buffer.shape == want.shape and buffer.dtype.is_floating_point,
            f"buffer must be a floating-point tensor of shape {tuple(want.shape)}, got {tuple(buffer.shape)} "
            f"{buffer.dtype}")


def _roi_inputs(outputs: torch.Tensor, target: torch.Tensor) -> None:
    _expect(outputs.dim() == 4 and outputs.dtype.is_floating_point,
            f"outputs must be (K, C, H, W) floating point, got {tuple(outputs.shape)} {outputs.dtype}")
    _expect(target.dim() == 3 and target.shape[0] == outputs.shape[1],
            f"target must be ({outputs.shape[1]}, h, w), got {tuple(target.shape)}")


def roi_sq_err_fake(outputs: torch.Tensor, target: torch.Tensor, y: int, x: int) -> torch.Tensor:
    """(K,) float64 on the outputs' device."""
    _roi_inputs(outputs, target)
    return outputs.new_empty((outputs.shape[0],), dtype=torch.float64)


def roi_sq_err_multi_fake(outputs: torch.Tensor, target: torch.Tensor, rois: torch.Tensor,
                          max_width: int = 0) -> torch.Tensor:
    """(K, n) float64 on the outputs' device for the (n, 4) ``rois``."""
    _roi_inputs(outputs, target)
    _expect(rois.dim() == 2 and rois.shape[1] == 4 and rois.dtype == torch.int64,
            f"rois must be (n, 4) int64 (y, x, h, w), got {tuple(rois.shape)} {rois.dtype}")
    _expect(tuple(target.shape[1:]) == tuple(outputs.shape[2:]),
            f"target must be (C, H, W) of the outputs' size, got {tuple(target.shape)} for {tuple(outputs.shape)}")
    return outputs.new_empty((outputs.shape[0], rois.shape[0]), dtype=torch.float64)
