"""Block grid and region of interest, both in output pixels.

The block grid tiles the model's *output* into ``block x block`` squares (the last row and column may be
partial). For super-resolution by ``scale`` a block covers ``block // scale`` input pixels, so ``block`` must be
a multiple of ``scale``.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from numbers import Integral
from typing import Sequence, Union

import torch

RoiLike = Union["ROI", Sequence[int], dict]


def _whole(v) -> int:
    """An integer, or text / a float that is one (``8.5`` is refused, not truncated to 8)."""
    if isinstance(v, bool):
        raise TypeError("a boolean is not a pixel coordinate")
    if isinstance(v, str):
        return int(v.strip())
    if isinstance(v, float) and not v.is_integer():
        raise ValueError(f"{v} is not a whole number")
    return operator.index(v) if not isinstance(v, float) else int(v)


@dataclass(frozen=True)
class ROI:
    """Rectangular region of interest in output pixels: top-left ``(y, x)``, size ``height x width``."""

    y: int
    x: int
    height: int
    width: int

    def __post_init__(self) -> None:
        """Integers, a non-negative origin and a positive size, whoever builds it: kernels are given these values."""
        values = (self.y, self.x, self.height, self.width)
        if not all(isinstance(v, Integral) and not isinstance(v, bool) for v in values):
            raise ValueError(f"roi must be (y, x, height, width) integers, got {values!r}")
        for name, v in zip(("y", "x", "height", "width"), values):
            object.__setattr__(self, name, int(v))  # numpy integers become ints (hashing, JSON)
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"roi size must be positive, got height={self.height}, width={self.width}")
        if self.y < 0 or self.x < 0:
            raise ValueError(f"roi origin must be non-negative, got (y={self.y}, x={self.x})")

    @classmethod
    def parse(cls, value: RoiLike) -> "ROI":
        """Accept an ROI, ``(y, x, size)``, ``(y, x, height, width)`` or ``{"y", "x", "size"|"height","width"}``."""
        if isinstance(value, ROI):
            return value
        if isinstance(value, dict):
            size = value.get("size")
            h = value.get("height", size)
            w = value.get("width", size)
            if "y" not in value or "x" not in value or h is None or w is None:
                raise ValueError(f"roi {value!r} must give y, x and size (or height and width)")
            value = (value["y"], value["x"], h, w)
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split()]
        try:
            nums = [_whole(v) for v in value]
        except (TypeError, ValueError):
            raise ValueError(f"roi must be (y, x, size) or (y, x, height, width) integers, got {value!r}") from None
        if len(nums) == 3:
            nums = [nums[0], nums[1], nums[2], nums[2]]
        if len(nums) != 4:
            raise ValueError(f"roi must be (y, x, size) or (y, x, height, width), got {len(nums)} numbers: {nums}")
        return cls(*nums)

    def check_inside(self, out_h: int, out_w: int) -> None:
        if self.y > out_h - self.height or self.x > out_w - self.width:
            raise ValueError(
                f"roi (y={self.y}, x={self.x}, {self.height}x{self.width}) must lie inside the "
                f"{out_h}x{out_w} output")

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.y, self.x, self.height, self.width)

    def slices(self) -> tuple[slice, slice]:
        return slice(self.y, self.y + self.height), slice(self.x, self.x + self.width)


@dataclass(frozen=True)
class BlockGrid:
    """Non-overlapping ``block x block`` output-pixel blocks over an ``out_h x out_w`` output.

    Block ``(r, c)`` covers output rows ``[r*block, min((r+1)*block, out_h))`` and the matching input rows
    ``[r*in_block, ...)`` with ``in_block = block // scale``.
    """

    out_h: int
    out_w: int
    block: int
    scale: int = 1

    def __post_init__(self) -> None:
        if self.block <= 0:
            raise ValueError(f"block must be a positive number of pixels, got {self.block}")
        if self.scale <= 0:
            raise ValueError(f"scale must be positive, got {self.scale}")
        if self.block % self.scale:
            raise ValueError(f"block ({self.block} output px) must be a multiple of the scale x{self.scale}")
        if self.out_h % self.scale or self.out_w % self.scale:
            raise ValueError(f"output {self.out_h}x{self.out_w} must be a multiple of the scale x{self.scale}")
        if self.out_h < self.block or self.out_w < self.block:
            raise ValueError(f"image {self.out_h}x{self.out_w} must be at least one block ({self.block} px)")

    @property
    def rows(self) -> int:
        return math.ceil(self.out_h / self.block)

    @property
    def cols(self) -> int:
        return math.ceil(self.out_w / self.block)

    @property
    def num_blocks(self) -> int:
        return self.rows * self.cols

    @property
    def in_block(self) -> int:
        return self.block // self.scale

    @property
    def in_h(self) -> int:
        return self.out_h // self.scale

    @property
    def in_w(self) -> int:
        return self.out_w // self.scale

    def input_origins(self) -> torch.Tensor:
        """(num_blocks, 2) int64 ``(y0, x0)`` of each block in input pixels, row-major block order."""
        r = torch.arange(self.rows).repeat_interleave(self.cols)
        c = torch.arange(self.cols).repeat(self.rows)
        return torch.stack([r * self.in_block, c * self.in_block], dim=1)

    def input_sizes(self) -> torch.Tensor:
        """(num_blocks, 2) int64 ``(bh, bw)`` of each block in input pixels (edge blocks are smaller)."""
        o = self.input_origins()
        h = (self.in_h - o[:, 0]).clamp(max=self.in_block)
        w = (self.in_w - o[:, 1]).clamp(max=self.in_block)
        return torch.stack([h, w], dim=1)

    def roi_blocks(self, roi: ROI) -> torch.Tensor:
        """(rows, cols) bool: blocks that overlap the ROI."""
        r0, r1 = roi.y // self.block, (roi.y + roi.height - 1) // self.block
        c0, c1 = roi.x // self.block, (roi.x + roi.width - 1) // self.block
        mask = torch.zeros(self.rows, self.cols, dtype=torch.bool)
        mask[r0:r1 + 1, c0:c1 + 1] = True
        return mask


_DEVICE_CONSTANTS: dict = {}


def int64_on_device(rows: tuple, device) -> torch.Tensor:
    """A small int64 tensor of ``rows`` (a tuple of tuples) on ``device``, made once: a host-to-device copy per
    batch would make the host wait for the device's queue."""
    key = (rows, str(device))
    table = _DEVICE_CONSTANTS.get(key)
    if table is None:
        if len(_DEVICE_CONSTANTS) > 64:
            _DEVICE_CONSTANTS.clear()
        table = _DEVICE_CONSTANTS[key] = torch.tensor(rows, dtype=torch.int64, device=device)
    return table


def rois_table(rois: Sequence[ROI], out_h: int, out_w: int, device: torch.device) -> torch.Tensor:
    """(n, 4) int64 ``(y, x, h, w)`` of ROIs inside ``out_h x out_w`` on ``device``, for the fused multi-ROI kernels
    (made once per ROI list and device)."""
    for r in rois:
        r.check_inside(out_h, out_w)
    if not rois:  # torch.tensor(()) would be (0,), not (0, 4)
        return torch.zeros(0, 4, dtype=torch.int64, device=device)
    return int64_on_device(tuple(r.as_tuple() for r in rois), device)


def rois_finite(out: torch.Tensor, rois: Sequence[ROI], oy: int = 0, ox: int = 0) -> torch.Tensor:
    """(N, n_rois) bool on the outputs' device: every value of each ROI is finite; the outputs start at output
    pixel (oy, ox). One ROI: a slice. Many: one pass over the outputs whatever their number (a count of non-finite
    pixels, its summed-area table, and one gather of four corners per ROI), not a few kernels per ROI."""
    if len(rois) == 1:
        r = rois[0]
        return torch.isfinite(out[:, :, r.y - oy:r.y - oy + r.height, r.x - ox:r.x - ox + r.width]) \
            .flatten(1).all(1).unsqueeze(1)
    bad = (~torch.isfinite(out)).any(1).to(torch.int32)  # (N, H, W)
    sat = torch.nn.functional.pad(bad.cumsum(1).cumsum(2), (1, 0, 1, 0))  # (N, H + 1, W + 1) int64
    corners = int64_on_device(tuple((r.y - oy, r.x - ox, r.y - oy + r.height, r.x - ox + r.width) for r in rois),
                              out.device)
    y0, x0, y1, x1 = corners.unbind(1)
    count = sat[:, y1, x1] - sat[:, y0, x1] - sat[:, y1, x0] + sat[:, y0, x0]  # (N, n_rois)
    return count == 0
