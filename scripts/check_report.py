"""Check cem_fast's HTML reports in a real browser (headless Chromium): no broken image and no horizontal overflow
at 1000 and 1400 px, with a screenshot of each.

    python scripts/check_report.py --out /tmp/report_check             # builds a small run + compare (~30 s)
    python scripts/check_report.py --out /tmp/report_check --demo      # the demo report instead (~1 min)
    python scripts/check_report.py --html some/report.html --shots DIR # check existing pages

Needs `chromium` (or chromium-browser / google-chrome) on PATH; Debian: `apt-get install -y chromium`. For
each page it writes a copy beside it with a small script that measures the page after it loaded (the document's
scrollWidth against the viewport, every <img> loaded, the elements that stick out), reads the result with
--dump-dom, then removes the copy. Prints one JSON line per page and width; exits 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

WIDTHS = (1000, 1400)
HEIGHT = 1400
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# flags for a headless run as root in a container: no sandbox, no GPU, no network activity of its own
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--virtual-time-budget=10000"]

MEASURE = """<script>
window.addEventListener("load", () => {
  const doc = document.documentElement, view = doc.clientWidth;
  const imgs = [...document.images];
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute("src"));
  const wide = [...document.body.querySelectorAll("*")]
    .filter(e => e.getBoundingClientRect().right > view + 1)
    .map(e => e.tagName.toLowerCase() + (e.className ? "." + e.className : "")).slice(0, 8);
  const pre = document.createElement("pre");
  pre.id = "cem-check";
  pre.textContent = JSON.stringify({viewport: view, scroll_width: doc.scrollWidth, images: imgs.length,
                                    broken: broken, wide: wide});
  document.body.appendChild(pre);
});
</script>"""


def find_browser() -> str | None:
    return next((b for b in map(shutil.which, BROWSERS) if b), None)


def _browser(browser: str, args: list[str], width: int, height: int = HEIGHT) -> str:
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: nothing cached between pages
        p = subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}", *args],
                           capture_output=True, text=True, timeout=120, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"{browser} failed ({p.returncode}): {p.stderr.strip()[-500:]}")
    return p.stdout


def measure(browser: str, page: Path, width: int) -> dict:
    """The page's layout at ``width`` px as the browser computes it (see MEASURE)."""
    probe = page.with_name(f".{page.stem}.check.html")  # beside the page: its relative links still resolve
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    try:
        dom = _browser(browser, ["--dump-dom", probe.resolve().as_uri()], width)
    finally:
        probe.unlink(missing_ok=True)
    m = re.search(r'<pre id="cem-check">(.*?)</pre>', dom, re.DOTALL)
    if not m:
        raise RuntimeError(f"{page}: the measuring script did not run (no #cem-check in the DOM)")
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def screenshot(browser: str, page: Path, shot: Path, width: int) -> None:
    """A ``width`` x HEIGHT screenshot. Headless Chromium paints only its viewport, which is the window less
    about 150 px of (invisible) browser frame: the window is made taller and the picture cut to HEIGHT."""
    from PIL import Image
    _browser(browser, [f"--screenshot={shot}", page.resolve().as_uri()], width, HEIGHT + 200)
    with Image.open(shot) as im:
        cut = im.convert("RGB").crop((0, 0, width, HEIGHT))
    cut.save(shot, optimize=True)


def missing_files(page: Path) -> list[str]:
    """Every <img src> and link of the page that names no file beside it."""
    links = re.findall(r'(?:src|href)="([^"]+)"', page.read_text(encoding="utf-8"))
    return [link for link in links if not (page.parent / link).is_file()]


def check_page(browser: str, page: Path, shots: Path) -> list[str]:
    """Problems of ``page`` at every width (empty: none); a screenshot per width into ``shots``."""
    problems = [f"{page.name}: links to a missing file {f}" for f in missing_files(page)]
    for width in WIDTHS:
        shot = shots / f"{page.parent.name}-{page.stem}-{width}px.png"
        screenshot(browser, page, shot, width)
        r = measure(browser, page, width)
        print(json.dumps({"page": str(page), "width": width, "screenshot": str(shot), **r}), flush=True)
        if r["scroll_width"] > r["viewport"]:
            problems.append(f"{page.name} at {width} px: {r['scroll_width']} px wide > viewport {r['viewport']} px "
                            f"(sticking out: {', '.join(r['wide']) or '?'})")
        if r["broken"]:
            problems.append(f"{page.name} at {width} px: images that did not load: {', '.join(r['broken'])}")
        if r["images"] == 0:
            problems.append(f"{page.name} at {width} px: no images at all")
    return problems


def build_small(out: Path) -> list[Path]:
    """A compare of two x4 SR models on the shipped image (report.html + compare.html) and a two-ROI run
    (maps.png), with the cheap analytic bicubic model: what the report shows, in seconds."""
    with resources.as_file(resources.files("cem_fast") / "data" / "demo.png") as image:
        base = (f"task: SR\nscale: 4\nimages: [{image}]\nblock: 8\ncoarse: 2\nfine: 3\n")
        (out / "compare.yml").write_text(base + "models: [bicubic, 'cem_fast.models:Bicubic']\nroi: [48, 56, 24]\n")
        (out / "rois.yml").write_text(base + "model: bicubic\nrois: [[48, 56, 24], [80, 16, 16]]\n")
        for cmd, cfg, dest in (("compare", "compare.yml", "cmp"), ("run", "rois.yml", "rois")):
            _cli(cmd, str(out / cfg), "--out", str(out / dest), "--no-progress")
    return [out / "cmp" / "report.html", out / "cmp" / "compare.html", out / "rois" / "report.html"]


def build_demo(out: Path) -> list[Path]:
    _cli("demo", "--out", str(out / "demo"), "--fine", "2", "--no-progress")
    return [out / "demo" / "report.html"]


def _cli(*args: str) -> None:
    p = subprocess.run([sys.executable, "-m", "cem_fast.cli", *args], capture_output=True, text=True, timeout=900,
                       check=False)
    if p.returncode != 0:
        raise RuntimeError(f"cem-fast {' '.join(args)} failed: {p.stderr.strip()[-800:]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="folder for the runs it builds (and the screenshots)")
    ap.add_argument("--demo", action="store_true", help="check the demo report (cem-fast demo --fine 2)")
    ap.add_argument("--html", type=Path, nargs="*", default=[], help="check these pages instead of building")
    ap.add_argument("--shots", type=Path, help="screenshot folder (default: OUT/screenshots)")
    args = ap.parse_args(argv)
    browser = find_browser()
    if browser is None:
        print(f"check_report: needs one of {', '.join(BROWSERS)} on PATH (Debian: apt-get install -y chromium)",
              file=sys.stderr)
        return 2
    out = args.out or Path(tempfile.mkdtemp(prefix="cem_report_check_"))
    out.mkdir(parents=True, exist_ok=True)
    pages = args.html or (build_demo(out) if args.demo else build_small(out))
    shots = args.shots or out / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    problems = [p for page in pages for p in check_page(browser, page, shots)]
    for p in problems:
        print(f"check_report: {p}", file=sys.stderr)
    print(f"check_report: {len(pages)} pages x {len(WIDTHS)} widths, "
          f"{'OK' if not problems else f'{len(problems)} problems'}; screenshots in {shots}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
