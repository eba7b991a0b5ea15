"""Copy the small files of a saved study into a folder to keep (docs/study): study.csv, study.json, study.md,
study.html, profiles.png, and each map's cem.png and summary.json at the same relative paths (the links of
study.html keep working); no result.npz (every sample of every map) and no other pictures.

    python scripts/keep_study_files.py study_out docs/study
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def portable(text: str, repo: Path, study: Path) -> str:
    """The study's local absolute paths made relative (``<repo>/...``, ``<study_out>/...``), so that a kept
    summary.json says where its inputs were without naming the machine it ran on."""
    text = text.replace(str(study.resolve()), "<study_out>")
    text = text.replace(str(repo.parent / "shared"), "<repo>/../shared")
    return text.replace(str(repo), "<repo>")


def main(src: str, dst: str) -> None:
    src_dir, dst_dir = Path(src), Path(dst)
    dst_dir.mkdir(parents=True, exist_ok=True)
    for name in ("study.csv", "study.json", "study.md", "study.html", "profiles.png"):
        shutil.copy2(src_dir / name, dst_dir / name)
    for row in json.loads((src_dir / "study.json").read_text())["rows"]:
        for name in ("cem.png", "summary.json"):
            target = dst_dir / row["dir"] / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src_dir / row["dir"] / name, target)
        summary = dst_dir / row["dir"] / "summary.json"
        summary.write_text(portable(summary.read_text(), REPO, src_dir))
    # the kept folder has each map's cem.png, not its report.html
    page = dst_dir / "study.html"
    page.write_text(page.read_text().replace("/report.html\"", "/cem.png\""))
    total = sum(p.stat().st_size for p in dst_dir.rglob("*") if p.is_file())
    print(f"kept {dst_dir}: {total / 1e6:.2f} MB in all")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
