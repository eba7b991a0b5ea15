"""One validation per op, shared by every backend (torch, triton, cuda, cpp).

The ops are a seam: other tools call them with their own tensors, so every index is checked before any kernel
reads memory with it, and every backend refuses the same inputs with the same ``ValueError``. Two layers:

* *structure* (dims, dtypes, shapes, scalars): needs no tensor values, so it also runs while torch.compile traces;
* *values* (indices inside the buffers they address, patch and target values on the uint8 grid, finite rain): one
  reduction per call gathers every extreme into one small tensor, read once (one host synchronisation on a GPU);
  the comparisons are then made on Python integers, which cannot overflow (an origin of 2**63 - 1 plus a size is
  not a wrapped small number here). Traced (fake) tensors skip them: the compiled kernels of the C++ operators
  check again on their own, and the Triton kernels mask their reads.

The pipeline builds its indices itself and calls the ops through their ``*_unchecked`` fast paths
(:mod:`cem_fast.ops`), which skip the value checks; ``CEM_FAST_CHECK_INTERNAL_OPS=1`` (set by the test suite)
makes them check too, so the tests show that the pipeline's inputs always pass.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
from numbers import Integral, Real
from typing import Any, Optional, Sequence

import torch

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
#: the largest noise sigma (0..255 units): its 1/256 steps times the noise's range must stay far inside int64
MAX_NOISE_SIGMA = 4096.0


def check_internal_ops() -> bool:
    """Whether the ``*_unchecked`` fast paths validate anyway (``CEM_FAST_CHECK_INTERNAL_OPS=1``)."""
    return os.environ.get("CEM_FAST_CHECK_INTERNAL_OPS", "0") == "1"


def _fail(op: str, message: str) -> None:
    raise ValueError(f"{op}: {message}")


def _is_int(v: Any) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _index_tensor(op: str, name: str, t: Any, shape: tuple) -> None:
    """An integer tensor (not bool, not float) of ``shape``."""
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        _fail(op, f"{name} must be an integer tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        _fail(op, f"{name} must have shape {shape}, got {tuple(t.shape)}")


def _float_tensor(op: str, name: str, t: Any, dim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != dim or not t.dtype.is_floating_point:
        _fail(op, f"{name} must be a {layout} floating-point tensor, got {tuple(t.shape)} {t.dtype}")


def _values_known(*tensors: Optional[torch.Tensor]) -> bool:
    """Real tensors outside a trace: their values can be read."""
    if torch.compiler.is_compiling():
        return False
    if getattr(_TRUSTED, "on", False) and not check_internal_ops():
        return False
    from torch._subclasses.fake_tensor import is_fake
    return not any(t is not None and is_fake(t) for t in tensors)


def _first_bad(t: torch.Tensor, bad: torch.Tensor) -> tuple[int, list]:
    """(row, values) of the first row where ``bad`` (same leading dim) holds: only on the error path."""
    k = int(bad.reshape(bad.shape[0], -1).any(1).nonzero()[0, 0])
    return k, t[k].tolist()


def check_seed_and_noise(op: str, seed: Any, noise_sigma: Any) -> None:
    if not _is_int(seed) or not INT64_MIN <= seed <= INT64_MAX:
        _fail(op, f"seed must be a 64-bit integer, got {seed!r}")
    ok = isinstance(noise_sigma, Real) and not isinstance(noise_sigma, bool) and math.isfinite(float(noise_sigma))
    if not ok or not 0.0 <= float(noise_sigma) <= MAX_NOISE_SIGMA:
        _fail(op, f"noise_sigma must be a finite number in [0, {MAX_NOISE_SIGMA:g}], got {noise_sigma!r}")


def check_intervene(base: torch.Tensor, patches: torch.Tensor, patch_idx: torch.Tensor, origins: torch.Tensor,
                    sizes: torch.Tensor, *, ids: Optional[torch.Tensor] = None, seed: int = 0,
                    noise_sigma: float = 0.0, rain: Optional[torch.Tensor] = None,
                    window_origins: Optional[torch.Tensor] = None, window_size: Optional[Sequence[int]] = None,
                    out: Optional[torch.Tensor] = None, op: str = "intervene") -> None:
    """Every argument of :func:`cem_fast.reference.intervene_ref`: each block lies inside the base and within a
    patch, each patch index names a patch, each window lies inside the base; patches hold integers 0..255; rain is
    finite and non-negative. Raises a one-line ValueError naming the argument, the expected and the actual value."""
    _float_tensor(op, "base", base, 3, "(C, h, w)")
    C, h, w = base.shape
    if not isinstance(patches, torch.Tensor) or patches.dim() != 4 or tuple(patches.shape[1:3]) != (C, patches.shape[3]) \
            or patches.dtype.is_complex or patches.dtype == torch.bool:
        _fail(op, f"patches must be a (P, {C}, pb, pb) tensor of values 0..255, got "
                  f"{tuple(patches.shape) if isinstance(patches, torch.Tensor) else type(patches).__name__}")
    P, pb = patches.shape[0], patches.shape[3]
    if not isinstance(patch_idx, torch.Tensor) or patch_idx.dim() != 1:
        _fail(op, f"patch_idx must be a (K,) integer tensor, got "
                  f"{tuple(patch_idx.shape) if isinstance(patch_idx, torch.Tensor) else type(patch_idx).__name__}")
    K = patch_idx.shape[0]
    _index_tensor(op, "patch_idx", patch_idx, (K,))
    _index_tensor(op, "origins", origins, (K, 2))
    _index_tensor(op, "sizes", sizes, (K, 2))
    check_seed_and_noise(op, seed, noise_sigma)
    noisy = noise_sigma > 0
    if noisy:
        if ids is None:
            _fail(op, "ids are required when noise_sigma > 0 (they key the noise RNG)")
        _index_tensor(op, "ids", ids, (K,))
    if rain is not None:
        _float_tensor(op, "rain", rain, 3, f"({C}, {h}, {w})")
        if tuple(rain.shape) != (C, h, w):
            _fail(op, f"rain must have the base's shape {(C, h, w)}, got {tuple(rain.shape)}")
    wh, ww = _window_size(op, window_size, h, w)
    if window_origins is not None:
        _index_tensor(op, "window_origins", window_origins, (K, 2))
    if out is not None:
        _float_tensor(op, "out", out, 4, f"({K}, {C}, {wh}, {ww})")
        if tuple(out.shape) != (K, C, wh, ww):
            _fail(op, f"out must have shape {(K, C, wh, ww)}, got {tuple(out.shape)}")
        # 1: overlaps for certain (an expanded tensor); not traceable, and a traced buffer is the compiler's own
        if not torch.compiler.is_compiling() and torch._debug_has_internal_overlap(out) == 1:
            _fail(op, "out must not overlap itself (an expanded or strided view writes one element twice)")
    if _values_known(base, patches, patch_idx, origins, sizes, rain, window_origins, out):
        _check_intervene_values(op, patches, patch_idx, origins, sizes, rain, window_origins, (h, w), (wh, ww), P, pb)


def _window_size(op: str, window_size: Optional[Sequence[int]], h: int, w: int) -> tuple[int, int]:
    if window_size is None:
        return h, w
    ws = list(window_size) if isinstance(window_size, (list, tuple, torch.Size)) else None
    if ws is None or len(ws) != 2 or not all(_is_int(v) for v in ws) or not (0 <= ws[0] <= h and 0 <= ws[1] <= w):
        _fail(op, f"window_size must be (wh, ww) integers within the {h}x{w} base, got {window_size!r}")
    return int(ws[0]), int(ws[1])


def _check_intervene_values(op, patches, patch_idx, origins, sizes, rain, window_origins, hw, window, P, pb):
    """One reduction (one read of its result) over every index; the comparisons on Python integers. Clamping
    before the sums keeps them inside int64; where the clamp changed a value, the range checks fail first."""
    (h, w), (wh, ww) = hw, window
    K = patch_idx.shape[0]
    stats: list[torch.Tensor] = []
    if K:
        o, s = origins.long(), sizes.long()
        end = o.clamp(-1, max(h, w) + 1) + s.clamp(-1, pb + 1)
        stats += [patch_idx.min().long(), patch_idx.max().long(), o.min(), s.min(), s[:, 0].max(), s[:, 1].max(),
                  end[:, 0].max(), end[:, 1].max()]
        if window_origins is not None:
            wo = window_origins.long()
            stats += [wo.min(), wo[:, 0].max(), wo[:, 1].max()]
    floats: list[torch.Tensor] = []
    if patches.dtype != torch.uint8 and patches.numel():
        p = patches.double()
        floats += [p.min(), p.max(), (p != p.floor()).any().double()]
    if rain is not None and rain.numel():
        floats += [rain.double().min(), torch.isfinite(rain).all().double()]
    ints = torch.stack(stats).tolist() if stats else []
    flts = torch.stack(floats).tolist() if floats else []
    if K:
        lo_p, hi_p, lo_o, lo_s, hi_sy, hi_sx, end_y, end_x = ints[:8]
        if lo_p < 0 or hi_p >= P:
            k, v = _first_bad(patch_idx, (patch_idx < 0) | (patch_idx >= P))
            _fail(op, f"patch_idx[{k}] = {v} is not a patch of the {P}-patch bank")
        if lo_s < 0 or hi_sy > pb or hi_sx > pb:
            k, v = _first_bad(sizes, (sizes < 0) | (sizes > pb))
            _fail(op, f"sizes[{k}] = {tuple(v)} must lie within the {pb}x{pb} patches")
        if lo_o < 0 or end_y > h or end_x > w:
            bad = (origins < 0) | (origins > torch.tensor([h, w], device=origins.device) - sizes)
            k, v = _first_bad(origins, bad)
            _fail(op, f"origins[{k}] = {tuple(v)} with size {tuple(sizes[k].tolist())}: the block must lie inside "
                      f"the {h}x{w} base")
        if window_origins is not None:
            lo_w, hi_wy, hi_wx = ints[8:11]
            if lo_w < 0 or hi_wy > h - wh or hi_wx > w - ww:
                bad = (window_origins < 0) | (window_origins > torch.tensor([h - wh, w - ww],
                                                                            device=window_origins.device))
                k, v = _first_bad(window_origins, bad)
                _fail(op, f"window_origins[{k}] = {tuple(v)} with window {wh}x{ww} must lie inside the {h}x{w} base")
    if patches.dtype != torch.uint8 and patches.numel():
        lo, hi, fractional = flts[:3]
        flts = flts[3:]
        if not (lo >= 0 and hi <= 255) or fractional:
            _fail(op, f"patches must hold integers 0..255 ({patches.dtype}), got values in [{lo:g}, {hi:g}]"
                      + (" with fractions" if fractional else ""))
    if rain is not None and rain.numel():
        lo, finite = flts[:2]
        if not finite or not lo >= 0:
            _fail(op, f"rain must be finite and non-negative (0..255 units), got a minimum of {lo:g}"
                      + ("" if finite else " and non-finite values"))


def check_roi_target(op: str, outputs: Any, target: Any, spatial: Optional[tuple[int, int]]) -> None:
    """(K, C, H, W) floating outputs and a (C, th, tw) target of values 0..255 (``spatial``: the (th, tw) it must
    have, None: the outputs' size)."""
    _float_tensor(op, "outputs", outputs, 4, "(K, C, H, W)")
    want = spatial if spatial is not None else tuple(outputs.shape[2:])
    if not isinstance(target, torch.Tensor) or target.dim() != 3 or target.dtype == torch.bool \
            or target.dtype.is_complex or tuple(target.shape) != (outputs.shape[1], *want):
        got = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        _fail(op, f"target must be a ({outputs.shape[1]}, {want[0]}, {want[1]}) tensor of values 0..255, got {got}")
    if target.numel() and _values_known(outputs, target):
        t = target.double()
        lo, hi, fractional = torch.stack([t.min(), t.max(), (t != t.floor()).any().double()]).tolist()
        if not (lo >= 0 and hi <= 255) or fractional:
            _fail(op, f"target must hold integers 0..255, got values in [{lo:g}, {hi:g}]"
                      + (" with fractions" if fractional else ""))


def check_roi_box(op: str, name: str, box: Sequence[Any], out_h: int, out_w: int) -> None:
    """(y, x, h, w) integers with the box inside the out_h x out_w outputs (compared as Python integers)."""
    y, x, rh, rw = box
    if not all(_is_int(v) for v in box) or not (rh > 0 and rw > 0 and 0 <= y <= out_h - rh and 0 <= x <= out_w - rw):
        _fail(op, f"{name} (y={y}, x={x}, {rh}x{rw}) must lie inside the {out_h}x{out_w} outputs")


def check_roi_sq_err(outputs: torch.Tensor, target: torch.Tensor, roi: Any, op: str = "roi_sq_err") -> None:
    """One ROI: the target is the ROI's own (C, roi.height, roi.width) values."""
    if not hasattr(roi, "as_tuple"):
        _fail(op, f"roi must be a cem_fast.ROI, got {type(roi).__name__}")
    _float_tensor(op, "outputs", outputs, 4, "(K, C, H, W)")
    check_roi_box(op, "roi", roi.as_tuple(), outputs.shape[2], outputs.shape[3])
    check_roi_target(op, outputs, target, (roi.height, roi.width))


def check_roi_sq_err_multi(outputs: torch.Tensor, target: torch.Tensor, rois: Sequence[Any],
                           op: str = "roi_sq_err_multi") -> None:
    """Many ROIs: the target is the whole (C, H, W) output."""
    if isinstance(rois, torch.Tensor) or not all(hasattr(r, "as_tuple") for r in rois):
        _fail(op, "rois must be a list of cem_fast.ROI")
    _float_tensor(op, "outputs", outputs, 4, "(K, C, H, W)")
    for i, r in enumerate(rois):
        check_roi_box(op, f"rois[{i}]", r.as_tuple(), outputs.shape[2], outputs.shape[3])
    check_roi_target(op, outputs, target, None)


def check_rois_table(op: str, rois: torch.Tensor, out_h: int, out_w: int) -> None:
    """An (n, 4) int64 table of (y, x, h, w) inside the outputs (the operators' form of a ROI list): one reduction;
    sizes are clamped before ``out_h - h`` so that nothing overflows, and a clamped size fails its own range check."""
    if not isinstance(rois, torch.Tensor) or rois.dim() != 2 or rois.shape[1] != 4 or rois.dtype != torch.int64:
        _fail(op, f"rois must be an (n, 4) int64 tensor of (y, x, h, w), got "
                  f"{(tuple(rois.shape), rois.dtype) if isinstance(rois, torch.Tensor) else type(rois).__name__}")
    if rois.shape[0] and _values_known(rois):
        y, x, rh, rw = rois.unbind(1)
        bad = ((rh <= 0) | (rw <= 0) | (rh > out_h) | (rw > out_w) | (y < 0) | (x < 0)
               | (y > out_h - rh.clamp(0, out_h)) | (x > out_w - rw.clamp(0, out_w)))
        if bool(bad.any()):
            i, box = _first_bad(rois, bad)
            check_roi_box(op, f"rois[{i}]", box, out_h, out_w)


_TRUSTED = threading.local()


@contextlib.contextmanager
def trusted_indices():
    """While the pipeline's fast paths call a backend: the operators' own value checks are skipped (their
    structure checks still run; ``CEM_FAST_CHECK_INTERNAL_OPS=1`` keeps everything)."""
    before = getattr(_TRUSTED, "on", False)
    _TRUSTED.on = True
    try:
        yield
    finally:
        _TRUSTED.on = before
