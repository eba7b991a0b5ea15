"""A map as pixels: its colour scale, the map over the photograph, the overlay with the ROI and locality boxes, and
the part of the picture a figure shows (the zoom box, the reach box). Arrays and PIL images only: the matplotlib
figures built from them are in :mod:`cem_fast.plotting`.

Colour scales (``scale`` everywhere): ``"auto"`` (default) a symmetric bound read from the map itself, so that the
common 0.05-0.3 dB effects are visible; ``"paper"`` the paper's fixed per-task bounds (SR 2.5, DN 1, DR 2 dB) with
the sign-preserving power law |c|^(1/1.2); a number: that bound in dB (linear). The same scale colours the map
and labels its bar; values beyond the bound are clipped and the bar shows an arrow.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional, Sequence, Union

import matplotlib
import numpy as np
from PIL import Image, ImageDraw

GAMMA = 1.2
GREEN = np.array([0.0, 1.0, 0.0])
GREY = (96, 96, 96)
CMAP = "seismic"
MINUS = "\u2212"  # typographic minus for numbers in labels and captions (an ASCII hyphen is not a minus)
DEFAULT_BACKGROUND = 0.6  # strength of the photograph under the map: 0 white, 1 the photograph itself
Zoom = Union[str, Sequence[int]]
ZOOM_MARGIN = 0.25  # "auto": margin around the effects and the ROI, a share of the region's longer side
ZOOM_MAX_AREA = 0.5  # "auto": the whole image when the zoomed box would cover more than this share of it
AUTO_PERCENTILE = 99  # "auto": one outlier block may saturate, the rest of the map keeps its contrast
READABLE = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)
ScaleLike = Union[str, float, int, "ColourScale"]


@dataclass(frozen=True)
class ColourScale:
    """A symmetric colour scale: values clipped to +-``bound`` dB, mapped by sign(c) |c|^(1/gamma) onto the
    seismic colour map (blue < 0 < red, white at 0). ``kind``: "auto", "paper" or "fixed"."""

    bound: float
    gamma: float = 1.0
    kind: str = "fixed"

    def unit(self, values) -> np.ndarray:
        """Values (dB) scaled to [-1, 1]."""
        c = np.clip(np.asarray(values, dtype=np.float64), -self.bound, self.bound) / self.bound
        return np.sign(c) * np.abs(c) ** (1 / self.gamma)

    def colours(self, values) -> np.ndarray:
        """(..., 3) RGB floats in [0, 1] of ``values`` (dB)."""
        return matplotlib.colormaps[CMAP]((self.unit(values) + 1) / 2)[..., :3]

    def norm(self) -> matplotlib.colors.Normalize:
        """The matplotlib norm of this scale, for colour bars (the bar's axis is then in dB)."""
        if self.gamma == 1:
            return matplotlib.colors.Normalize(-self.bound, self.bound, clip=True)
        g = self.gamma
        return matplotlib.colors.FuncNorm((lambda x: np.sign(x) * np.abs(x) ** (1 / g),
                                           lambda y: np.sign(y) * np.abs(y) ** g), -self.bound, self.bound)

    def describe(self) -> str:
        return f"\u00b1{self.bound:g} dB ({self.kind}{', gamma 1/1.2' if self.gamma != 1 else ''})"

    def as_dict(self) -> dict:
        return {"kind": self.kind, "bound_db": self.bound, "gamma": self.gamma}


def scaled_effect(cem: np.ndarray, bound: float) -> np.ndarray:
    """The paper's picture scale: CEM clipped to +-bound, sign-preserving power |c|^(1/1.2), scaled to [-1, 1]."""
    return ColourScale(bound, GAMMA, "paper").unit(cem)


def readable_bound(x: float) -> float:
    """The smallest of 1, 1.5, 2, 2.5, 3, 4, 5, 6, 8 (times a power of ten) that is >= ``x`` > 0."""
    e = math.floor(math.log10(x))
    for r in READABLE:
        if r * 10.0 ** e >= x * (1 - 1e-9):
            return float(f"{r * 10.0 ** e:.6g}")  # 0.30000000000000004 -> 0.3
    return 10.0 ** (e + 1)


def auto_bound(values: np.ndarray, tol: float) -> float:
    """A readable bound from the non-zero effects (a high percentile of |CE|, rounded up), never 0: a map with
    no effect at all gets the smallest value the map can show (``tol``, at least 0.01 dB)."""
    v = np.abs(np.asarray(values, dtype=np.float64))
    v = v[np.isfinite(v) & (v > 0)]
    if v.size == 0:
        return readable_bound(max(tol, 0.01))
    return readable_bound(float(np.percentile(v, AUTO_PERCENTILE)))


def colour_scale(scale: ScaleLike, results: Sequence) -> ColourScale:
    """The :class:`ColourScale` that ``scale`` means for these maps (one shared scale for several)."""
    if isinstance(scale, ColourScale):
        return scale
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be 'auto', 'paper' or a positive number of dB, got {scale!r}")
        return ColourScale(float(scale), 1.0, "fixed")
    if scale == "paper":
        return ColourScale(max(r.display_bound() for r in results), GAMMA, "paper")
    if scale == "auto":
        outside = np.concatenate([r.cem[~r.roi_mask].ravel() for r in results])
        return ColourScale(auto_bound(outside, min(r.tol for r in results)), 1.0, "auto")
    raise ValueError(f"scale must be 'auto', 'paper' or a positive number of dB, got {scale!r}")


def signed(x: float, fmt: str = "+.3f") -> str:
    """``x`` formatted with ``fmt`` and a typographic minus (U+2212) instead of the ASCII hyphen."""
    return format(x, fmt).replace("-", MINUS)


def overlay(res, scale: ScaleLike = "auto", background: "float | str | None" = None) -> np.ndarray:
    """(H, W, 3) uint8: the map on ``scale`` (nearest-upsampled to output pixels) over the picture (see
    :func:`on_picture`; the ROI's blocks show the picture), the ROI outlined in green on a black halo and, in speed
    mode, a grey rectangle around the input crop the interventions ran on (the pixel-tight window, so that blocks
    that reach the ROI may stick out past it; :func:`cem_fast.plotting.cem_figure` draws the block-aligned reach
    instead)."""
    cs = colour_scale(scale, [res])
    pil = Image.fromarray(map_picture(res, cs, background))
    crop = _crop_box(res)
    if crop:  # speed mode: the input window the interventions ran on
        y, x, h, w = crop
        ImageDraw.Draw(pil).rectangle([x, y, x + w - 1, y + h - 1], outline=GREY, width=max(1, min(pil.size) // 256))
    draw_roi(pil, res.roi)
    return np.asarray(pil)


def map_picture(res, scale: ScaleLike = "auto", background: "float | str | None" = None,
                box: Optional[tuple] = None) -> np.ndarray:
    """(H, W, 3) uint8: the map on ``scale`` over the picture, no boxes; the ROI's blocks (not rated) are left
    uncoloured, so that the picture shows what is explained. ``box``: (y, x, h, w) output px on whole blocks (as
    :func:`reach_box` gives): only that part, drawn on its own (a large image's many maps)."""
    cs = colour_scale(scale, [res])
    cem, mask, pic = res.cem, res.roi_mask, res
    if box is not None:
        if background == "paper":
            raise ValueError("background 'paper' draws the whole picture: give box=None")
        y, x, h, w = box
        b = res.block
        rows, cols = slice(y // b, -(-(y + h) // b)), slice(x // b, -(-(x + w) // b))
        cem, mask = cem[rows, cols], mask[rows, cols]
        pic = SimpleNamespace(gt=res.gt[:, y:y + h, x:x + w], block=b)
    rgb = cs.colours(cem)
    rgb[(cem == 0) | mask] = 1.0  # white (the seismic map's 0 is slightly pink): the picture itself
    return on_picture(rgb, pic, background)


def check_background(background) -> "float | str":
    """``background``: None (the default strength), a number in [0, 1] or "paper"."""
    if background is None:
        return DEFAULT_BACKGROUND
    if background == "paper":
        return "paper"
    if isinstance(background, (int, float)) and not isinstance(background, bool) and 0 <= background <= 1:
        return float(background)
    raise ValueError(f"background must be a number from 0 (white) to 1 (the photograph) or 'paper', "
                     f"got {background!r}")


def on_picture(rgb: np.ndarray, res, background: "float | str | None" = None) -> np.ndarray:
    """(H, W, 3) uint8: per-block colours ``rgb`` (rows, cols, 3) upsampled to output pixels over the picture.

    ``background`` b in [0, 1] (default :data:`DEFAULT_BACKGROUND`): the white in each colour is replaced by the
    grey ground truth at strength b (1 - b (1 - grey)): a block with no effect shows the photograph, a saturated
    block its colour on the bar exactly, a pale one a tint of it over the photograph (b = 0: the bare colours on
    white; b = 1: the photograph at full contrast). ``"paper"``: 0.9 map + 0.1 degraded input, as the paper
    does."""
    background = check_background(background)
    H, W = res.gt.shape[-2:]
    up = np.repeat(np.repeat(rgb, res.block, axis=0), res.block, axis=1)[:H, :W]
    if background == "paper":
        deg = res.degraded.permute(1, 2, 0).numpy()
        deg = np.asarray(Image.fromarray(deg).resize((W, H), Image.NEAREST), dtype=np.float64) / 255
        img = 0.9 * up + 0.1 * deg
    else:
        grey = res.gt.permute(1, 2, 0).numpy() @ np.array([0.299, 0.587, 0.114]) / 255
        backdrop = 1 - background * (1 - grey)
        img = up - up.min(axis=-1, keepdims=True) * (1 - backdrop[..., None])
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def _crop_box(res) -> Optional[tuple]:
    """The locality crop in output pixels (y, x, h, w), or None in exact mode."""
    crop = (res.extra.get("locality") or {}).get("crop")
    return tuple(v * res.scale for v in crop) if crop else None


def reach_box(res) -> Optional[tuple]:
    """(y, x, h, w) output pixels on whole blocks: the smallest box holding every block that can reach the ROI
    (blocks outside it were skipped, CE = 0), or None when every block can (exact mode, nothing skipped)."""
    reach = np.asarray(res.reachable, dtype=bool)
    if reach.all() or not reach.any():
        return None
    rows, cols = np.nonzero(reach.any(axis=1))[0], np.nonzero(reach.any(axis=0))[0]
    return _blocks_to_px(res, rows[0], rows[-1] + 1, cols[0], cols[-1] + 1)


def _blocks_to_px(res, r0, r1, c0, c1) -> tuple:
    H, W = res.gt.shape[-2:]
    b = res.block
    y0, x0 = int(r0) * b, int(c0) * b
    return y0, x0, min(int(r1) * b, H) - y0, min(int(c1) * b, W) - x0


def _snap(res, y0: float, x0: float, y1: float, x1: float) -> tuple:
    """The pixel box [y0, y1) x [x0, x1) grown to whole blocks and clipped to the image: (y, x, h, w)."""
    H, W = res.gt.shape[-2:]
    b = res.block
    y0, x0 = max(0, math.floor(y0 / b)), max(0, math.floor(x0 / b))
    y1, x1 = min(math.ceil(min(y1, H) / b), math.ceil(H / b)), min(math.ceil(min(x1, W) / b), math.ceil(W / b))
    return _blocks_to_px(res, y0, max(y1, y0 + 1), x0, max(x1, x0 + 1))


def zoom_box(res, zoom: Zoom = "auto", include: Optional[tuple] = None) -> tuple:
    """(y, x, h, w) output pixels on whole blocks: the part of the picture a figure shows.

    ``"auto"``: the blocks with an effect (non-zero, outside the ROI), the ROI and ``include`` (a box, e.g. the
    reach when it is drawn), with a margin of a quarter of that region's longer side (at least two blocks, and
    at least three ROI sides across), made square where the image allows; the whole image when that box would
    cover more than half of it. ``"reach"``: :func:`reach_box` (the whole image when nothing was skipped).
    ``"full"``: the whole image. ``(y, x, h, w)``: that box in output pixels, grown to whole blocks."""
    H, W = res.gt.shape[-2:]
    full = (0, 0, H, W)
    if isinstance(zoom, str):
        if zoom == "full":
            return full
        if zoom == "reach":
            return reach_box(res) or full
        if zoom != "auto":
            raise ValueError(f"zoom must be 'auto', 'reach', 'full' or a (y, x, height, width) box in output "
                             f"pixels, got {zoom!r}")
        return _auto_zoom(res, include)
    try:
        y, x, h, w = (int(v) for v in zoom)
        ok = all(float(v) == int(v) for v in zoom)
    except (TypeError, ValueError):
        ok = False
    if not ok or h <= 0 or w <= 0 or y < 0 or x < 0 or y >= H or x >= W:
        raise ValueError(f"zoom must be 'auto', 'reach', 'full' or a (y, x, height, width) box in output pixels "
                         f"that starts inside the {H}x{W} image, got {zoom!r}")
    return _snap(res, y, x, y + h, x + w)


def _auto_zoom(res, include: Optional[tuple]) -> tuple:
    H, W = res.gt.shape[-2:]
    r = res.roi
    boxes = [(r.y, r.x, r.y + r.height, r.x + r.width)]
    effect = (res.cem != 0) & ~res.roi_mask
    if effect.any():
        y, x, h, w = _blocks_to_px(res, *_bounds(effect))
        boxes.append((y, x, y + h, x + w))
    if include:
        y, x, h, w = include
        boxes.append((y, x, y + h, x + w))
    y0, x0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    y1, x1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    side = max(y1 - y0, x1 - x0)
    side = max(side + 2 * max(ZOOM_MARGIN * side, 2 * res.block), 3 * max(r.height, r.width))
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    y0, y1 = _centred(cy, side, H)
    x0, x1 = _centred(cx, side, W)
    box = _snap(res, y0, x0, y1, x1)
    return (0, 0, H, W) if box[2] * box[3] > ZOOM_MAX_AREA * H * W else box


def _bounds(mask: np.ndarray) -> tuple:
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def _centred(centre: float, side: float, limit: int) -> tuple:
    """[lo, hi) of length ``side`` (at most ``limit``) around ``centre``, shifted to lie inside [0, limit)."""
    side = min(side, limit)
    lo = min(max(0.0, centre - side / 2), limit - side)
    return lo, lo + side


def draw_roi(pil: Image.Image, roi, scale: int = 1) -> None:
    """The ROI outlined: green on its edge pixels, black just outside them, so that it shows on any picture and
    hides no more than the ROI's edge."""
    d = ImageDraw.Draw(pil)
    y0, x0 = roi.y // scale, roi.x // scale
    y1, x1 = (roi.y + roi.height) // scale - 1, (roi.x + roi.width) // scale - 1
    w = max(1, min(pil.size) // 256)
    d.rectangle([x0 - w, y0 - w, x1 + w, y1 + w], outline=(0, 0, 0), width=w)
    d.rectangle([x0, y0, x1, y1], outline=(0, 255, 0), width=w)
