"""Studies (cem_fast.study, cem-fast study): two models x two images x two ROIs from Python and from one YAML, the
rows' metrics equal to those of the maps computed alone, the files, resuming from the cache, and the paired
comparison of a shallow and a deep net of known reach."""
import csv
import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import cem_fast
from cem_fast import cli
from cem_fast.metrics import flat_metrics
from cem_fast.patches import PatchBank

MODELS = '''
from model_factories import Blur  # tests/ is on sys.path: the study runs in this process


def shallow():
    return Blur(1, 3)


def deep():
    return Blur(6, 5)
'''

ROIS = [(16, 16, 8), (28, 8, 8)]
ROI_TUPLES = [(16, 16, 8, 8), (28, 8, 8, 8)]
OPTIONS = dict(task="identity", block=4, coarse=3, fine=6, tol=0.01)


def smooth_image(seed: int, size: int = 48) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    ph = np.random.RandomState(seed).rand(3) * 6
    return (127 + 100 * np.stack([np.sin(2 * yy + ph[c]) * np.cos(1.5 * xx + ph[c]) for c in range(3)], -1)
            ).astype(np.uint8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("study")
    (d / "studymodels.py").write_text(MODELS)
    spec = importlib.util.spec_from_file_location("studymodels_for_tests", d / "studymodels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    PatchBank(torch.from_numpy(np.random.RandomState(0).randint(0, 256, (32, 3, 4, 4)).astype(np.uint8))).save(
        d / "bank.npz")
    images = []
    for seed in (1, 2):
        path = d / f"img{seed}.png"
        Image.fromarray(smooth_image(seed)).save(path)
        images.append(path)
    return d, mod, images


@pytest.fixture(scope="module")
def py_study(setup):
    d, mod, images = setup
    return cem_fast.study({"shallow": mod.shallow(), "deep": mod.deep()}, [str(p) for p in images], rois=ROIS,
                          seed=3, patches=str(d / "bank.npz"), **OPTIONS)


def _metrics_only(row):
    return {k: v for k, v in row.items() if k not in ("model", "image", "roi", "dir")}


def test_a_python_study_has_a_row_per_model_image_and_roi(py_study):
    rows = py_study.rows
    assert len(rows) == 8
    assert [(r["model"], r["image"], tuple(r["roi"])) for r in rows] == [
        (m, i, r) for m in ("shallow", "deep") for i in ("img1.png", "img2.png") for r in
        ROI_TUPLES]
    for r in rows:
        for k in ("positive_share", "negative_share", "no_effect_share", "undecided_share", "positive_mass_db",
                  "negative_mass_db", "negative_mass_share", "effect_min_db", "effect_max_db", "effect_range_db",
                  "radius50_px", "radius90_px", "far_mass_share", "radius90_px_low", "radius90_px_high", "profile"):
            assert k in r, k


def test_rows_equal_the_maps_computed_alone(setup, py_study):
    """Each row's metrics are those of the single-ROI map of that model and image with the same seed."""
    d, mod, images = setup
    nets = {"shallow": mod.shallow(), "deep": mod.deep()}
    for r in py_study.rows:
        res = cem_fast.causal_effect_map(nets[r["model"]], str(d / r["image"]), roi=tuple(r["roi"]), seed=3,
                                         patches=str(d / "bank.npz"), progress=False, **OPTIONS)
        m = res.metrics()
        assert _metrics_only(r) == {"psnr_roi_db": res.psnr_origin, **flat_metrics(m), "profile": m["profile"]}, (
            r["model"], r["image"], r["roi"])


def test_the_deeper_net_draws_on_farther_context_in_every_image(py_study):
    s = py_study.summary()
    assert s["deep"]["radius90_px"]["mean"] > s["shallow"]["radius90_px"]["mean"]
    (c,) = py_study.comparisons()
    assert (c["a"], c["b"]) == ("shallow", "deep")
    r90 = c["metrics"]["radius90_px"]
    assert r90["mean"] > 0 and r90["low"] > 0 and r90["sign_agrees"] == 2 and r90["images"] == 2
    # the difference is the mean over images of the per-image mean over ROIs of deep - shallow
    by = {(r["model"], r["image"], tuple(r["roi"])): r["radius90_px"] for r in py_study.rows}
    want = np.mean([by["deep", i, roi] - by["shallow", i, roi] for i in ("img1.png", "img2.png")
                    for roi in ROI_TUPLES])
    assert r90["mean"] == pytest.approx(want)
    for r in py_study.rows:  # every map of the deep net has |CE| mass beyond the shallow net's reach
        if r["model"] == "deep":
            assert r["radius90_px_low"] > 2 * np.sqrt(2)  # past the blocks next to the ROI (4-px blocks)


def test_save_writes_the_tables_the_profiles_and_a_page_linking_every_map(py_study, tmp_path):
    out = py_study.save(tmp_path / "s")
    for f in ("study.csv", "study.json", "study.md", "study.html", "profiles.png"):
        assert (out / f).is_file(), f
    with open(out / "study.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 8 and "radius90_px_high" in table[0] and "profile" not in table[0]
    doc = json.loads((out / "study.json").read_text())
    assert set(doc["summary"]) == {"shallow", "deep"} and len(doc["rows"]) == 8
    assert doc["mean_profiles"]["deep"]["mean_abs_db_low"] is not None
    md = (out / "study.md").read_text()
    assert "| radius90_px |" in md and "## deep - shallow" in md and "of 2 |" in md
    page = (out / "study.html").read_text()
    for r in doc["rows"]:
        assert f'{r["dir"]}/cem.png' in page
        assert (out / r["dir"] / "cem.png").is_file() and (out / r["dir"] / "summary.json").is_file()


def _config(d, images, extra=""):
    cfg = d / "study.yml"
    cfg.write_text("models: [studymodels:shallow, studymodels:deep]\n"
                   f"images: [{images[0].name}, {images[1].name}]\n"
                   "rois: [[16, 16, 8], [28, 8, 8]]\npatches: bank.npz\n"
                   "task: identity\nblock: 4\ncoarse: 3\nfine: 6\ntol: 0.01\nseed: 3\n" + extra)
    return cfg


def test_the_cli_study_from_one_yaml_equals_the_python_study_and_resumes(setup, py_study, tmp_path, capsys):
    d, _, images = setup
    cfg = _config(d, images)
    out = tmp_path / "cli"
    sys.modules.pop("studymodels", None)
    assert cli.main(["study", str(cfg), "--out", str(out), "--no-progress"]) == 0
    assert "study: " in capsys.readouterr().out
    doc = json.loads((out / "study.json").read_text())
    got = {(r["model"], r["image"], tuple(r["roi"])): r for r in doc["rows"]}
    want = json.loads(json.dumps(py_study.rows))
    assert len(got) == 8
    for r in want:
        g = got[r["model"], r["image"], tuple(r["roi"])]
        assert _metrics_only(g) == _metrics_only(r)
        assert (out / g["dir"] / "cem.png").is_file()
    assert (out / "study.md").is_file() and (out / "profiles.png").is_file() and (out / "report.html").is_file()
    # a second run reuses every sample from the cache and writes the same study
    assert cli.main(["study", str(cfg), "--out", str(out), "--no-progress"]) == 0
    again = json.loads((out / "study.json").read_text())
    assert again["rows"] == doc["rows"]
    summary = json.loads((out / doc["rows"][0]["dir"] / "summary.json").read_text())
    assert summary.get("reused_from_cache", 0) > 0


def test_study_arguments_are_checked(setup):
    d, mod, images = setup
    with pytest.raises(ValueError, match="rois"):
        cem_fast.study([mod.shallow()], [str(images[0])])
    with pytest.raises(ValueError, match="names"):
        cem_fast.study([mod.shallow()], [str(images[0])], rois=ROIS, names=["a", "b"])
    assert cli.main(["study", str(_config(d, images)), "--out", str(d / "x"), "--far-px", "-1"]) == 2
