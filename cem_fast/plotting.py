"""Pictures of a CEM (METHOD.md "Statistics and pictures"): the map with its colour bar and legend, the overlay,
the pie, images with the ROI box, the many-ROI sheet and a comparison's difference map.

Colour scales (``scale`` everywhere): ``"auto"`` (default) a symmetric bound read from the map itself, so that the
common 0.05-0.3 dB effects are visible; ``"paper"`` the paper's fixed per-task bounds (SR 2.5, DN 1, DR 2 dB) with
the sign-preserving power law |c|^(1/1.2); a number: that bound in dB (linear). The same scale colours the map
and labels its bar; values beyond the bound are clipped and the bar shows an arrow.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from .fileio import atomic_write  # noqa: E402

GAMMA = 1.2
GREEN = np.array([0.0, 1.0, 0.0])
GREY = (96, 96, 96)
CMAP = "seismic"
FIG_DPI = 150  # cem.png: 6.8 x 6.4 in -> about 1020 x 960 px, fonts 10-13 pt
VECTOR_FORMATS = ("pdf", "svg")
CE_LABEL = "causal effect on ROI PSNR (dB)\n+ red: helps the ROI,  \u2212 blue: hurts it"
ROI_LEGEND = "ROI (green): the region whose PSNR is measured; its blocks are not rated"
CROP_LEGEND = "locality crop (grey): blocks outside were skipped (cannot reach the ROI; CE = 0)"
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


def overlay(res, scale: ScaleLike = "auto") -> np.ndarray:
    """(H, W, 3) uint8: the map on ``scale`` (nearest-upsampled to output pixels, ROI blocks green) over the
    picture, with a green ROI rectangle and, in speed mode, a grey rectangle around the input crop the
    interventions ran on (see :func:`_on_picture` for the blend)."""
    cs = colour_scale(scale, [res])
    rgb = cs.colours(res.cem)
    rgb[res.roi_mask] = GREEN
    pil = Image.fromarray(_on_picture(rgb, res, paper=cs.kind == "paper"))
    crop = _crop_box(res)
    if crop:  # speed mode: the input window the interventions ran on; blocks outside it were skipped
        y, x, h, w = crop
        ImageDraw.Draw(pil).rectangle([x, y, x + w - 1, y + h - 1], outline=GREY, width=max(1, min(pil.size) // 256))
    _draw_roi(pil, res.roi)
    return np.asarray(pil)


def _on_picture(rgb: np.ndarray, res, paper: bool = False) -> np.ndarray:
    """(H, W, 3) uint8: per-block colours ``rgb`` (rows, cols, 3) upsampled to output pixels and blended with the
    picture. ``paper``: 0.9 map + 0.1 degraded input, as the paper does; otherwise 0.8 map + 0.2 grey ground
    truth, so the picture's content shows through (sharp, without the input's noise or rain) without tinting
    the map's red and blue."""
    H, W = res.gt.shape[-2:]
    up = np.repeat(np.repeat(rgb, res.block, axis=0), res.block, axis=1)[:H, :W]
    if paper:
        deg = res.degraded.permute(1, 2, 0).numpy()
        deg = np.asarray(Image.fromarray(deg).resize((W, H), Image.NEAREST), dtype=np.float64) / 255
        img = 0.9 * up + 0.1 * deg
    else:
        grey = res.gt.permute(1, 2, 0).numpy() @ np.array([0.299, 0.587, 0.114]) / 255
        img = 0.8 * up + 0.2 * grey[..., None]
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def _crop_box(res) -> Optional[tuple]:
    """The locality crop in output pixels (y, x, h, w), or None in exact mode."""
    crop = (res.extra.get("locality") or {}).get("crop")
    return tuple(v * res.scale for v in crop) if crop else None


def _draw_roi(pil: Image.Image, roi, scale: int = 1) -> None:
    d = ImageDraw.Draw(pil)
    y0, x0 = roi.y // scale, roi.x // scale
    y1, x1 = (roi.y + roi.height) // scale - 1, (roi.x + roi.width) // scale - 1
    d.rectangle([x0, y0, x1, y1], outline=(0, 255, 0), width=max(1, min(pil.size) // 128))


def _plain_axes(ax) -> None:
    """No ticks but the frame and the x label kept (set_axis_off would hide the label under the picture)."""
    ax.set_xticks([])
    ax.set_yticks([])


def colour_bar(fig, axes, cs: ColourScale, values: np.ndarray, label: str = CE_LABEL):
    """A colour bar in dB beside ``axes``: ticks at -bound, -bound/2, 0, +bound/2, +bound (0 always shown),
    arrows where ``values`` go beyond the bound, and black marks at the smallest and largest value."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
    b = cs.bound
    extend = {(False, False): "neither", (True, False): "min", (False, True): "max", (True, True): "both"}
    sm = matplotlib.cm.ScalarMappable(norm=cs.norm(), cmap=CMAP)
    cb = fig.colorbar(sm, ax=axes, extend=extend[(lo < -b, hi > b)], fraction=0.05, pad=0.02, aspect=30)
    ticks = [-b, -b / 2, 0.0, b / 2, b]
    cb.set_ticks(ticks, labels=["0" if t == 0 else f"{t:+g}" for t in ticks])
    cb.ax.tick_params(labelsize=11)
    cb.set_label(label, fontsize=12)
    for m in {lo, hi} - {0.0}:  # the map's extremes, drawn at the bound when clipped
        cb.ax.axhline(min(max(m, -b), b), color="black", linewidth=2)
    return cb


def extremes_text(stats: dict) -> str:
    """The strongest helping and hurting blocks outside the ROI, or that there is none."""
    def one(word, db, block, absent):
        return f"{word} {db:+.3f} dB at block (row {block[0]}, col {block[1]})" if db is not None else absent
    return (one("max", stats.get("max_db"), stats.get("max_block"), "no block helps the ROI") + "\n"
            + one("min", stats.get("min_db"), stats.get("min_block"), "no block hurts the ROI")
            + "   (black marks on the bar)")


def cem_figure(res, title: Optional[str] = None, scale: ScaleLike = "auto", legend: bool = True):
    """The map figure: overlay on ``scale``, the strongest blocks under it, a labelled colour bar in dB and a
    legend of the boxes (ROI, and the locality crop in speed mode)."""
    cs = colour_scale(scale, [res])
    fig, ax = plt.subplots(figsize=(6.8, 6.4), layout="constrained")
    ax.imshow(overlay(res, cs), interpolation="nearest")
    _plain_axes(ax)
    ax.set_title(title or f"{res.model_name} / {res.image_name}", fontsize=14)
    ax.set_xlabel(extremes_text(res.stats()), fontsize=11)
    colour_bar(fig, ax, cs, res.cem[~res.roi_mask])
    hatched = _hatch_undecided(ax, res)
    if legend:
        _box_legend(fig, crop=_crop_box(res) is not None, scale=cs, hatched=hatched)
    return fig


def _hatch_undecided(ax, res) -> int:
    """Hatch the blocks outside the ROI whose 95 % interval does not decide them (it straddles +tol or -tol):
    more draws could still change their sign or zero them. Returns how many."""
    from .intervals import UNDECIDED
    if res.effect_se is None:
        return 0
    undecided = (res.decided() == UNDECIDED) & ~res.roi_mask
    H, W = res.gt.shape[-2:]
    for r, c in np.argwhere(undecided):
        y, x = r * res.block, c * res.block
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), min(res.block, W - x), min(res.block, H - y), fill=False,
                               hatch="////", edgecolor=(0.2, 0.2, 0.2, 0.7), linewidth=0))
    return int(undecided.sum())


def _box_legend(fig, crop: bool, scale: ColourScale, hatched: int = 0) -> None:
    handles = [Patch(facecolor="none", edgecolor=(0, 1, 0), linewidth=2, label=ROI_LEGEND)]
    if hatched:
        handles.append(Patch(facecolor="none", edgecolor=(0.2, 0.2, 0.2), hatch="////",
                             label=f"hatched: {hatched} undecided (95% CI straddles \u00b1tol)"))
    if crop:
        handles.append(Patch(facecolor="none", edgecolor=np.array(GREY) / 255, linewidth=2, label=CROP_LEGEND))
    handles.append(Patch(visible=False, label=f"colour scale {scale.describe()}"))
    fig.legend(handles=handles, loc="outside lower center", fontsize=10, frameon=False, handlelength=1.5)


def difference_figure(d, res):
    """Difference map (a - b, dB) over the picture. The ROI blocks are green and left out of the maximum and the
    colour scale (they are not rated, and intervening on the ROI itself moves its PSNR by far more than anything
    around it); blocks that are not significant (|diff| < tol or the 95 % interval contains 0) are faded."""
    summary = d.summary()
    top, block = summary["max_abs_diff_db"], summary["max_abs_diff_block"]
    cs = ColourScale(readable_bound(top) if top > 0 else 1.0, 1.0, "fixed")
    rgb = cs.colours(d.diff)
    rgb[~d.significant] = 0.3 * rgb[~d.significant] + 0.7
    rgb[d.roi_mask] = GREEN
    fig, ax = plt.subplots(figsize=(6.8, 6.4), layout="constrained")
    ax.imshow(_on_picture(rgb, res), interpolation="nearest")
    _plain_axes(ax)
    ax.set_title(f"{d.name_a} - {d.name_b}", fontsize=14)
    where = f" at block (row {block[0]}, col {block[1]})" if block and top > 0 else ""
    ax.set_xlabel(f"max |diff| outside the ROI {top:.3f} dB{where}\n"
                  f"faded: not significant (|diff| < tol {d.tol:g} dB or the 95% CI contains 0)", fontsize=11)
    colour_bar(fig, ax, cs, d.diff[~d.roi_mask],
               label=f"difference of causal effects (dB)\nred: larger in {d.name_a}")
    roi = Patch(facecolor=GREEN, edgecolor=GREEN, label="ROI (green): left out of the maximum and the colour scale")
    fig.legend(handles=[roi], loc="outside lower center", fontsize=10, frameon=False, handlelength=1.5)
    return fig


def pie_figure(stats: dict):
    """Pie of helping (red) / hurting (blue) / no-effect (white) blocks outside the ROI, the counts and shares in
    a legend under it (labels on thin wedges overlap); about 290 px wide at 100 dpi, the report's side column."""
    fig, ax = plt.subplots(figsize=(2.9, 2.7), layout="constrained")
    counts = [stats["positive"], stats["negative"], stats["zero"]]
    n = sum(counts)
    names = ["helps (+)", "hurts (\u2212)", "no effect (0)"]
    labels = [f"{w}: {c} ({100 * c / max(n, 1):.1f}%)" for w, c in zip(names, counts)]
    wedges = counts if n else [1]
    ax.pie(wedges, colors=["#d62728", "#1f77b4", "#ffffff"][: len(wedges)],
           wedgeprops={"edgecolor": "#444444", "linewidth": 0.6})
    handles = [Patch(facecolor=c, edgecolor="#444444", label=lab)
               for c, lab in zip(["#d62728", "#1f77b4", "#ffffff"], labels)]
    fig.legend(handles=handles, loc="outside lower center", fontsize=10, frameon=False, borderaxespad=0.2)
    ax.set_title(f"{n} blocks outside the ROI", fontsize=10)
    return fig


def save_pictures(res, out: "str | os.PathLike", scale: ScaleLike = "auto",
                  vector: Iterable[str] = ()) -> dict[str, str]:
    """Write cem.png (and cem.pdf / cem.svg for each of ``vector``), overlay.png, pie.png, input.png, output.png
    (ROI box), gt.png; returns name -> file."""
    out = Path(out)
    cs = colour_scale(scale, [res])
    files = {}
    fig = cem_figure(res, scale=cs)
    for fmt in ("png", *vector_formats(vector)):
        save_figure(fig, out / f"cem.{fmt}", close=False)
        files["cem" if fmt == "png" else f"cem_{fmt}"] = f"cem.{fmt}"
    plt.close(fig)
    _save_png(Image.fromarray(overlay(res, cs)), out / "overlay.png")
    files["overlay"] = "overlay.png"
    save_figure(pie_figure(res.stats()), out / "pie.png", dpi=100)  # shown at its own size in the report
    files["pie"] = "pie.png"
    for name, img, box in (("gt", res.gt, True), ("input", res.degraded, False), ("output", res.output, True)):
        pil = Image.fromarray(img.permute(1, 2, 0).numpy())
        if box:
            _draw_roi(pil, res.roi)
        _save_png(pil, out / f"{name}.png")
        files[name] = f"{name}.png"
    return files


def vector_formats(vector: Union[str, Iterable[str]]) -> list[str]:
    formats = [vector] if isinstance(vector, str) else list(vector)
    bad = [f for f in formats if f not in VECTOR_FORMATS]
    if bad:
        raise ValueError(f"vector formats must be among {', '.join(VECTOR_FORMATS)}, got {bad[0]!r}")
    return formats


def save_figure(fig, path: "str | os.PathLike", dpi: int = FIG_DPI, close: bool = True) -> Path:
    """Save ``fig`` in the format its suffix names (png, pdf, svg, ...; none: png), atomically."""
    path = Path(path)
    fmt = path.suffix[1:].lower() or "png"
    if fmt not in fig.canvas.get_supported_filetypes():
        raise ValueError(f"figure path {str(path)!r}: suffix must be one of "
                         f"{', '.join(sorted(fig.canvas.get_supported_filetypes()))}, got {path.suffix!r}")
    atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi))
    if close:
        plt.close(fig)
    return path


def _save_png(pil: Image.Image, path: Path) -> None:
    atomic_write(path, lambda f: pil.save(f, format="PNG"))


def overlay_grid_figure(results, scale: ScaleLike = "auto", tile: int = 192):
    """Many ROIs' overlays (each scaled to at most ``tile`` px) row-major on one shared colour scale, each labelled
    with its ROI (y, x, height x width), and one colour bar for all."""
    cs = colour_scale(scale, results)
    n = len(results)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    thumbs = []
    for res in results:
        pil = Image.fromarray(overlay(res, cs))
        pil.thumbnail((tile, tile), Image.NEAREST)
        thumbs.append(pil)
    tw, th = max(t.width for t in thumbs), max(t.height for t in thumbs)
    gap, band = 4, 16  # band: room for each tile's label above it, in sheet pixels
    sheet = Image.new("RGB", (cols * (tw + gap), rows * (th + gap + band)), (255, 255, 255))
    for i, t in enumerate(thumbs):
        sheet.paste(t, ((i % cols) * (tw + gap), (i // cols) * (th + gap + band) + band))
    # about one sheet pixel per figure pixel at 100 dpi, plus room for the bar; never shorter than the bar's label
    fig, ax = plt.subplots(figsize=(sheet.width / 100 + 1.6, max(sheet.height / 100 + 0.4, 3.6)),
                           layout="constrained")
    ax.imshow(np.asarray(sheet), interpolation="nearest")
    ax.set_axis_off()
    for i, res in enumerate(results):
        r = res.roi
        ax.text((i % cols) * (tw + gap) + tw / 2, (i // cols) * (th + gap + band) + band / 2,
                f"ROI {r.y}, {r.x}, {r.height}x{r.width}", ha="center", va="center", fontsize=8)
    values = np.concatenate([r.cem[~r.roi_mask].ravel() for r in results])
    colour_bar(fig, ax, cs, values, label=f"causal effect on ROI PSNR (dB)\nshared scale {cs.describe()}")
    return fig


def save_overlay_grid(results, path: "str | os.PathLike", tile: int = 192, scale: ScaleLike = "auto") -> None:
    """maps.png: :func:`overlay_grid_figure` of ``results``."""
    save_figure(overlay_grid_figure(results, scale, tile), Path(path), dpi=100)
