"""A causal field's pictures: each headline metric drawn over the image (one value per tile), each tile's CEM
(cropped to the blocks that can reach it), and report.html, whose overview opens a tile's CEM when clicked."""
from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from .fileio import atomic_write  # noqa: E402
from .map_pictures import map_picture, reach_box  # noqa: E402
from .report import PAGE  # noqa: E402

# metric -> (file, title, colour map, fixed range or None)
HEADLINE = {
    "radius90_px": ("radius90.png", "radius holding 90 % of the |CE| mass (px)", "viridis", None),
    "far_mass_share": ("far_mass.png", "share of the |CE| mass beyond one tile", "magma", (0.0, 1.0)),
    "positive_share": ("positive_share.png", "share of blocks that help the tile", "Reds", (0.0, 1.0)),
    "negative_share": ("negative_share.png", "share of blocks that hurt the tile", "Blues", (0.0, 1.0)),
    "effect_range_db": ("effect_range.png", "range of the map (dB)", "cividis", None),
}
TILE_DIR = "tiles"

FIELD_LEGEND = """<div class="legend"><p><b>A causal field.</b> Every tile of the output is a region of interest
(ROI) with its own causal effect map, all from one pass of interventions. The overview shows one metric per
tile; click a tile to open its map.</p>
<dl>
<dt>radius 90 %</dt><dd>the distance from the tile within which 90 % of its |CE| mass lies: how far the model draws
on context there.</dd>
<dt>far mass</dt><dd>the share of the |CE| mass farther than one tile from it.</dd>
<dt>positive / negative share</dt><dd>the share of the blocks outside the tile whose 95 % interval says they help
(above +tol) / hurt (below &minus;tol) it.</dd>
<dt>tile maps</dt><dd>each cropped to the blocks that can reach the tile (the others cannot: CE = 0); red helps,
blue hurts, on the tile's own colour scale.</dd>
</dl></div>"""


def write_field_pictures(field, metrics: dict[str, np.ndarray], out: Path) -> Path:
    """The metric pictures, the tiles' CEMs and report.html under ``out``; returns the report's path."""
    grey = field.data.gt.permute(1, 2, 0).numpy() @ np.array([0.299, 0.587, 0.114])
    for name, (file, title, cmap, limits) in HEADLINE.items():
        _metric_picture(grey, metrics[name], field.data.tile, title, cmap, limits, out / file)
    (out / TILE_DIR).mkdir(exist_ok=True)
    for j in range(len(field.tiles)):
        _tile_picture(field.tile_result(j), out / TILE_DIR / f"{j:05d}.png")
    overview = out / "overview.png"
    Image.fromarray(field.data.output.permute(1, 2, 0).numpy()).save(overview)
    return _report(field, metrics, out)


def _metric_picture(grey: np.ndarray, values: np.ndarray, tile: int, title: str, cmap: str, limits, path: Path):
    H, W = grey.shape
    fig, ax = plt.subplots(figsize=(6.4, 6.4 * H / W + 0.6), dpi=100)
    ax.imshow(grey, cmap="gray", vmin=0, vmax=255, extent=(0, W, H, 0), interpolation="nearest")
    rows, cols = values.shape
    vmin, vmax = limits if limits else (np.nanmin(values) if np.isfinite(values).any() else 0,
                                        np.nanmax(values) if np.isfinite(values).any() else 1)
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax, alpha=0.65,
                   extent=(0, cols * tile, rows * tile, 0), interpolation="nearest")
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    fig.tight_layout()
    _save_figure(fig, path)


def _save_figure(fig, path: Path) -> None:
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)


def _tile_picture(res, path: Path) -> None:
    """The tile's CEM over the picture, cropped to the blocks that can reach it, with the tile outlined (drawn on
    the crop alone: a 2048^2 field has 4,096 tiles)."""
    box = reach_box(res)
    y, x, h, w = box if box is not None else (0, 0, *res.gt.shape[-2:])
    crop = map_picture(res, box=(y, x, h, w))
    r = res.roi
    ty0, tx0 = max(0, r.y - y), max(0, r.x - x)
    ty1, tx1 = min(h, r.y + r.height - y) - 1, min(w, r.x + r.width - x) - 1
    crop[ty0:ty1 + 1, [tx0, tx1]] = (0, 200, 0)
    crop[[ty0, ty1], tx0:tx1 + 1] = (0, 200, 0)
    pil = Image.fromarray(crop)
    k = max(1, 192 // max(crop.shape[:2]))
    if k > 1:
        pil = pil.resize((crop.shape[1] * k, crop.shape[0] * k), Image.NEAREST)
    atomic_write(path, lambda f: pil.save(f, format="PNG"))


def _report(field, metrics: dict[str, np.ndarray], out: Path) -> Path:
    i, d = field.info, field.data
    H, W = d.gt.shape[-2:]
    cells = []
    for j, r in enumerate(field.tiles):
        tip = ", ".join(f"{k} {metrics[k].flat[j]:.3g}" for k in ("radius90_px", "positive_share",
                                                                  "negative_share") if np.isfinite(metrics[k].flat[j]))
        style = (f"left:{100 * r.x / W:.4f}%;top:{100 * r.y / H:.4f}%;width:{100 * r.width / W:.4f}%;"
                 f"height:{100 * r.height / H:.4f}%")
        cells.append(f'<a class="tile" href="{TILE_DIR}/{j:05d}.png" style="{style}" '
                     f'title="tile ({r.y}, {r.x}): {html.escape(tip)}"></a>')
    css = ("<style>.field{position:relative;display:inline-block;max-width:100%}.field img{display:block}"
           ".tile{position:absolute;box-sizing:border-box;border:1px solid rgba(255,255,255,.25)}"
           ".tile:hover{border:2px solid #0c0}</style>")
    figures = "".join(f'<figure class="cem"><img src="{file}" alt="{html.escape(title)}"><figcaption>'
                      f"{html.escape(title)}</figcaption></figure>" for file, title, _, _ in HEADLINE.values())
    about = (f"<p>{html.escape(str(i['model_name']))} on {html.escape(str(i['image_name']))}: "
             f"{field.shape[0]} x {field.shape[1]} tiles of {d.tile} px, {i['num_forwards']:,} forwards, "
             f"{i['timings_s']['total']:.1f} s ({html.escape(str(i['engine']))} engine).</p>")
    body = [css, about, "<h2>Overview (click a tile)</h2>",
            f'<div class="field"><img class="pixel" src="overview.png" alt="model output">{"".join(cells)}</div>',
            "<h2>Metrics per tile</h2>", f'<div class="row">{figures}</div>']
    from ._version import __version__
    page = PAGE.format(title="Causal field", version=__version__, body="\n".join(body), legend=FIELD_LEGEND)
    return atomic_write(out / "report.html", lambda f: f.write(page.encode()))
