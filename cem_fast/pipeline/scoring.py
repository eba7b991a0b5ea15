"""Scoring intervened outputs: ROI PSNRs per intervention, reduced on the device.

:class:`RoiScorer` scores outputs of the whole crop (one ROI through the single-ROI op, many in one pass);
:class:`ChangedRegionScorer` scores outputs that hold only what an intervention changed (its own window or its
layer-by-layer rectangle) by the exact composition ``base_sq(ROI) - base_sq(C) + new_sq(C)``: in the uint8
convention every term is a sum of integers, exact in float64.
"""
from __future__ import annotations

import copy

from typing import Optional

import numpy as np
import torch

from .. import ops
from ..geometry import ROI, rois_finite
from ..reference import psnr_from_sq_err, quantize_output
from ..transfers import upload


class RoiScorer:
    """Model outputs of the window -> (K, n_rois) float64 ROI PSNRs, NaN where a ROI holds NaN/Inf.

    The contract for one ROI and for many is the same: the target is the ground truth (or any 0..255 reference)
    of the whole window, each ROI's squared error is reduced on the device and turned into PSNR with its number
    of values. One ROI reads its part of the target through the single-ROI kernel, many share one pass."""

    def __init__(self, target_window: torch.Tensor, rois: list[ROI], backend: str):
        self.rois, self.backend = rois, backend
        self.target = target_window
        self.values = torch.tensor([r.height * r.width * target_window.shape[0] for r in rois],
                                   dtype=torch.float64, device=target_window.device)  # once: no copy per batch
        ys, xs = rois[0].slices()
        self._roi_target = target_window[:, ys, xs].contiguous() if len(rois) == 1 else None

    def sq_err(self, out: torch.Tensor) -> torch.Tensor:
        if self._roi_target is not None:
            return ops.roi_sq_err_unchecked(out, self._roi_target, self.rois[0], backend=self.backend).unsqueeze(1)
        return ops.roi_sq_err_multi_unchecked(out, self.target, self.rois, backend=self.backend)

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        scores = psnr_from_sq_err(self.sq_err(out), self.values)
        finite = rois_finite(out, self.rois)
        # NaN/Inf in the ROI: recorded as NaN so that it is reported, never averaged into the map
        return torch.where(finite, scores, torch.full_like(scores, float("nan")))


def base_error_table(gt: torch.Tensor, base_output: torch.Tensor, base_origin: tuple) -> torch.Tensor:
    """(h + 1, w + 1) summed-area table of the squared errors of ``base_output`` (C, h, w), the unintervened
    output of the region at output pixel ``base_origin``, against ``gt`` (uint8 convention, float64)."""
    oy, ox = base_origin
    h, w = base_output.shape[-2:]
    sq = ((quantize_output(base_output).double() - gt[:, oy:oy + h, ox:ox + w].double()) ** 2).sum(0)
    return torch.nn.functional.pad(sq.cumsum(0).cumsum(1), (1, 0, 1, 0))


class ChangedRegionScorer:
    """Scores of interventions run on their own windows: ``base_sq(ROI) - base_sq(C) + new_sq(C)`` per ROI."""

    def __init__(self, gt: torch.Tensor, rois: list[ROI], scale: int, windows, base_output: torch.Tensor,
                 base_origin: tuple, base_sat: Optional[torch.Tensor] = None):
        """``gt`` (C, H, W) the target of the whole output; ``windows``: the tables of each block's input window
        (``inputs`` (n, 4)) and changed rectangles (``changed`` (n, n_rois, 4)), as
        :class:`~cem_fast.pipeline.engines.windows.BlockWindows`; ``base_output`` (C, H', W'): the unintervened
        output of the region starting at output pixel ``base_origin`` (the crop's, or the whole output);
        ``base_sat``: :func:`base_error_table` of them when it was made already (many scorers of one run)."""
        self.gt, self.scale, self.windows = gt, scale, windows
        self.base_sat = base_error_table(gt, base_output, base_origin) if base_sat is None else base_sat
        self.base_origin = base_origin
        self.rois = torch.tensor([[q.y, q.x, q.y + q.height, q.x + q.width] for q in rois],
                                 device=gt.device)  # (n_rois, 4) absolute output px
        self.base_roi = self._base_sum(self.rois)  # (n_rois,)
        self.values = torch.tensor([q.height * q.width * gt.shape[0] for q in rois], dtype=torch.float64,
                                   device=gt.device)

    def for_windows(self, windows) -> "ChangedRegionScorer":
        """This scorer for other tables of the same run and ROIs (a narrowed fine stage's)."""
        other = copy.copy(self)
        other.windows = windows
        return other

    def _base_sum(self, rects: torch.Tensor) -> torch.Tensor:
        """Sums of the base squared errors over ``[y0, x0, y1, x1]`` rectangles (absolute output px)."""
        oy, ox = self.base_origin
        y0, x0, y1, x1 = (rects[..., i] - (oy if i % 2 == 0 else ox) for i in range(4))
        y0, x0, y1, x1 = (t.clamp(min=0) for t in (y0, x0, y1, x1))
        sat = self.base_sat
        return sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]

    def __call__(self, out: torch.Tensor, rows: np.ndarray, origins: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(K, n_rois) PSNRs of outputs ``out`` (K, C, vh * s, vw * s) of the windows of ``rows``; ``origins``
        (K, 2): the outputs' own origins in output px (incremental boxes, which may reach past the image: only
        their changed rectangles are read), else the windows'."""
        s, gt, dev = self.scale, self.gt, out.device
        K, C, oh, ow = out.shape
        if origins is None:
            v = upload(self.windows.inputs[rows], dev)  # (K, 4) input px
            wy, wx = v[:, 0] * s, v[:, 1] * s  # output origin of each window
        else:
            wy, wx = origins[:, 0], origins[:, 1]  # on the device already (upload)
        ys = (wy.view(K, 1, 1) + torch.arange(oh, device=dev).view(1, oh, 1)).clamp(0, gt.shape[1] - 1)
        xs = (wx.view(K, 1, 1) + torch.arange(ow, device=dev).view(1, 1, ow)).clamp(0, gt.shape[2] - 1)
        target = gt[:, ys, xs].permute(1, 0, 2, 3)  # (K, C, oh, ow)
        sq = ((quantize_output(out).double() - target.double()) ** 2).sum(1)  # (K, oh, ow)
        nan = torch.isnan(sq)
        sat = torch.nn.functional.pad(sq.masked_fill(nan, 0).cumsum(1).cumsum(2), (1, 0, 1, 0))
        nan_sat = torch.nn.functional.pad(nan.double().cumsum(1).cumsum(2), (1, 0, 1, 0))
        changed = upload(self.windows.changed[rows], dev)  # (K, n_rois, 4) absolute output px
        k = torch.arange(K, device=dev).view(K, 1)

        def rect(t, corners):  # sums of t (K, oh + 1, ow + 1 summed-area tables) over (K, n_rois, 4) rectangles
            y0, x0 = (corners[..., 0] - wy.view(K, 1)).clamp(0, oh), (corners[..., 1] - wx.view(K, 1)).clamp(0, ow)
            y1, x1 = (corners[..., 2] - wy.view(K, 1)).clamp(0, oh), (corners[..., 3] - wx.view(K, 1)).clamp(0, ow)
            return t[k, y1, x1] - t[k, y0, x1] - t[k, y1, x0] + t[k, y0, x0]

        total = self.base_roi.view(1, -1) - self._base_sum(changed) + rect(sat, changed)
        psnr = psnr_from_sq_err(total, self.values.view(1, -1))
        # a window's output is the model's on a real input: NaN/Inf anywhere in its part of a ROI is the model's,
        # reported as the sample's (a flaky model must not pass because its NaN fell outside the changed
        # rectangle); the incremental boxes hold computed values on their changed rectangles only
        checked = changed if origins is not None else self.rois.expand(K, -1, -1)
        return torch.where(rect(nan_sat, checked) > 0, torch.full_like(psnr, float("nan")), psnr)
