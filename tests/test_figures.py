"""Figures, the HTML report and comparisons as a reader sees them: colour scales that show ordinary effects, labelled
colour bars and boxes, vector output, the many-ROI sheet, the report's wording and layout (in a real browser when
chromium is installed), and what a comparison calls significant."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

import cem_fast
from cem_fast import plotting
from cem_fast.compare import difference
from cem_fast.config import load_config
from cem_fast.geometry import ROI
from cem_fast.report import write_report
from cem_fast.result import CEMResult, CEMResults

ROOT = Path(__file__).resolve().parents[1]
WHITE = np.array([255, 255, 255])


def make_result(cem, task="DN", roi=None, psnr=30.0, coarse=None, crop=None, name="m", reachable=None):
    """A CEMResult of a given (rows, cols) map on a white 8-px-block image (no model run)."""
    cem = np.asarray(cem, dtype=np.float64)
    roi = roi or ROI(0, 0, 8, 8)
    rows, cols = cem.shape
    white = torch.full((3, rows * 8, cols * 8), 255, dtype=torch.uint8)
    coarse = np.full((rows, cols, 1), psnr) - cem[..., None] if coarse is None else coarse
    return CEMResult(cem=cem, effect=cem, samples_coarse=coarse, samples_fine=np.full((rows, cols, 0), np.nan),
                     gated=np.zeros((rows, cols), bool), psnr_origin=psnr, roi=roi, block=8, scale=1, tol=0.01,
                     task={"task": task}, seed=0, mode="coarse-to-fine", model_name=name, image_name="i",
                     num_forwards=1, wall_time=0.0, backend="torch", device="cpu", patch_bank={"digest": "x"},
                     gt=white, degraded=white, output=white, extra={"locality": {"crop": crop}} if crop else {},
                     reachable=reachable)


def block_colour(picture, row, col):
    return picture[row * 8 + 4, col * 8 + 4].astype(int)


def seismic(v):
    return np.array(matplotlib.colormaps["seismic"](v)[:3])


# ---- colour scales ----------------------------------------------------------------------------------------------

def test_auto_scale_makes_a_tenth_of_a_db_visible_and_paper_keeps_the_fixed_bounds():
    res = make_result([[0.0, 0.1, 0.0], [0.0, 0.0, 0.0]])  # ROI = block (0, 0)
    auto = block_colour(plotting.overlay(res, "auto"), 0, 1)
    assert np.abs(auto - WHITE).max() > 150, auto  # a clearly red block, not near-white
    assert np.abs(block_colour(plotting.overlay(res, "auto"), 1, 1) - WHITE).max() <= 2  # 0 stays white
    # "paper": DN bound 1 dB, |c|^(1/1.2); on a white picture the colours themselves
    assert np.array_equal(block_colour(plotting.overlay(res, "paper"), 0, 1),
                          np.round(seismic((0.1 ** (1 / 1.2) + 1) / 2) * 255))
    # background="paper": blended 0.9 map + 0.1 degraded input (white), as the paper does
    expected = np.round((0.9 * seismic((0.1 ** (1 / 1.2) + 1) / 2) + 0.1) * 255)
    assert np.array_equal(block_colour(plotting.overlay(res, "paper", background="paper"), 0, 1), expected)
    for task, bound in (("DN", 1.0), ("SR", 2.5), ("DR", 2.0)):
        cs = make_result([[0.0, 0.1]], task=task).colour_scale("paper")
        assert (cs.bound, cs.gamma) == (bound, 1.2)


def test_auto_bound_is_readable_never_zero_and_ignores_the_roi():
    assert make_result([[9.0, 0.23, 0.0]]).colour_scale().bound == 0.25  # the ROI's 9 dB does not set it
    assert make_result([[0.0, -0.7, 0.04]]).colour_scale().bound == 0.8
    assert make_result([[0.0, 0.0, 0.0]]).colour_scale().bound == 0.01  # all zero: tol, not 0
    assert plotting.readable_bound(0.3) == 0.3 and plotting.readable_bound(0.31) == 0.4
    assert plotting.readable_bound(1.26) == 1.5 and plotting.readable_bound(12) == 15


def test_a_number_is_a_linear_bound_in_db():
    res = make_result([[0.0, 0.25, 1.0]])
    pic = plotting.overlay(res, 0.5)
    expected = np.round(seismic(0.75) * 255)  # 0.25 of 0.5 dB, linear; on a white ground truth the colour itself
    assert np.array_equal(block_colour(pic, 0, 1), expected)
    assert np.array_equal(block_colour(pic, 0, 2), np.round(seismic(1.0) * 255))  # clipped
    for bad in (0, -1, float("inf"), "big", True):
        with pytest.raises(ValueError, match="scale must be 'auto', 'paper' or a positive number of dB"):
            res.colour_scale(bad)


# ---- the map figure --------------------------------------------------------------------------------------------

def test_colour_bar_is_labelled_keeps_zero_and_the_boxes_have_a_legend():
    res = make_result([[0.0, 0.3, -0.004, 0.0]], crop=(0, 0, 8, 20),  # minimum next to 0 used to hide the 0 tick
                      reachable=np.array([[True, True, True, False]]))
    fig = res.plot(locality=True)
    image_ax, bar = fig.axes
    assert "causal effect on ROI PSNR (dB)" in bar.get_ylabel() and "helps" in bar.get_ylabel()
    assert "0" in [t.get_text() for t in bar.get_yticklabels()]
    assert np.array_equal(image_ax.images[0].get_array(), plotting.map_picture(res, "auto"))
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


# ---- the report ------------------------------------------------------------------------------------------------

def report_of(tmp_path, cem) -> str:
    res = make_result(cem)
    res.save(tmp_path / "m" / "i")
    summary = json.loads((tmp_path / "m" / "i" / "summary.json").read_text())
    write_report(tmp_path, [{"model": "m", "image": "i", "dir": "m/i", "summary": summary}])
    return (tmp_path / "report.html").read_text()


def test_report_says_when_no_block_hurts_or_helps_and_explains_the_picture(tmp_path):
    page = report_of(tmp_path / "a", [[0.0, 0.2, 0.0]])
    assert "no block hurts the ROI" in page and "max +0.200 dB at block (row 0, col 1)" in page
    assert "min +0.000" not in page and "min -0.000" not in page and "min \u22120.000" not in page
    assert "1 help</span>, <span class=neg>0 hurt</span>, 1 no effect" in page  # the ROI block is not counted
    page = report_of(tmp_path / "b", [[0.0, -0.2, 0.0]])
    assert "no block helps the ROI" in page and "min \u22120.200 dB at block (row 0, col 1)" in page
    for text in ("the ROI PSNR of the unintervened output", "block (row, col)", "green outline", "grey box",
                 "blocks outside it cannot reach the ROI", "zoom"):
        assert text in page, text
    assert "<table><tr><th>model" not in page  # cards, not one wide table


def find_browser():
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


needs_browser = pytest.mark.skipif(find_browser() is None, reason="needs chromium on PATH (apt-get install "
                                   "chromium) to render report.html in a real browser")


def check_report(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "check_report.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=900, check=False)


@needs_browser
def test_check_report_catches_overflow_and_broken_images(tmp_path):
    (tmp_path / "page.html").write_text('<!doctype html><html><body><div style="width: 2000px">wide</div>'
                                        '<img src="nothing.png"></body></html>')
    p = check_report("--html", tmp_path / "page.html", "--shots", tmp_path / "shots")
    assert p.returncode == 1, p.stderr
    assert "links to a missing file nothing.png" in p.stderr
    assert "at 1000 px: 20" in p.stderr and "> viewport 1000 px" in p.stderr
    assert "images that did not load: nothing.png" in p.stderr


@needs_browser
@pytest.mark.slow
def test_reports_fit_1000_and_1400_px_in_a_real_browser(tmp_path):
    p = check_report("--out", tmp_path)
    assert p.returncode == 0, p.stderr
    assert "3 pages x 2 widths, OK" in p.stderr
    assert len(list((tmp_path / "screenshots").glob("*px.png"))) == 6


# ---- config ----------------------------------------------------------------------------------------------------

def test_plot_scale_config_key(tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text("model: bicubic\nimages: [x.png]\nroi: [0, 0, 8]\n")
    assert load_config(str(cfg)).options["plot_scale"] == "auto"
    assert load_config(str(cfg), ["plot_scale=paper"]).options["plot_scale"] == "paper"
    assert load_config(str(cfg), ["plot_scale=0.5"]).options["plot_scale"] == 0.5
    for bad in ("0", "big", "-1"):
        with pytest.raises(ValueError, match="plot_scale must be auto, paper or a positive bound in dB"):
            load_config(str(cfg), [f"plot_scale={bad}"])


# ---- comparisons -----------------------------------------------------------------------------------------------

def paired(diffs, noise, name_a="a", name_b="b"):
    """Two maps whose paired per-draw difference at block (r, c) is diffs[r][c] + (-1, 0, +1) * noise[r][c]:
    model b's draws all equal its Y(I) (no effect), model a's carry the difference."""
    d, e = np.asarray(diffs, float), np.asarray(noise, float)
    draws = d[..., None] + e[..., None] * np.array([-1.0, 0.0, 1.0])
    a = make_result(np.zeros(d.shape), coarse=30.0 - draws, name=name_a)
    b = make_result(np.zeros(d.shape), coarse=np.full(draws.shape, 30.0), name=name_b)
    return difference(a, b), a


def test_the_roi_is_left_out_of_the_largest_difference_and_the_scale():
    d, a = paired([[2.0, 0.08, 0.08], [0.08, 0.05, 0.0]], np.full((2, 3), 0.001))  # ROI = block (0, 0)
    s = d.summary()
    assert s["max_abs_diff_db"] == pytest.approx(0.08) and s["max_abs_diff_block"] in ([0, 1], [0, 2], [1, 0])
    fig = plotting.difference_figure(d, a)
    assert fig.axes[1].get_yticklabels()[-1].get_text() == "+0.08"  # bound 0.08, not 2
    assert "ROI (green outline): left out of the maximum and the colour scale" in \
        fig.legends[0].get_texts()[0].get_text()
    assert fig.axes[0].get_title() == "a \u2212 b"


def test_significant_needs_tol_and_an_interval_that_excludes_zero():
    diffs = [[2.0, 0.005, 0.05, 0.05]]
    noise = [[0.001, 0.0001, 0.1, 0.001]]  # 95% half-width = t(2) 4.30 * noise / sqrt(3)
    d, _ = paired(diffs, noise)
    assert d.half_width[0, 1] < 0.005 and d.half_width[0, 2] > 0.05  # (0, 1) certain but tiny, (0, 2) noise
    assert d.significant.tolist() == [[False, False, False, True]]  # ROI, below tol, CI has 0, significant
    assert d.summary()["significant_blocks"] == 1


class Upsample(torch.nn.Module):
    def __init__(self, gain):
        super().__init__()
        self.gain = gain

    def forward(self, x):
        return x * self.gain


def test_models_of_one_class_get_distinct_names(rng):
    img = rng.randint(0, 256, (16, 16, 3)).astype(np.uint8)
    args = dict(task="identity", roi=(0, 0, 8), coarse=2, fine=0, progress=False)
    results, diffs = cem_fast.compare_models([Upsample(0.95), Upsample(0.9)], img, **args)
    assert [r.model_name for r in results] == ["Upsample", "Upsample_2"]
    assert (diffs[0].name_a, diffs[0].name_b) == ("Upsample_2", "Upsample")
    results, diffs = cem_fast.compare_models([Upsample(0.95), Upsample(0.9)], img, names=["one", "two"], **args)
    assert (diffs[0].name_a, diffs[0].name_b) == ("two", "one")
    with pytest.raises(ValueError, match="names must give one name per model"):
        cem_fast.compare_models([Upsample(0.95), Upsample(0.9)], img, names=["one"], **args)
    same = difference(make_result([[0.0, 0.1]], name="Net"), make_result([[0.0, 0.1]], name="Net"))
    assert (same.name_a, same.name_b) == ("Net", "Net_2")


def test_res_save_writes_a_report_page_with_its_pictures(tmp_path):
    """res.save (one ROI and many) writes report.html beside the files, and every picture it shows exists."""
    import re

    import cem_fast
    rng = np.random.RandomState(3)
    image = rng.randint(0, 256, (48, 48, 3)).astype(np.uint8)
    one = cem_fast.causal_effect_map("bicubic", image, task="SR", scale=4, roi=(16, 16, 16), coarse=2, fine=2)
    many = cem_fast.causal_effect_maps("bicubic", image, task="SR", scale=4, rois=[(0, 0, 16), (24, 24, 16)],
                                       coarse=2, fine=2)
    for res, folder in ((one, tmp_path / "one"), (many, tmp_path / "many")):
        res.save(folder)
        page = (folder / "report.html").read_text()
        pictures = re.findall(r'<img[^>]+src="([^"]+)"', page)
        assert pictures, page[:500]
        for src in pictures:
            assert (folder / src).is_file(), src
