"""Pictures of a CEM (METHOD.md "Statistics and pictures"): overlay with colour bar, pie, images with ROI box."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from .fileio import atomic_write  # noqa: E402

GAMMA = 1.2
GREEN = np.array([0.0, 1.0, 0.0])


def scaled_effect(cem: np.ndarray, bound: float) -> np.ndarray:
    """CEM clipped to +-bound, sign-preserving power |c|^(1/1.2), scaled to [-1, 1]."""
    c = np.clip(cem, -bound, bound)
    return np.sign(c) * np.abs(c) ** (1 / GAMMA) / bound ** (1 / GAMMA)


def overlay(res) -> np.ndarray:
    """(H, W, 3) uint8: seismic map (nearest-upsampled to output pixels, ROI green) blended 0.9 / 0.1 with the
    degraded input (upsampled to output size), with a green ROI rectangle and, in speed mode, a grey rectangle
    around the crop the interventions ran on."""
    H, W = res.gt.shape[-2:]
    cmap = matplotlib.colormaps["seismic"]
    v = scaled_effect(res.cem, res.display_bound())
    rgb = cmap((v + 1) / 2)[..., :3]
    rgb[res.roi_mask] = GREEN
    up = np.repeat(np.repeat(rgb, res.block, axis=0), res.block, axis=1)[:H, :W]
    deg = res.degraded.permute(1, 2, 0).numpy()
    deg = np.asarray(Image.fromarray(deg).resize((W, H), Image.NEAREST), dtype=np.float64) / 255
    img = (0.9 * up + 0.1 * deg) * 255
    pil = Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8))
    crop = (res.extra.get("locality") or {}).get("crop")
    if crop:  # speed mode: the input window the interventions ran on (grey); blocks outside it were skipped
        s = res.scale
        y, x, h, w = (v * s for v in crop)
        ImageDraw.Draw(pil).rectangle([x, y, x + w - 1, y + h - 1], outline=(96, 96, 96),
                                      width=max(1, min(pil.size) // 256))
    _draw_roi(pil, res.roi)
    return np.asarray(pil)


def _draw_roi(pil: Image.Image, roi, scale: int = 1) -> None:
    d = ImageDraw.Draw(pil)
    y0, x0 = roi.y // scale, roi.x // scale
    y1, x1 = (roi.y + roi.height) // scale - 1, (roi.x + roi.width) // scale - 1
    d.rectangle([x0, y0, x1, y1], outline=(0, 255, 0), width=max(1, min(pil.size) // 128))


def cem_figure(res, title=None):
    """Figure: the overlay and a colour bar from -bound to +bound dB with the map's min and max marked."""
    bound = res.display_bound()
    fig, (ax, cax) = plt.subplots(1, 2, figsize=(5.4, 4.6), gridspec_kw={"width_ratios": [20, 1]})
    ax.imshow(overlay(res), interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title or f"{res.model_name} / {res.image_name}", fontsize=9)
    # The bar shows the display scale in dB (power-law spacing, as in the map).
    ticks_db = np.linspace(-bound, bound, 257)
    cax.imshow(((scaled_effect(ticks_db, bound) + 1) / 2)[::-1, None], cmap="seismic", vmin=0, vmax=1,
               aspect="auto", extent=(0, 1, -1, 1))
    cax.set_xticks([])
    cax.yaxis.tick_right()
    # min and max outside the ROI (the ROI blocks are painted green); ticks too close to them are dropped
    outside = res.cem[~res.roi_mask]
    lo, hi = (float(outside.min()), float(outside.max())) if outside.size else (0.0, 0.0)
    extremes = {f"max {hi:+.2f} dB": float(scaled_effect(np.array(hi), bound)),
                f"min {lo:+.2f} dB": float(scaled_effect(np.array(lo), bound))}
    if abs(hi - lo) < 1e-12:
        extremes = {f"all {hi:+.2f} dB": float(scaled_effect(np.array(hi), bound))}
    marks = {label: v for label, v in {f"+{bound:g} dB": 1.0, "0": 0.0, f"-{bound:g} dB": -1.0}.items()
             if all(abs(v - e) > 0.12 for e in extremes.values())}
    marks.update(extremes)
    cax.set_yticks(list(marks.values()))
    cax.set_yticklabels(list(marks.keys()), fontsize=7)
    fig.tight_layout()
    return fig


def difference_figure(d, res):
    """Difference map (a - b, dB) on the seismic scale; blocks whose 95 % interval contains 0 are faded."""
    H, W = res.gt.shape[-2:]
    bound = float(np.abs(d.diff).max()) or 1.0
    rgb = matplotlib.colormaps["seismic"]((np.clip(d.diff / bound, -1, 1) + 1) / 2)[..., :3]
    rgb[~d.significant] = 0.3 * rgb[~d.significant] + 0.7
    rgb[res.roi_mask] = GREEN
    up = np.repeat(np.repeat(rgb, res.block, axis=0), res.block, axis=1)[:H, :W]
    fig, ax = plt.subplots(figsize=(5.0, 4.6))
    im = ax.imshow(up, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"{d.name_a} - {d.name_b} (faded: 95% CI contains 0)", fontsize=8)
    sm = plt.cm.ScalarMappable(cmap="seismic", norm=matplotlib.colors.Normalize(-bound, bound))
    fig.colorbar(sm, ax=ax, fraction=0.046, pad=0.04, label="dB")
    del im
    fig.tight_layout()
    return fig


def pie_figure(stats: dict):
    """Pie of positive (red) / negative (blue) / zero (white) blocks outside the ROI."""
    fig, ax = plt.subplots(figsize=(2.6, 2.6))
    counts = [stats["positive"], stats["negative"], stats["zero"]]
    labels = [f"+ {counts[0]}", f"- {counts[1]}", f"0 {counts[2]}"]
    if sum(counts) == 0:
        counts, labels = [1], ["no blocks"]
    ax.pie(counts, labels=labels, colors=["#d62728", "#1f77b4", "#ffffff"][: len(counts)],
           wedgeprops={"edgecolor": "#444444", "linewidth": 0.6}, textprops={"fontsize": 8})
    ax.set_title("blocks outside the ROI", fontsize=8)
    fig.tight_layout()
    return fig


def save_pictures(res, out: "str | os.PathLike") -> dict[str, str]:
    """Write cem.png, overlay.png, pie.png, input.png, output.png (ROI box), gt.png; returns name -> file."""
    out = Path(out)
    files = {}
    fig = cem_figure(res)
    _save_fig(fig, out / "cem.png")
    files["cem"] = "cem.png"
    _save_png(Image.fromarray(overlay(res)), out / "overlay.png")
    files["overlay"] = "overlay.png"
    fig = pie_figure(res.stats())
    _save_fig(fig, out / "pie.png")
    files["pie"] = "pie.png"
    for name, img, box in (("gt", res.gt, True), ("input", res.degraded, False), ("output", res.output, True)):
        pil = Image.fromarray(img.permute(1, 2, 0).numpy())
        if box:
            _draw_roi(pil, res.roi)
        _save_png(pil, out / f"{name}.png")
        files[name] = f"{name}.png"
    return files


def _save_fig(fig, path: Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def _save_png(pil: Image.Image, path: Path) -> None:
    atomic_write(path, lambda f: pil.save(f, format="PNG"))


def save_overlay_grid(results, path: "str | os.PathLike", tile: int = 192) -> None:
    """One picture of many ROIs' overlays (each scaled to at most ``tile`` px), row-major, ROI boxes included."""
    n = len(results)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    thumbs = []
    for res in results:
        pil = Image.fromarray(overlay(res))
        pil.thumbnail((tile, tile), Image.NEAREST)
        thumbs.append(pil)
    tw, th = max(t.width for t in thumbs), max(t.height for t in thumbs)
    sheet = Image.new("RGB", (cols * (tw + 2), rows * (th + 2)), (255, 255, 255))
    for i, t in enumerate(thumbs):
        sheet.paste(t, ((i % cols) * (tw + 2), (i // cols) * (th + 2)))
    _save_png(sheet, Path(path))
