"""The HTML report (cem_fast/report.py) as a reader sees it: its wording, the pictures res.save links, and its
layout at 1000 and 1400 px in a real browser (scripts/check_report.py) where chromium is installed."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cem_fast.report import write_report
from helpers import make_result

ROOT = Path(__file__).resolve().parents[1]


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
