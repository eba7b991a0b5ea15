"""An analytic x``scale`` bicubic upsampler: a baseline SR "model" and a test fixture."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Bicubic(nn.Module):
    """(N, C, h, w) -> (N, C, h*scale, w*scale) by ``F.interpolate(mode="bicubic", align_corners=False)``."""

    def __init__(self, scale: int = 4):
        super().__init__()
        if int(scale) < 1:
            raise ValueError(f"bicubic scale must be a positive integer, got {scale}")
        self.scale = int(scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale == 1:
            return x
        return F.interpolate(x, scale_factor=float(self.scale), mode="bicubic", align_corners=False)
