"""Pure-PyTorch reference ops: the CPU fallback and the oracle every fused backend is tested against.

Two ops carry the whole CEM estimator:

* :func:`intervene_ref` writes K intervened model inputs: a base input with one block replaced by a patch, the
  task's degradation applied to the pasted pixels (DN: fresh counter-based noise; DR: the same rain re-added).
* :func:`roi_psnr_ref` reduces K model outputs to the ROI PSNR with the reference's uint8 convention.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import rng
from .geometry import ROI
from .op_args import intervene_buffers, noise_sigma_units, unit_table

PEAK = 255.0
NOISE_ONE = 1 << 24  # one grey level in the integer noise arithmetic: 2^16 (gaussian12 scale) * 2^8 (sigma)


def intervene_ref(
    base: torch.Tensor,
    patches: torch.Tensor,
    patch_idx: torch.Tensor,
    origins: torch.Tensor,
    sizes: torch.Tensor,
    *,
    ids: Optional[torch.Tensor] = None,
    seed: int = 0,
    noise_sigma: float = 0.0,
    rain: Optional[torch.Tensor] = None,
    window_origins: Optional[torch.Tensor] = None,
    window_size: Optional[tuple[int, int]] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Write K intervened inputs.

    Args:
        base: (C, h, w) float input in [0, 1] (values on the uint8 grid, i.e. ``u8 / 255``).
        patches: (P, C, pb, pb) patch bank at input resolution, uint8 values (any dtype holding integers 0..255).
        patch_idx: (K,) int64 patch of each intervention.
        origins: (K, 2) int64 ``(y0, x0)`` of the replaced block, input pixels.
        sizes: (K, 2) int64 ``(bh, bw)`` of the block (``<= pb``; edge blocks are partial: the patch's top-left
            ``bh x bw`` corner is pasted).
        ids: (K,) int64 intervention ids keying the noise RNG (required when ``noise_sigma > 0``).
        seed: RNG seed of the noise.
        noise_sigma: DN: add noise of standard deviation sigma (0..255 units, applied in 1/256 steps; see
            :func:`cem_fast.rng.gaussian12`) to the patch, truncate, clip to [0, 255].
        rain: DR: (C, h, w) float rain contribution ``beta * rain`` in 0..255 units; the pasted value is
            ``floor(min(patch + rain, 255))`` (saturating uint8 add).
        window_origins: (K, 2) int64 top-left of the crop of the input to write for each intervention
            (default: the whole input).
        window_size: ``(wh, ww)`` of the crops (default: ``(h, w)``).
        out: optional (K, C, wh, ww) float buffer to write into (any float dtype, any layout).

    Returns:
        (K, C, wh, ww) intervened inputs in [0, 1].
    """
    C, h, w = base.shape
    K = patch_idx.shape[0]
    pb = patches.shape[-1]
    dev = base.device
    whole_input = window_origins is None
    window_origins, wh, ww, out = intervene_buffers(base, K, window_origins, window_size, out, ids, noise_sigma)
    # read in float32, as every kernel reads them: a float64 base or rain gives the same values on every backend
    base = base if base.dtype == torch.float32 else base.float()
    rain = rain if rain is None or rain.dtype == torch.float32 else rain.float()
    if whole_input:
        out.copy_(base[:, :wh, :ww].unsqueeze(0).expand(K, C, wh, ww))
    else:
        # Base crops: out[k, :, i, j] = base[:, wy_k + i, wx_k + j]
        wy = window_origins[:, 0].view(K, 1, 1) + torch.arange(wh, device=dev).view(1, wh, 1)
        wx = window_origins[:, 1].view(K, 1, 1) + torch.arange(ww, device=dev).view(1, 1, ww)
        out.copy_(base[:, wy, wx].permute(1, 0, 2, 3))

    # Pasted values in 0..255 units, (K, C, pb, pb).
    vals = patches[patch_idx].to(torch.float32)
    if noise_sigma > 0:
        key = rng.stream_key(seed, ids.to(dev)).view(K, 1, 1, 1)
        counter = torch.arange(C * pb * pb, device=dev, dtype=torch.int64).view(1, C, pb, pb)
        # Integer arithmetic in units of 2^-24 grey levels: patch + sigma * z, truncated and clipped exactly.
        sigma_q = noise_sigma_units(noise_sigma)
        total = vals.to(torch.int64) * NOISE_ONE + rng.gaussian12(key, counter) * sigma_q
        vals = torch.div(total, NOISE_ONE, rounding_mode="floor").clamp(0, 255).to(torch.float32)
    dy = torch.arange(pb, device=dev).view(1, pb, 1)
    dx = torch.arange(pb, device=dev).view(1, 1, pb)
    ys = origins[:, 0].view(K, 1, 1) + dy  # (K, pb, 1) input rows of the patch pixels
    xs = origins[:, 1].view(K, 1, 1) + dx
    if rain is not None:
        r = rain[:, ys.clamp(max=h - 1), xs.clamp(max=w - 1)].permute(1, 0, 2, 3)  # (K, C, pb, pb)
        vals = torch.floor(torch.clamp(vals + r, max=PEAK))
    # Keep the pixels inside the block and inside the window.
    ly = ys - window_origins[:, 0].view(K, 1, 1)
    lx = xs - window_origins[:, 1].view(K, 1, 1)
    valid = ((dy < sizes[:, 0].view(K, 1, 1)) & (dx < sizes[:, 1].view(K, 1, 1))
             & (ly >= 0) & (ly < wh) & (lx >= 0) & (lx < ww))  # (K, pb, pb)
    k, py, px = valid.nonzero(as_tuple=True)
    out[k, :, ly.expand(K, pb, pb)[k, py, px], lx.expand(K, pb, pb)[k, py, px]] = (
        unit_table(dev)[vals[k, :, py, px].long()]).to(out.dtype)
    return out


def quantize_output(x: torch.Tensor) -> torch.Tensor:
    """The reference's image convention: clamp to [0, 1], times 255, round (half to even) -> float 0..255."""
    return torch.round(x.float().clamp(0.0, 1.0) * PEAK)


def roi_sq_err_ref(outputs: torch.Tensor, target: torch.Tensor, roi: ROI) -> torch.Tensor:
    """(K,) float64 sum of squared uint8-convention errors over the ROI.

    Args:
        outputs: (K, C, H, W) model outputs, any float dtype and layout; only the ROI is read.
        target: (C, roi.height, roi.width) reference values in 0..255 (uint8 or float).
        roi: the region, output pixels.
    """
    ys, xs = roi.slices()
    diff = quantize_output(outputs[:, :, ys, xs]).double() - target.double().unsqueeze(0)
    return (diff * diff).flatten(1).sum(1)


def roi_sq_err_multi_ref(outputs: torch.Tensor, target: torch.Tensor, rois: "list[ROI]") -> torch.Tensor:
    """(K, n_rois) float64 squared errors for many ROIs in one pass over their bounding box.

    Args:
        outputs: (K, C, H, W) model outputs, any float dtype and layout.
        target: (C, H, W) full-size reference in 0..255: the ground truth, or for the GT-free form the quantised
            unintervened output (``quantize_output(out0)``), which measures how far each intervention moves the ROI.
        rois: ROIs inside (H, W).
    """
    if not rois:
        return torch.zeros(outputs.shape[0], 0, dtype=torch.float64, device=outputs.device)
    y0, x0 = min(r.y for r in rois), min(r.x for r in rois)
    y1, x1 = max(r.y + r.height for r in rois), max(r.x + r.width for r in rois)
    sq = (quantize_output(outputs[:, :, y0:y1, x0:x1]).double()
          - target[:, y0:y1, x0:x1].double().unsqueeze(0)) ** 2
    per_pixel = sq.sum(1)  # (K, y1 - y0, x1 - x0)
    # NaN would spread through the table to ROIs that do not hold it: count NaN pixels in a table of their own
    nan_pixels = torch.isnan(per_pixel)
    per_pixel = per_pixel.masked_fill(nan_pixels, 0.0)

    def table(v):  # summed-area table: each ROI's sum is four lookups, whatever the number and overlap of ROIs
        return torch.nn.functional.pad(v.cumsum(1).cumsum(2), (1, 0, 1, 0))

    sat, nan_sat = table(per_pixel), table(nan_pixels.double())
    cols = []
    for r in rois:
        a, b, c, d = r.y - y0, r.y + r.height - y0, r.x - x0, r.x + r.width - x0
        total = sat[:, b, d] - sat[:, a, d] - sat[:, b, c] + sat[:, a, c]
        nans = nan_sat[:, b, d] - nan_sat[:, a, d] - nan_sat[:, b, c] + nan_sat[:, a, c]
        cols.append(torch.where(nans > 0, torch.full_like(total, float("nan")), total))
    return torch.stack(cols, 1)


def roi_grid(out_h: int, out_w: int, size: int) -> "list[ROI]":
    """Every ``size x size`` tile of an output (full tiles only), row-major."""
    return [ROI(y, x, size, size) for y in range(0, out_h - size + 1, size) for x in range(0, out_w - size + 1, size)]


def psnr_from_sq_err(sq_err: torch.Tensor, num_values: int) -> torch.Tensor:
    """PSNR in dB, ``20 log10(255 / sqrt(MSE))``; an exact match gives ``inf``."""
    mse = sq_err.double() / num_values
    return 10.0 * torch.log10((PEAK * PEAK) / mse)


def roi_psnr_ref(outputs: torch.Tensor, target: torch.Tensor, roi: ROI) -> torch.Tensor:
    """(K,) float64 ROI PSNR in dB of each output against ``target`` (uint8 convention, RGB, no crop)."""
    return psnr_from_sq_err(roi_sq_err_ref(outputs, target, roi), target.numel())


def psnr_uint8(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two images of 0..255 values (for reports and tests)."""
    mse = ((a.double() - b.double()) ** 2).mean().item()
    return math.inf if mse == 0 else 10.0 * math.log10(PEAK * PEAK / mse)
