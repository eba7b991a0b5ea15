"""Figures of a CEM (METHOD.md "Statistics and pictures"): the map with its colour bar, caption and legend, the
pie, the many-ROI sheet and a comparison's difference map, and the files a saved result holds. The colour scales
and the pictures the figures show (the map over the photograph, the overlay, the zoom box) are
:mod:`cem_fast.map_pictures`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Union

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402
from PIL import Image  # noqa: E402

from .fileio import atomic_write  # noqa: E402
from .map_pictures import (CMAP, GREY, MINUS, ColourScale, ScaleLike, Zoom,  # noqa: E402
                           colour_scale, draw_roi, map_picture, on_picture, overlay, reach_box, readable_bound,
                           signed, zoom_box)

FIG_DPI = 150  # cem.png: 6.8 x 6.4 in -> about 1020 x 960 px, fonts 10-13 pt
VECTOR_FORMATS = ("pdf", "svg")
CE_LABEL = "causal effect on ROI PSNR (dB)\n+ red: helps the ROI,  \u2212 blue: hurts it"
ROI_LEGEND = "ROI (green outline): the region whose PSNR is measured; its blocks are not rated"
CROP_LEGEND = "locality (grey): blocks outside it cannot reach the ROI and were skipped (CE = 0)"
ROI_COLOUR = (0.0, 1.0, 0.0)
HALO = "black"  # drawn under the ROI outline, so that it shows on white, red, blue and dark picture alike


def _plain_axes(ax) -> None:
    """No ticks but the frame and the x label kept (set_axis_off would hide the label under the picture)."""
    ax.set_xticks([])
    ax.set_yticks([])


def colour_bar(fig, axes, cs: ColourScale, values: np.ndarray, label: str = CE_LABEL, **options):
    """A colour bar in dB beside ``axes``: ticks at -bound, -bound/2, 0, +bound/2, +bound (0 always shown,
    negative ones with a typographic minus), arrows where ``values`` go beyond the bound, and black marks at the
    smallest and largest value."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
    b = cs.bound
    extend = {(False, False): "neither", (True, False): "min", (False, True): "max", (True, True): "both"}
    sm = matplotlib.cm.ScalarMappable(norm=cs.norm(), cmap=CMAP)
    cb = fig.colorbar(sm, ax=axes, extend=extend[(lo < -b, hi > b)], fraction=0.05, pad=0.02, aspect=30, **options)
    ticks = [-b, -b / 2, 0.0, b / 2, b]
    cb.set_ticks(ticks, labels=["0" if t == 0 else signed(t, "+g") for t in ticks])
    cb.ax.tick_params(labelsize=11)
    cb.set_label(label, fontsize=12)
    for m in {lo, hi} - {0.0}:  # the map's extremes, drawn at the bound when clipped
        cb.ax.axhline(min(max(m, -b), b), color="black", linewidth=2)
    return cb


def extremes_text(stats: dict) -> str:
    """The strongest helping and hurting blocks outside the ROI, or that there is none."""
    def one(word, db, block, absent):
        return f"{word} {signed(db)} dB at block (row {block[0]}, col {block[1]})" if db is not None else absent
    return (one("max", stats.get("max_db"), stats.get("max_block"), "no block helps the ROI") + "\n"
            + one("min", stats.get("min_db"), stats.get("min_block"), "no block hurts the ROI")
            + "   (black marks on the bar)")


def counts_text(helps: int, hurts: int, no_effect: int) -> str:
    """"16 help, 0 hurt, 548 no effect": the blocks' counts as a caption reads them."""
    return f"{helps} help, {hurts} hurt, {no_effect} no effect"


def cem_figure(res, title: Optional[str] = None, scale: ScaleLike = "auto", legend: bool = True,
               zoom: Zoom = "auto", background: "float | str | None" = None, locality: bool = False,
               caption: Optional[bool] = None):
    """The map figure: the map on ``scale`` over the photograph (``background``, see
    :func:`cem_fast.map_pictures.on_picture`), the ROI outlined, zoomed to :func:`zoom_box` (``zoom``), a labelled
    colour bar in dB, under it a caption (the strongest blocks, the zoom box) and a legend (the ROI outline,
    undecided blocks, the reach box, the scale).

    ``title``: default ``"<model> / <image>"``, ``""`` none. ``locality``: draw the reach box (speed mode: the
    block-aligned box outside which every block was skipped). ``legend=False`` drops the legend and the caption;
    ``caption`` (default: as ``legend``) keeps or drops the caption on its own."""
    cs = colour_scale(scale, [res])
    caption = legend if caption is None else caption
    reach = reach_box(res) if locality else None
    y, x, h, w = zoom_box(res, zoom, include=reach)
    H, W = res.gt.shape[-2:]
    hatched = _undecided(res)
    legend_lines = 2 + bool(hatched.any()) + bool(reach)
    panel_w = 5.3
    panel_h = min(max(panel_w * h / w, 4.2), 6.0)
    fig_h = panel_h + 0.45 * bool(title is None or title) + 0.55 * caption + 0.24 * legend_lines * legend + 0.15
    fig, ax = plt.subplots(figsize=(6.8, fig_h), layout="constrained")
    ax.imshow(map_picture(res, cs, background)[y:y + h, x:x + w], interpolation="nearest",
              extent=(x - 0.5, x + w - 0.5, y + h - 0.5, y - 0.5))
    ax.set_xlim(x - 0.5, x + w - 0.5)
    ax.set_ylim(y + h - 0.5, y - 0.5)
    _plain_axes(ax)
    title = f"{res.model_name} / {res.image_name}" if title is None else title
    if title:
        ax.set_title(title, fontsize=14)
    if caption:
        zoomed = (y, x, h, w) != (0, 0, H, W)
        ax.set_xlabel(extremes_text(res.stats()) + (
            f"\nzoom: output px y {y}\u2013{y + h}, x {x}\u2013{x + w} of {H}\u00d7{W}" if zoomed else ""),
            fontsize=11)
    # panchor=False: a tall, narrow zoom box stays centred over its caption (not pushed against the bar)
    colour_bar(fig, ax, cs, res.cem[~res.roi_mask], panchor=False)
    _hatch(ax, res, hatched)
    if reach:
        ry, rx, rh, rw = reach
        ax.add_patch(Rectangle((rx - 0.5, ry - 0.5), rw, rh, fill=False, edgecolor=np.array(GREY) / 255,
                               linewidth=1.5, zorder=3))
    roi_outline(ax, res.roi)
    if legend:
        _box_legend(fig, crop=reach is not None, scale=cs, hatched=int(hatched.sum()))
    _fit_height(fig, ax)
    return fig


def _fit_height(fig, ax, rounds: int = 2, least: float = 3.6) -> None:
    """Shrink the figure's height by what the picture's fixed aspect leaves empty above and below it, so that the
    colour bar (as tall as the room given to the picture) is as tall as the picture; that room keeps ``least``
    inches, the length of the bar's label (a wide, low zoom box leaves space above and below the picture)."""
    for _ in range(rounds):
        fig.canvas.draw()
        given, drawn = ax.get_position(original=True), ax.get_position(original=False)
        h = fig.get_figheight()
        spare = min(given.height - drawn.height, given.height - least / h) * h
        if spare < 0.02:
            return
        fig.set_figheight(fig.get_figheight() - spare)


def roi_outline(ax, roi) -> Rectangle:
    """The ROI as an outline on ``ax`` (data coordinates: output pixels): green on a black halo, drawn along the
    ROI's edge, its interior left as it is."""
    from matplotlib import patheffects
    rect = Rectangle((roi.x - 0.5, roi.y - 0.5), roi.width, roi.height, fill=False, edgecolor=ROI_COLOUR,
                     linewidth=1.6, zorder=4,
                     path_effects=[patheffects.Stroke(linewidth=4.2, foreground=HALO), patheffects.Normal()])
    ax.add_patch(rect)
    return rect


def _undecided(res) -> np.ndarray:
    """(rows, cols) bool: blocks outside the ROI whose 95 % interval does not decide them (it straddles +tol or
    -tol): more draws could still change their sign or zero them."""
    from .intervals import UNDECIDED
    if res.effect_se is None:
        return np.zeros(res.cem.shape, dtype=bool)
    return (res.decided() == UNDECIDED) & ~res.roi_mask


def _hatch(ax, res, undecided: np.ndarray) -> None:
    H, W = res.gt.shape[-2:]
    for r, c in np.argwhere(undecided):
        y, x = r * res.block, c * res.block
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), min(res.block, W - x), min(res.block, H - y), fill=False,
                               hatch="////", edgecolor=(0.2, 0.2, 0.2, 0.7), linewidth=0))


def _hatch_undecided(ax, res) -> int:
    """Hatch the undecided blocks (:func:`_undecided`) on ``ax``; returns how many."""
    undecided = _undecided(res)
    _hatch(ax, res, undecided)
    return int(undecided.sum())


def _box_legend(fig, crop: bool, scale: ColourScale, hatched: int = 0) -> None:
    from matplotlib import patheffects
    handles = [Patch(facecolor="none", edgecolor=ROI_COLOUR, linewidth=1.6, label=ROI_LEGEND,
                     path_effects=[patheffects.Stroke(linewidth=4.2, foreground=HALO), patheffects.Normal()])]
    if hatched:
        handles.append(Patch(facecolor="none", edgecolor=(0.2, 0.2, 0.2), hatch="////",
                             label=f"hatched: {hatched} undecided (95% CI straddles \u00b1tol)"))
    if crop:
        handles.append(Patch(facecolor="none", edgecolor=np.array(GREY) / 255, linewidth=1.5, label=CROP_LEGEND))
    handles.append(Patch(visible=False, label=f"colour scale {scale.describe()}"))
    fig.legend(handles=handles, loc="outside lower center", fontsize=10, frameon=False, handlelength=1.5)


def difference_figure(d, res):
    """Difference map (a - b, dB) over the picture. The ROI is outlined and its blocks left uncoloured, out of the
    maximum and the colour scale (they are not rated, and intervening on the ROI itself moves its PSNR by far
    more than anything around it); blocks that are not significant (|diff| < tol or the 95 % interval contains
    0) are faded."""
    summary = d.summary()
    top, block = summary["max_abs_diff_db"], summary["max_abs_diff_block"]
    cs = ColourScale(readable_bound(top) if top > 0 else 1.0, 1.0, "fixed")
    rgb = cs.colours(d.diff)
    rgb[~d.significant] = 0.3 * rgb[~d.significant] + 0.7
    rgb[d.roi_mask] = 1.0
    fig, ax = plt.subplots(figsize=(6.8, 6.4), layout="constrained")
    ax.imshow(on_picture(rgb, res), interpolation="nearest")
    _plain_axes(ax)
    roi_outline(ax, res.roi)
    ax.set_title(f"{d.name_a} {MINUS} {d.name_b}", fontsize=14)
    where = f" at block (row {block[0]}, col {block[1]})" if block and top > 0 else ""
    ax.set_xlabel(f"max |diff| outside the ROI {top:.3f} dB{where}\n"
                  f"faded: not significant (|diff| < tol {d.tol:g} dB or the 95% CI contains 0)", fontsize=11)
    colour_bar(fig, ax, cs, d.diff[~d.roi_mask],
               label=f"difference of causal effects (dB)\nred: larger in {d.name_a}")
    roi = Patch(facecolor="none", edgecolor=ROI_COLOUR, linewidth=1.6,
                label="ROI (green outline): left out of the maximum and the colour scale")
    fig.legend(handles=[roi], loc="outside lower center", fontsize=10, frameon=False, handlelength=1.5)
    return fig


PIE_INCHES = 3.0  # pie.png: 3 x 3 in, printed at PIE_DPI
PIE_DPI = 300


def pie_counts(res) -> dict:
    """Blocks outside the ROI: ``helps`` / ``hurts`` / ``no_effect`` among those evaluated, and apart from them
    ``skipped`` (cannot reach the ROI: no forwards, CE = 0) and ``screened`` (coarse-to-fine's blocks that the
    coarse gate kept out of the fine stage, no effect by the gate's rule). ``res``: a CEMResult, or a
    :meth:`CEMResult.stats` dict (which does not know the screened blocks)."""
    if isinstance(res, dict):
        skipped = int(res.get("skipped", 0))
        return {"helps": res["positive"], "hurts": res["negative"], "no_effect": max(0, res["zero"] - skipped),
                "skipped": skipped, "screened": 0}
    outside = ~res.roi_mask
    reach = np.asarray(res.reachable, dtype=bool)
    screened = np.asarray(res.screened, dtype=bool) & reach & outside
    evaluated = outside & reach & ~screened
    return {"helps": int((evaluated & (res.cem > 0)).sum()), "hurts": int((evaluated & (res.cem < 0)).sum()),
            "no_effect": int((evaluated & (res.cem == 0)).sum()), "skipped": int((outside & ~reach).sum()),
            "screened": int(screened.sum())}


def pie_figure(res):
    """Pie of the evaluated blocks outside the ROI: helping (red) / hurting (blue) / no effect (white), the counts
    and shares in a legend under it (labels on thin wedges overlap); skipped and screened blocks are not slices,
    the caption counts them apart. 3 x 3 in: 900 px square at 300 dpi (pie.png). ``res``: a CEMResult (or its
    stats dict, see :func:`pie_counts`)."""
    k = pie_counts(res)
    counts = [k["helps"], k["hurts"], k["no_effect"]]
    n = sum(counts)
    fig, ax = plt.subplots(figsize=(PIE_INCHES, PIE_INCHES), layout="constrained")
    names = ["helps (+)", f"hurts ({MINUS})", "no effect (0)"]
    labels = [f"{w}: {c} ({100 * c / max(n, 1):.1f}%)" for w, c in zip(names, counts)]
    colours = ["#d62728", "#1f77b4", "#ffffff"]
    ax.pie(counts if n else [1], colors=colours if n else ["#ffffff"],
           wedgeprops={"edgecolor": "#444444", "linewidth": 0.6})
    handles = [Patch(facecolor=c, edgecolor="#444444", label=lab) for c, lab in zip(colours, labels)]
    fig.legend(handles=handles, loc="outside lower center", fontsize=8, frameon=False, borderaxespad=0.2)
    ax.set_title(f"{n} blocks evaluated outside the ROI", fontsize=9)
    apart = [f"{k['skipped']} skipped (cannot reach the ROI)"] if k["skipped"] else []
    apart += [f"{k['screened']} screened (coarse gate)"] if k["screened"] else []
    if apart:
        ax.set_xlabel("not in the pie: " + ", ".join(apart), fontsize=7)
    return fig


def save_pictures(res, out: "str | os.PathLike", scale: ScaleLike = "auto",
                  vector: Iterable[str] = (), zoom: Zoom = "auto", background: "float | str | None" = None,
                  locality: bool = False) -> dict[str, str]:
    """Write cem.png (and cem.pdf / cem.svg for each of ``vector``; ``zoom``, ``background`` and ``locality`` as in
    :func:`cem_figure`), overlay.png (the whole image), pie.png, input.png, output.png (ROI box), gt.png; returns
    name -> file."""
    out = Path(out)
    cs = colour_scale(scale, [res])
    files = {}
    fig = cem_figure(res, scale=cs, zoom=zoom, background=background, locality=locality)
    for fmt in ("png", *vector_formats(vector)):
        save_figure(fig, out / f"cem.{fmt}", close=False)
        files["cem" if fmt == "png" else f"cem_{fmt}"] = f"cem.{fmt}"
    plt.close(fig)
    _save_png(Image.fromarray(overlay(res, cs, background)), out / "overlay.png")
    files["overlay"] = "overlay.png"
    save_figure(pie_figure(res), out / "pie.png", dpi=PIE_DPI)  # 3 in at 300 dpi; the report shows it 300 px wide
    files["pie"] = "pie.png"
    for name, img, box in (("gt", res.gt, True), ("input", res.degraded, False), ("output", res.output, True)):
        pil = Image.fromarray(img.permute(1, 2, 0).numpy())
        if box:
            draw_roi(pil, res.roi)
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
