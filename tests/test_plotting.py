"""The map figure as a paper uses it (issue 25): a 32-px ROI on a 512-px picture zoomed onto its effects, the ROI
outlined with the photograph inside it, the photograph's strength, the locality box off by default and on whole
blocks when shown, no title or caption on request, a print-size pie over the evaluated blocks, and typographic
minus signs. Checked on the rendered pixels where a reader would see it. Also the labelled colour bar and boxes,
vector output, the many-ROI sheet and undecided blocks hatched. The colour scales and the overlay are tested in
test_map_pictures.py."""
import json

import numpy as np
import pytest
import torch
from matplotlib.patches import Rectangle
from PIL import Image

import cem_fast
from cem_fast import map_pictures, plotting
from cem_fast.geometry import ROI
from cem_fast.report import write_report
from cem_fast.intervals import UNDECIDED
from cem_fast.result import CEMResult, CEMResults
from helpers import make_result

SIZE, BLOCK = 512, 8
ROI_BOX = (240, 256, 32, 32)  # y, x, h, w: 32 px on 512 px
MINUS = "\u2212"


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plotting.plt.close("all")


def photo() -> torch.Tensor:
    """A smooth grey ramp with a darker disc: the picture changes slowly, so a rendered pixel can be compared with
    the picture pixel under it."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    grey = 60 + 150 * x / SIZE - 40 * (np.hypot(y - 256, x - 272) < 60)
    return torch.from_numpy(np.repeat(grey[None].astype(np.uint8), 3, axis=0))


def paper_result(spread: bool = False, locality: bool = True, crop=(203, 219, 106, 98), fine: int = 0,
                 se=None, draws=None) -> CEMResult:
    """A 64x64-block map: a few blocks around the ROI help or hurt (``spread``: effects in the far corners too);
    ``locality``: only a 12x12-block disc around the ROI can reach it, the rest was skipped."""
    rows = cols = SIZE // BLOCK
    cem = np.zeros((rows, cols))
    cem[27:37, 29:37] = 0.05
    cem[27, 31] = 0.2
    cem[35, 34] = -0.12
    cem[30:34, 32:36] = 1.5  # the ROI's own blocks: large, not rated
    if spread:
        cem[1, 1], cem[62, 62] = 0.1, -0.1
    r, c = np.mgrid[0:rows, 0:cols]
    reach = np.hypot(r - 31.5, c - 33.5) < 6.5 if locality else None
    if locality:
        cem[~reach] = 0
    gt = photo()
    return CEMResult(cem=cem, effect=cem, samples_coarse=np.full((rows, cols, 3), 30.0) - cem[..., None],
                     samples_fine=np.full((rows, cols, fine), np.nan), gated=np.zeros((rows, cols), bool),
                     psnr_origin=30.0, roi=ROI(*ROI_BOX), block=BLOCK, scale=1, tol=0.01, task={"task": "DN"},
                     seed=0, mode="coarse-to-fine", model_name="net", image_name="pic", num_forwards=1,
                     wall_time=0.0, backend="torch", device="cpu", patch_bank={"digest": "x"}, gt=gt, degraded=gt,
                     output=gt, reachable=reach,
                     extra={"locality": {"active": True, "crop": list(crop),
                                         "skipped_blocks": int((~reach).sum())}} if locality else {},
                     effect_se=se, effect_draws=draws)


def limits_box(ax) -> tuple:
    """The (y, x, h, w) output-pixel box the axes show."""
    (x0, x1), (y1, y0) = ax.get_xlim(), ax.get_ylim()
    return (y0 + 0.5, x0 + 0.5, y1 - y0, x1 - x0)


def rendered(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)


def to_pixels(fig, ax, x, y) -> tuple:
    """Display (column, row) in the rendered picture of data point (x, y)."""
    dx, dy = ax.transData.transform((x, y))
    return dx, fig.canvas.get_width_height()[1] - dy


# ---- zoom --------------------------------------------------------------------------------------------------------

def test_auto_zoom_frames_the_effects_and_the_roi_on_whole_blocks():
    res = paper_result()
    fig = res.plot()
    ax = fig.axes[0]
    y, x, h, w = limits_box(ax)
    assert (y, x, h, w) == map_pictures.zoom_box(res)
    assert all(v % BLOCK == 0 for v in (y, x, h, w))
    assert h <= SIZE / 2 and w <= SIZE / 2  # zoomed: the 32-px ROI is no longer a spot in the panel
    ry, rx, rh, rw = ROI_BOX
    assert y < ry and x < rx and y + h > ry + rh and x + w > rx + rw
    rows, cols = np.nonzero((res.cem != 0) & ~res.roi_mask)
    assert rows.min() * BLOCK >= y and (rows.max() + 1) * BLOCK <= y + h  # every block with an effect shows
    assert cols.min() * BLOCK >= x and (cols.max() + 1) * BLOCK <= x + w
    assert f"zoom: output px y {y:.0f}\u2013{y + h:.0f}, x {x:.0f}\u2013{x + w:.0f} of 512\u00d7512" in ax.get_xlabel()
    (left, _), (right, _) = to_pixels(fig, ax, rx - 0.5, ry), to_pixels(fig, ax, rx + rw - 0.5, ry)
    assert (right - left) / ax.get_window_extent().width >= 0.15  # was 32 / 512 = 0.06 of the panel


def test_auto_zoom_shows_everything_when_the_effects_are_spread():
    res = paper_result(spread=True, locality=False)
    assert map_pictures.zoom_box(res) == (0, 0, SIZE, SIZE)
    ax = res.plot().axes[0]
    assert limits_box(ax) == (0, 0, SIZE, SIZE) and "zoom" not in ax.get_xlabel()


def test_reach_full_and_a_box_in_output_pixels():
    res = paper_result()
    rows, cols = np.nonzero(res.reachable)
    reach = (rows.min() * BLOCK, cols.min() * BLOCK, (rows.max() + 1 - rows.min()) * BLOCK,
             (cols.max() + 1 - cols.min()) * BLOCK)
    assert map_pictures.zoom_box(res, "reach") == reach
    assert limits_box(res.plot(zoom="reach").axes[0]) == reach
    assert limits_box(res.plot(zoom="full").axes[0]) == (0, 0, SIZE, SIZE)
    assert limits_box(res.plot(zoom=(250, 251, 20, 22)).axes[0]) == (248, 248, 24, 32)  # grown to whole blocks: x 251-273
    assert map_pictures.zoom_box(res, (500, 500, 100, 100)) == (496, 496, 16, 16)  # clipped to the picture
    assert map_pictures.zoom_box(paper_result(locality=False), "reach") == (0, 0, SIZE, SIZE)  # nothing skipped
    for bad in ("tight", (1, 2, 3), (0, 0, 0, 8), (600, 0, 8, 8), (1.5, 0, 8, 8), None):
        with pytest.raises(ValueError, match="zoom must be 'auto', 'reach', 'full' or a"):
            map_pictures.zoom_box(res, bad)


# ---- the ROI and the photograph ----------------------------------------------------------------------------------

def test_the_roi_is_an_outline_and_its_inside_shows_the_photograph():
    res = paper_result()
    fig = res.plot(title="", legend=False)
    ax = fig.axes[0]
    pic = rendered(fig)
    ry, rx, rh, rw = ROI_BOX
    (c0, r0), (c1, r1) = to_pixels(fig, ax, rx - 0.5, ry - 0.5), to_pixels(fig, ax, rx + rw - 0.5, ry + rh - 0.5)
    green = (pic[..., 1] > 180) & (pic[..., 0] < 100) & (pic[..., 2] < 100)
    rr, cc = np.nonzero(green)
    assert rr.size > 4 * (c1 - c0)  # drawn all round
    # every green pixel lies on the outline: within a few pixels of the ROI's edge, on all four sides
    off = np.minimum.reduce([np.abs(rr - r0), np.abs(rr - r1), np.abs(cc - c0), np.abs(cc - c1)])
    inside_band = (rr > r0 - 6) & (rr < r1 + 6) & (cc > c0 - 6) & (cc < c1 + 6)
    assert (off <= 4).all() and inside_band.all()
    for side in (np.abs(rr - r0) <= 4, np.abs(rr - r1) <= 4, np.abs(cc - c0) <= 4, np.abs(cc - c1) <= 4):
        assert side.sum() > (c1 - c0) / 2
    # inside: the photograph (grey ground truth at the background's strength), no fill
    grey = photo()[0].numpy() / 255
    expected = np.round(255 * (1 - map_pictures.DEFAULT_BACKGROUND * (1 - grey)))
    picture = map_pictures.map_picture(res)
    roi_pixels = picture[ry:ry + rh, rx:rx + rw]
    assert np.array_equal(roi_pixels, np.repeat(expected[ry:ry + rh, rx:rx + rw, None], 3, axis=2))
    centre = pic[int((r0 + r1) / 2), int((c0 + c1) / 2)]
    assert np.abs(centre - expected[ry + rh // 2, rx + rw // 2]).max() <= 3
    assert not green[int(r0) + 8:int(r1) - 8, int(c0) + 8:int(c1) - 8].any()


def test_background_sets_the_strength_of_the_photograph():
    res = paper_result()
    grey = photo()[0].numpy().astype(float) / 255
    y, x = 40, 40  # no effect there
    for b in (0.0, 0.6, 1.0):
        pic = map_pictures.map_picture(res, background=b)
        assert np.array_equal(pic[y, x], np.repeat(np.round(255 * (1 - b * (1 - grey[y, x]))), 3))
    assert np.array_equal(map_pictures.map_picture(res)[y, x], map_pictures.map_picture(res, background=0.6)[y, x])
    # a saturated block keeps the colour of the bar over any photograph; the default shows the photograph clearly
    sat = map_pictures.map_picture(res, 0.1, background=1.0)[27 * BLOCK + 4, 31 * BLOCK + 4]
    assert np.array_equal(sat, np.round(map_pictures.ColourScale(0.1).colours(np.array([0.2]))[0] * 255))
    default = map_pictures.map_picture(res)
    assert np.ptp(default[:64, :].astype(int)) > 60  # the ramp's contrast is not washed out to near white
    for bad in (-0.1, 1.5, "dark", True):
        with pytest.raises(ValueError, match="background must be a number from 0"):
            res.plot(background=bad)


# ---- the locality box -------------------------------------------------------------------------------------------

def grey_boxes(ax):
    grey = tuple(np.array(map_pictures.GREY) / 255)
    return [p for p in ax.patches if isinstance(p, Rectangle) and not p.get_hatch()
            and tuple(np.round(p.get_edgecolor()[:3], 4)) == tuple(np.round(grey, 4))]


def test_the_locality_box_is_off_by_default_and_on_whole_blocks_when_shown():
    res = paper_result()  # the pixel-tight crop (203, 219, 106, 98) is not block-aligned
    fig = res.plot()
    assert not grey_boxes(fig.axes[0])
    assert "locality" not in " ".join(t.get_text() for t in fig.legends[0].get_texts())
    fig = res.plot(locality=True)
    (box,) = grey_boxes(fig.axes[0])
    x0, y0 = box.get_x() + 0.5, box.get_y() + 0.5
    x1, y1 = x0 + box.get_width(), y0 + box.get_height()
    assert all(v % BLOCK == 0 for v in (x0, y0, x1, y1))
    rows, cols = np.nonzero(res.reachable)  # no evaluated block sticks out past it
    assert rows.min() * BLOCK >= y0 and (rows.max() + 1) * BLOCK <= y1
    assert cols.min() * BLOCK >= x0 and (cols.max() + 1) * BLOCK <= x1
    y, x, h, w = limits_box(fig.axes[0])  # the zoom shows the whole box
    assert y <= y0 and x <= x0 and y + h >= y1 and x + w >= x1
    assert "locality (grey): blocks outside it cannot reach the ROI and were skipped" in \
        " ".join(t.get_text() for t in fig.legends[0].get_texts())


# ---- title, caption, legend --------------------------------------------------------------------------------------

def test_no_title_and_no_caption_on_request():
    res = paper_result()
    full = res.plot()
    assert full.axes[0].get_title() == "net / pic" and full.axes[0].get_xlabel() and full.legends
    bare = res.plot(title="", legend=False)
    ax = bare.axes[0]
    assert ax.get_title() == "" and ax.get_xlabel() == "" and not bare.legends
    assert not [t for t in bare.texts if t.get_text()]
    assert bare.get_figheight() < full.get_figheight()  # no empty band where the words were
    no_caption = res.plot(caption=False)
    assert no_caption.legends and no_caption.axes[0].get_xlabel() == ""
    caption_only = res.plot(legend=False, caption=True)
    assert not caption_only.legends and "max +0.200 dB" in caption_only.axes[0].get_xlabel()
    assert res.plot(title="Fig. 3").axes[0].get_title() == "Fig. 3"


def test_the_colour_bar_is_as_tall_as_the_picture():
    fig = paper_result().plot()
    fig.canvas.draw()
    picture, bar = fig.axes[0].get_window_extent(), fig.axes[1].get_window_extent()
    assert abs(bar.height - picture.height) / picture.height < 0.05


def test_minus_signs_are_typographic():
    res = paper_result()
    fig = res.plot()
    ticks = [t.get_text() for t in fig.axes[1].get_yticklabels()]
    assert ticks[0].startswith(MINUS) and not any("-" in t for t in ticks)
    assert f"min {MINUS}0.120 dB at block (row 35, col 34)" in fig.axes[0].get_xlabel()
    assert "-" not in fig.axes[0].get_xlabel()


# ---- the pie ----------------------------------------------------------------------------------------------------

def screened_result():
    """coarse-to-fine with a fine stage: 4 reachable blocks were screened by the coarse gate (NaN error)."""
    rows = cols = SIZE // BLOCK
    se = np.where(paper_result().reachable, 0.001, 0.0)
    draws = np.where(paper_result().reachable, 3, 0)
    screened = [(26, 31), (26, 32), (37, 33), (37, 34)]
    for r, c in screened:
        se[r, c] = np.nan
    res = paper_result(fine=2, se=se, draws=draws)
    res.gated = res.reachable & ~np.isnan(se)
    assert res.screened.sum() == 4 and (res.cem[res.screened] == 0).all()
    return res, rows * cols


def test_the_pie_prints_at_three_inches_and_counts_skipped_and_screened_blocks_apart(tmp_path):
    res, blocks = screened_result()
    k = plotting.pie_counts(res)
    outside = blocks - int(res.roi_mask.sum())
    skipped = int((~res.reachable).sum())
    assert k["skipped"] == skipped and k["screened"] == 4
    assert k["helps"] + k["hurts"] + k["no_effect"] + k["skipped"] + k["screened"] == outside
    assert (k["helps"], k["hurts"]) == (int((res.cem[~res.roi_mask] > 0).sum()), 1)
    fig = plotting.pie_figure(res)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    n = k["helps"] + k["hurts"] + k["no_effect"]
    assert legend[2].startswith(f"no effect (0): {k['no_effect']} (") and legend[1].startswith(f"hurts ({MINUS}): 1")
    assert fig.axes[0].get_title() == f"{n} blocks evaluated outside the ROI"
    assert fig.axes[0].get_xlabel() == f"not in the pie: {skipped} skipped (cannot reach the ROI), 4 screened " \
                                       "(coarse gate)"
    res.save(tmp_path)
    assert Image.open(tmp_path / "pie.png").size == (900, 900)  # 3 x 3 in at 300 dpi
    summary = json.loads((tmp_path / "summary.json").read_text())
    write_report(tmp_path, [{"model": "net", "image": "pic", "dir": ".", "summary": summary}])
    page = (tmp_path / "report.html").read_text()
    assert (f"{k['helps']} help</span>, <span class=neg>1 hurt</span>, {k['no_effect']} no effect, "
            f"{skipped} skipped (cannot reach the ROI), 4 screened (coarse gate)") in page
    assert '<figure class="pie">' in page


def test_save_writes_the_zoomed_map_and_checks_its_options_first(tmp_path):
    res = paper_result()
    res.save(tmp_path / "a", zoom="full", background=0.3)
    cem = Image.open(tmp_path / "a" / "cem.png")
    assert cem.width >= 1000 and cem.height >= 700
    for bad in (dict(zoom="tight"), dict(background=2)):
        with pytest.raises(ValueError):
            res.save(tmp_path / "b", **bad)
        assert not (tmp_path / "b" / "result.npz").exists()


# ---- the map figure --------------------------------------------------------------------------------------------------

def test_colour_bar_is_labelled_keeps_zero_and_the_boxes_have_a_legend():
    res = make_result([[0.0, 0.3, -0.004, 0.0]], crop=(0, 0, 8, 20),  # minimum next to 0 used to hide the 0 tick
                      reachable=np.array([[True, True, True, False]]))
    fig = res.plot(locality=True)
    image_ax, bar = fig.axes
    assert "causal effect on ROI PSNR (dB)" in bar.get_ylabel() and "helps" in bar.get_ylabel()
    assert "0" in [t.get_text() for t in bar.get_yticklabels()]
    assert np.array_equal(image_ax.images[0].get_array(), map_pictures.map_picture(res, "auto"))
    legend = " ".join(t.get_text() for t in fig.legends[0].get_texts())
    assert "ROI (green outline)" in legend and "locality (grey): blocks outside it cannot reach the ROI" in legend
    assert "no block hurts" not in image_ax.get_xlabel() and "min \u22120.004 dB" in image_ax.get_xlabel()
    off = " ".join(t.get_text() for t in res.plot().legends[0].get_texts())  # the reach box is off by default
    assert "locality" not in off
    no_crop = make_result([[0.0, 0.3]]).plot(locality=True)
    assert "locality" not in " ".join(t.get_text() for t in no_crop.legends[0].get_texts())
    assert "no block hurts the ROI" in no_crop.axes[0].get_xlabel()


@pytest.mark.parametrize("suffix,magic", [(".pdf", b"%PDF"), (".svg", b"<?xml")])
def test_plot_writes_vector_files_by_suffix(tmp_path, suffix, magic):
    res = make_result([[0.0, 0.3], [-0.1, 0.0]])
    res.plot(tmp_path / f"map{suffix}")
    data = (tmp_path / f"map{suffix}").read_bytes()
    assert data.startswith(magic) and (suffix != ".svg" or b"<svg" in data)


def test_save_writes_vector_copies_and_records_the_scale(tmp_path):
    res = make_result([[0.0, 0.3], [-0.1, 0.0]])
    res.save(tmp_path, scale="paper", vector=("pdf", "svg"))
    assert (tmp_path / "cem.pdf").read_bytes().startswith(b"%PDF")
    assert b"<svg" in (tmp_path / "cem.svg").read_bytes()
    assert json.loads((tmp_path / "summary.json").read_text())["display_scale"] == {
        "kind": "paper", "bound_db": 1.0, "gamma": 1.2}
    with pytest.raises(ValueError, match="vector formats must be among pdf, svg, got 'eps'"):
        res.save(tmp_path / "b", vector="eps")
    with pytest.raises(ValueError, match="suffix must be one of"):
        res.plot(tmp_path / "map.xyz")


def test_many_roi_sheet_labels_each_tile_and_has_one_colour_bar(tmp_path):
    maps = CEMResults([make_result([[0.0, 0.2], [0.1, 0.0]], roi=ROI(0, 0, 8, 8)),
                       make_result([[-0.3, 0.0], [0.0, 0.0]], roi=ROI(8, 8, 8, 8))])
    fig = plotting.overlay_grid_figure(maps)
    assert len(fig.axes) == 2 and "causal effect on ROI PSNR (dB)" in fig.axes[1].get_ylabel()
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels == ["ROI 0, 0, 8x8", "ROI 8, 8, 8x8"]
    assert "0.3" in fig.axes[1].get_ylabel()  # one scale shared by both maps: the larger one's bound
    maps.save(tmp_path)
    from PIL import Image
    sheet = Image.open(tmp_path / "maps.png")
    assert sheet.width > 2 * (16 + 2) + 100  # the bare sheet was two 16-px tiles wide; now a bar beside them


def test_the_map_figure_hatches_undecided_blocks():
    from importlib import resources

    from matplotlib.patches import Rectangle

    from cem_fast.plotting import cem_figure, plt
    image = str(resources.files("cem_fast") / "data" / "demo.png")
    res = cem_fast.causal_effect_map("bicubic", image, task="SR", scale=4, roi=(48, 56, 16), mode="exhaustive",
                                     samples=4, progress=False)
    undecided = int(((res.decided() == UNDECIDED) & ~res.roi_mask).sum())
    assert undecided > 0
    fig = cem_figure(res)
    hatched = [p for p in fig.axes[0].patches if isinstance(p, Rectangle) and p.get_hatch()]
    assert len(hatched) == undecided
    assert any(f"{undecided} undecided" in t.get_text() for t in fig.legends[0].get_texts())
    plt.close(fig)
