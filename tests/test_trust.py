"""Adversarial inputs (issue 11): nothing runs code from a model, config or data file without the user's word, no
run's results replace another's, no stale or damaged sample is reused, nothing the model does in place changes
what later forwards see, one failure does not stop the other runs, every JSON file is valid, every mistake is one
line. Small images, bicubic or tiny models: fast."""
import builtins
import importlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cem_fast
from cem_fast import cli
from cem_fast.models import load_model
from cem_fast.patches import PatchBank

CLI = [sys.executable, "-m", "cem_fast.cli"]
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_cli(*args, cwd=None):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env=ENV)


def one_error_line(p) -> str:
    assert p.returncode != 0, p.stderr
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1, p.stderr
    return errors[0]


def strict_json(path: Path):
    """json.loads that refuses NaN / Infinity, as browsers and most other languages do."""
    def refuse(name):
        raise AssertionError(f"{path} holds the non-JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture
def bank(rng):
    return PatchBank(torch.from_numpy(rng.randint(0, 256, (16, 3, 8, 8)).astype(np.uint8)))


@pytest.fixture
def image(rng):
    return rng.randint(0, 256, (24, 24, 3)).astype(np.uint8)


def write_png(path: Path, rng, size=(16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.randint(0, 256, (*size, 3)).astype(np.uint8)).save(path)
    return path


def sr_config(tmp_path: Path, images, **extra) -> Path:
    cfg = {"task": "SR", "scale": 4, "model": "bicubic", "images": [str(i) for i in images], "roi": [0, 0, 8],
           "coarse": 1, "fine": 1, **extra}
    path = tmp_path / "c.yml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


# ---- 1. no code runs from a model, config or data file without the user's word -------------------------------

class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling this opens (creates) the marker file: code ran
        return (builtins.open, (self.marker, "w"))


def crafted_pt2(path: Path, marker: Path) -> Path:
    """A torch.export archive whose sample inputs are a pickle that runs code: torch.export.load falls back to
    ``weights_only=False`` when the safe loader refuses it."""
    ep = torch.export.export(torch.nn.Conv2d(3, 3, 3, padding=1), (torch.rand(1, 3, 8, 8),))
    good = io.BytesIO()
    torch.export.save(ep, good)
    evil = io.BytesIO()
    torch.save(_Evil(marker), evil)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            data = evil.getvalue() if info.filename.endswith("sample_inputs/model.pt") else src.read(info.filename)
            out.writestr(info, data)
    return path


def test_the_crafted_pt2_does_run_code_in_torch_export_load(tmp_path):
    """The threat is real (so the tests below can fail): torch.export.load itself runs the pickle."""
    marker = tmp_path / "pwned"
    evil = crafted_pt2(tmp_path / "evil.pt2", marker)
    with pytest.raises(Exception):
        torch.export.load(str(evil))
    assert marker.exists()


def test_pt2_and_torchscript_are_not_loaded_without_trust(tmp_path):
    marker = tmp_path / "pwned"
    evil = crafted_pt2(tmp_path / "evil.pt2", marker)
    with pytest.raises(ValueError, match=r"torch.export program, which can run code.*trust_model_code") as e:
        load_model(str(evil))
    assert "\n" not in str(e.value) and not marker.exists()
    torch.jit.trace(torch.nn.Conv2d(3, 3, 1), torch.rand(1, 3, 4, 4)).save(str(tmp_path / "ts.pt"))
    with pytest.raises(ValueError, match=r"TorchScript program.*--trust-model"):
        load_model(str(tmp_path / "ts.pt"))
    # the user's word loads it (and the crafted file still fails, with one line and no logger traceback)
    assert isinstance(load_model(str(tmp_path / "ts.pt"), trust_model_code=True)[0], torch.nn.Module)


def test_cli_refuses_a_pt2_in_a_model_folder_and_runs_the_other_models(tmp_path, rng):
    marker = tmp_path / "pwned"
    models = tmp_path / "models"
    models.mkdir()
    crafted_pt2(models / "evil.pt2", marker)
    torch.save({"weight": torch.zeros(1)}, models / "junk.pth")  # a checkpoint of an unknown architecture
    img = write_png(tmp_path / "im.png", rng)
    cfg = sr_config(tmp_path, [img], models=[str(models), "bicubic"], task="SR")
    cfg.write_text(cfg.read_text().replace('"model": "bicubic", ', ""))
    p = run_cli("run", cfg, "--out", tmp_path / "o", "--no-progress")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert not marker.exists()
    assert "evil.pt2' is a torch.export program" in p.stderr and "--trust-model" in p.stderr
    assert "Fallback to weights_only=False" not in p.stderr  # torch's own logger stayed quiet
    assert (tmp_path / "o" / "bicubic_x4" / "im" / "result.npz").is_file()
    report = (tmp_path / "o" / "report.html").read_text()
    assert report.count("failed: ") == 2 and "evil" in report and "junk" in report


def test_trusting_a_crafted_pt2_is_one_line_without_a_logged_traceback(tmp_path, rng):
    evil = crafted_pt2(tmp_path / "evil.pt2", tmp_path / "pwned")
    cfg = sr_config(tmp_path, [write_png(tmp_path / "im.png", rng)], model=str(evil))
    p = run_cli("run", cfg, "--out", tmp_path / "o", "--no-progress", "--trust-model")
    assert "is not a readable torch.export program" in one_error_line(p)


def test_config_tags_that_build_python_objects_are_refused(tmp_path, rng):
    marker = tmp_path / "pwned"
    img = write_png(tmp_path / "im.png", rng)
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"task: SR\nmodel: !!python/object/apply:builtins.open ['{marker}', 'w']\n"
                   f"images: [{img}]\nroi: [0, 0, 8]\n")
    p = run_cli("run", cfg, "--out", tmp_path / "o")
    assert "is not valid YAML" in one_error_line(p) and not marker.exists()


def test_patch_bank_with_a_pickled_array_is_refused(tmp_path, rng):
    marker = tmp_path / "pwned"
    names = np.empty(2, dtype=object)
    names[:] = [_Evil(marker), "b"]
    np.savez(tmp_path / "bank.npz", patches=rng.randint(0, 256, (2, 3, 8, 8)).astype(np.uint8), names=names)
    with pytest.raises(ValueError) as e:
        cem_fast.load_patch_bank(tmp_path / "bank.npz")
    assert "\n" not in str(e.value) and "bank.npz" in str(e.value) and not marker.exists()


# ---- 2. every run has a folder of its own --------------------------------------------------------------------

def test_images_with_one_name_or_one_safe_name_get_their_own_folders(tmp_path, rng):
    paths = [write_png(tmp_path / "A" / "img.png", rng), write_png(tmp_path / "B" / "img.png", rng),
             write_png(tmp_path / "a b.png", rng), write_png(tmp_path / "a_b.png", rng)]
    p = run_cli("run", sr_config(tmp_path, paths), "--out", tmp_path / "o", "--no-progress")
    assert p.returncode == 0, p.stderr
    base = tmp_path / "o" / "bicubic_x4"
    folders = ["img", "img_2", "a_b", "a_b_2"]
    for folder, path in zip(folders, paths):
        s = strict_json(base / folder / "summary.json")
        assert s["image_path"] == str(path)
        gt = np.asarray(Image.open(base / folder / "gt.png").convert("RGB"))
        # the pictures are this image's (away from the ROI box drawn on them)
        assert np.array_equal(gt[12:, 12:], np.asarray(Image.open(path))[12:, 12:])
    report = (tmp_path / "o" / "report.html").read_text()
    for folder in folders:
        assert f'href="bicubic_x4/{folder}/summary.json"' in report
    assert str(paths[0]) in report and str(paths[1]) in report  # same file names: told apart by their paths


# ---- 3. a model's code is part of the cache key -------------------------------------------------------------

MODEL_SOURCE = """
import torch


class Editable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        torch.nn.init.constant_(self.conv.weight, 0.02)
        torch.nn.init.zeros_(self.conv.bias)

    def forward(self, x):
        return x + {factor} * self.conv(x)
"""


def test_editing_a_models_forward_invalidates_its_cached_samples(tmp_path, monkeypatch, image, bank):
    monkeypatch.syspath_prepend(str(tmp_path))
    src = tmp_path / "editable_model.py"
    args = dict(task="DN", sigma=25, roi=(8, 8, 8), coarse=2, fine=2, patches=bank, cache=tmp_path / "cache")
    src.write_text(MODEL_SOURCE.format(factor="0.5"))
    import editable_model
    first = cem_fast.causal_effect_map(editable_model.Editable(), image, **args)
    src.write_text(MODEL_SOURCE.format(factor="-3.0"))  # same class name, repr and weights; new code
    importlib.reload(editable_model)
    edited = cem_fast.causal_effect_map(editable_model.Editable(), image, **args)
    fresh = cem_fast.causal_effect_map(editable_model.Editable(), image, **{**args, "cache": None})
    assert edited.extra["reused_from_cache"] == 0
    assert np.array_equal(edited.effect, fresh.effect)
    assert not np.array_equal(edited.effect, first.effect)
    again = cem_fast.causal_effect_map(editable_model.Editable(), image, **args)  # unchanged code: reused
    assert again.extra["reused_from_cache"] > 0 and np.array_equal(again.effect, fresh.effect)


def test_a_model_whose_code_cannot_be_read_is_never_reused(tmp_path, image, bank):
    from cem_fast.models import model_code_digest
    ns = {"__name__": "typed_in_a_repl"}
    exec("import torch\nclass Dim(torch.nn.Module):\n    def forward(self, x):\n        return 0.8 * x\n", ns)
    code, why = model_code_digest(ns["Dim"]())
    assert code is None and "typed_in_a_repl.Dim" in why
    args = dict(task="identity", roi=(8, 8, 8), coarse=2, fine=1, patches=bank, cache=tmp_path / "cache")
    cem_fast.causal_effect_map(ns["Dim"](), image, **args)
    res = cem_fast.causal_effect_map(ns["Dim"](), image, **args)
    assert res.extra["reused_from_cache"] == 0 and "not reused" in res.extra["cache_note"]


def test_torchscript_and_exported_code_changes_change_the_digest():
    from cem_fast.models import model_code_digest

    class A(torch.nn.Module):
        def forward(self, x):
            return x * 2

    class B(torch.nn.Module):
        def forward(self, x):
            return x * 3

    ts = [model_code_digest(torch.jit.script(m()))[0] for m in (A, B)]
    ex = [model_code_digest(torch.export.export(m(), (torch.rand(1, 3, 4, 4),)).module())[0] for m in (A, B)]
    assert None not in ts + ex and ts[0] != ts[1] and ex[0] != ex[1]
    # an instance whose forward was replaced is another model
    a, b = A(), A()
    b.forward = lambda x: x * 5
    assert model_code_digest(a)[0] != model_code_digest(b)[0]


# ---- 4. a model that writes into its input cannot change what later forwards see ----------------------------

class InPlace(torch.nn.Module):
    def forward(self, x):
        return x.mul_(0.9)


class OutOfPlace(torch.nn.Module):
    def forward(self, x):
        return x * 0.9


class InPlaceConv(torch.nn.Module):
    def __init__(self, inplace):
        super().__init__()
        self.inplace = inplace
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        torch.nn.init.constant_(self.conv.weight, 0.05)
        torch.nn.init.zeros_(self.conv.bias)

    def forward(self, x):
        x = x.mul_(0.9) if self.inplace else x * 0.9
        return x + self.conv(x)


@pytest.mark.parametrize("make", [
    lambda inplace: InPlace() if inplace else OutOfPlace(),
    lambda inplace: torch.jit.script(InPlace() if inplace else OutOfPlace()),
    lambda inplace: InPlaceConv(inplace),
], ids=["plain", "scripted", "conv"])
@pytest.mark.parametrize("locality", ["auto", "off"])
def test_in_place_models_get_the_map_of_their_out_of_place_twin(make, locality, image, bank):
    args = dict(task="DN", sigma=25, roi=(8, 8, 8), coarse=2, fine=2, patches=bank, locality=locality)
    clean = image.copy()
    got = cem_fast.causal_effect_map(make(True), image, **args)
    want = cem_fast.causal_effect_map(make(False), image, **args)
    assert np.array_equal(image, clean)  # the caller's array is untouched
    assert got.psnr_origin == want.psnr_origin
    np.testing.assert_allclose(got.effect, want.effect, atol=1e-9)
    assert torch.equal(got.gt, want.gt)


# ---- 5. damaged cache chunks are recomputed, and the summary says so -----------------------------------------

def test_a_flipped_bit_in_the_cache_is_recomputed_and_reported(tmp_path, image, bank, tiny_net):
    args = dict(task="DN", sigma=25, roi=(8, 8, 8), coarse=2, fine=2, patches=bank, cache=tmp_path / "cache",
                batch_size=4)
    first = cem_fast.causal_effect_map(tiny_net, image, **args)
    chunks = sorted((tmp_path / "cache").rglob("coarse/*.npz"))
    assert len(chunks) > 2
    with np.load(chunks[1]) as z:
        arrays = dict(z)
    arrays["scores"] = arrays["scores"].copy()
    arrays["scores"].view(np.uint64)[0, 0] ^= 1 << 40  # one flipped bit, the file otherwise well formed
    np.savez(chunks[1], **arrays)
    res = cem_fast.causal_effect_map(tiny_net, image, **args)
    assert len(res.extra["cache_dropped_chunks"]) == 1 and "checksum" in res.extra["cache_dropped_chunks"][0]
    assert np.array_equal(res.effect, first.effect)
    assert np.array_equal(res.samples_coarse, first.samples_coarse)


# ---- 6. one failure does not stop the other runs --------------------------------------------------------------

def raising_factory():
    raise KeyError("weights")


def test_failures_of_any_kind_each_get_a_row_and_the_rest_run(tmp_path, rng, monkeypatch, capsys):
    images = [write_png(tmp_path / "one.png", rng), write_png(tmp_path / "two.png", rng)]
    cfg = sr_config(tmp_path, images, models=["test_trust:raising_factory", str(tmp_path / "missing.pth"),
                                              "bicubic"])
    cfg.write_text(cfg.read_text().replace('"model": "bicubic", ', ""))
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    from cem_fast import plotting
    save_pictures = plotting.save_pictures

    def disk_full_on_one(res, out, **options):
        if res.image_name == "one.png":
            raise OSError(28, "No space left on device")
        return save_pictures(res, out, **options)

    monkeypatch.setattr(plotting, "save_pictures", disk_full_on_one)
    rc = cli.main(["run", str(cfg), "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert "raising_factory() raised KeyError: 'weights'" in err
    assert "No space left on device" in err
    assert (tmp_path / "o" / "bicubic_x4" / "two" / "cem.png").is_file()
    assert not (tmp_path / "o" / "bicubic_x4" / "one" / "result.npz").exists()  # no half result passes for one
    assert "No space left" in strict_json(tmp_path / "o" / "bicubic_x4" / "one" / "error.json")["error"]
    report = (tmp_path / "o" / "report.html").read_text()
    assert report.count("failed: ") == 5  # 2 images x 2 models that did not load, and the full disk


def test_a_failed_rerun_does_not_leave_the_previous_result_in_place(tmp_path, rng):
    img = write_png(tmp_path / "im.png", rng)
    cfg = sr_config(tmp_path, [img])
    assert run_cli("run", cfg, "--out", tmp_path / "o", "--no-progress").returncode == 0
    folder = tmp_path / "o" / "bicubic_x4" / "im"
    assert (folder / "result.npz").is_file()
    (tmp_path / "empty").mkdir()
    p = run_cli("run", cfg, "--out", tmp_path / "o", "--no-progress", "--set", f"patches={tmp_path / 'empty'}")
    assert "holds no images" in one_error_line(p)
    assert not (folder / "result.npz").exists() and not (folder / "summary.json").exists()
    assert "holds no images" in strict_json(folder / "error.json")["error"]
    assert run_cli("run", cfg, "--out", tmp_path / "o", "--no-progress").returncode == 0
    assert (folder / "result.npz").is_file() and not (folder / "error.json").exists()


def test_temporary_files_of_a_killed_run_are_cleaned(tmp_path, rng):
    img = write_png(tmp_path / "im.png", rng)
    stale = tmp_path / "o" / "bicubic_x4" / "im" / ".result.npz.tmp999999999"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a file")
    assert run_cli("run", sr_config(tmp_path, [img]), "--out", tmp_path / "o", "--no-progress").returncode == 0
    assert not stale.exists()
    assert not list((tmp_path / "o").rglob("*.tmp*"))


# ---- 7. images: 16 bits, floats, orientation, size, uniform ---------------------------------------------------

def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path, bank):
    ramp = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0..65535
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    gt, _ = cem_fast.load_image(tmp_path / "g16.png")
    want = np.round(ramp / 257.0).astype(np.uint8)
    assert np.array_equal(gt[0].numpy(), want) and np.array_equal(gt[2].numpy(), want)
    assert len(np.unique(gt.numpy())) == 256  # not two levels
    arr, _ = cem_fast.load_image(np.repeat(ramp[..., None], 3, axis=2))  # a uint16 array, the same way
    assert np.array_equal(arr[1].numpy(), want)


def test_float_tiff_in_unit_range_is_scaled_and_out_of_range_refused(tmp_path):
    a = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(a, mode="F").save(tmp_path / "f.tif")
    gt, _ = cem_fast.load_image(tmp_path / "f.tif")
    assert np.array_equal(gt[0].numpy(), np.round(a.astype(np.float64) * 255).astype(np.uint8))
    Image.fromarray(a * 300, mode="F").save(tmp_path / "big.tif")
    with pytest.raises(ValueError, match=r"big.tif.*float pixels in \[0, 300\], expected \[0, 1\]") as e:
        cem_fast.load_image(tmp_path / "big.tif")
    assert "\n" not in str(e.value)


def test_exif_orientation_is_applied(tmp_path, rng):
    a = rng.randint(0, 256, (10, 20, 3)).astype(np.uint8)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # the camera was turned: display rotated 90 degrees clockwise
    im.save(tmp_path / "turned.png", exif=exif)
    gt, _ = cem_fast.load_image(tmp_path / "turned.png")
    assert tuple(gt.shape) == (3, 20, 10)
    assert np.array_equal(gt.permute(1, 2, 0).numpy(), np.rot90(a, k=-1))


def test_images_above_max_pixels_are_refused_before_decoding(tmp_path, rng, monkeypatch):
    path = write_png(tmp_path / "big.png", rng, size=(64, 48))
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(1) or (_ for _ in ()).throw(
        AssertionError("decoded")))
    with pytest.raises(ValueError, match=r"big.png' is 48x64 = 3,072 pixels, above max_pixels=1,000") as e:
        cem_fast.load_image(path, max_pixels=1000)
    assert "\n" not in str(e.value) and not decoded
    assert cem_fast.estimator.DEFAULT_MAX_PIXELS == 8192 * 8192
    monkeypatch.undo()
    p = run_cli("run", sr_config(tmp_path, [path], max_pixels=1000), "--out", tmp_path / "o", "--no-progress")
    assert "above max_pixels=1,000" in one_error_line(p)


def test_a_roi_the_model_restores_exactly_is_one_clear_error(bank):
    flat = np.full((16, 16, 3), 77, np.uint8)
    with pytest.raises(ValueError, match="reproduces the ground truth exactly there.*Y\\(I\\) is infinite") as e:
        cem_fast.causal_effect_map(torch.nn.Identity(), flat, task="identity", roi=(0, 0, 8), patches=bank,
                                   coarse=1, fine=1)
    assert "\n" not in str(e.value)


class Constant(torch.nn.Module):
    """Outputs the uniform image whatever its input: Y(I) and every sample are +inf, every effect is 0."""

    def forward(self, x):
        return torch.full_like(x, 77 / 255)


def test_an_infinite_y_is_written_as_valid_json(tmp_path, bank):
    flat = np.full((16, 16, 3), 77, np.uint8)
    res = cem_fast.causal_effect_map(Constant(), flat, task="identity", roi=(0, 0, 8), patches=bank, coarse=1,
                                     fine=1)
    assert res.psnr_origin == float("inf") and not res.cem.any()
    res.save(tmp_path / "r")
    assert strict_json(tmp_path / "r" / "summary.json")["psnr_origin"] == "inf"
    maps = cem_fast.causal_effect_maps(Constant(), flat, task="identity", rois=[(0, 0, 8), (8, 8, 8)],
                                       patches=bank, coarse=1, fine=1)
    maps.save(tmp_path / "m")
    assert strict_json(tmp_path / "m" / "rois.json")["rois"][1]["psnr_origin"] == "inf"


# ---- 8, 9. every mistake is one line ---------------------------------------------------------------------------

@pytest.mark.parametrize("override,match", [
    ("seed=100000000000000000000000", "seed must be an integer in [0, 9223372036854775807]"),
    ("seed=1e23", "seed must be an integer"),
    ("Imagelist=[5]", "Imagelist entries must be file names"),
    ("model_options=5", "model_options must be a mapping"),
    ("model_options={noise_level: abc}", "model_options.noise_level must be a finite number"),
    ("rain_seed=abc", "rain_seed must be an integer"),
    ("sigma=.inf", "sigma must be a finite number in (0, 255], got inf"),
    ("sigma=1e308", "sigma must be a finite number in (0, 255]"),
    ("sigma=abc", "sigma must be a finite number in (0, 255], got 'abc'"),
    ("coarse=100000000000", "coarse + fine (or samples) must be at most 1048576"),
    ("model=os:system", "os is a standard-library module, not a model factory"),
    ("model=numpy:zeros", "zeros is a builtin_function_or_method, expected a factory function"),
    ("model=test_trust:raising_factory", "raising_factory() raised KeyError"),
    ("roi=[8.5, 0, 8]", "roi must be (y, x, size) or (y, x, height, width) integers, got [8.5, 0, 8]"),
    ("max_pixels=0", "max_pixels must be a positive integer, got 0"),
    ("block=-8", "block must be a positive integer, got -8"),
    ("backend=[torch]", "backend must be one of auto, torch, triton, cuda, cpp, got ['torch']"),
    ("rain_preset=[small]", "rain_preset must be one of small, medium, large, random"),
    ("device=[cpu]", "device must be a name such as cpu or cuda:0"),
    ("samples=3", "samples applies to mode: exhaustive"),
    ("crop=[-16, -16, 16, 16]", "crop must be a PIL box [left, upper, right, lower] of non-negative integers"),
    ("crop=[false, false, 16, 16]", "crop must be a PIL box"),
    ("model=http.server:test", "http.server is a standard-library module, not a model factory"),
    ("model=this:x", "this is a standard-library module"),
    ("trust_model_code=yes please", "trust_model_code must be true or false"),
])
def test_cli_mistakes_are_one_line(tmp_path, rng, override, match):
    cfg = sr_config(tmp_path, [write_png(tmp_path / "im.png", rng)])
    p = run_cli("run", cfg, "--out", tmp_path / "o", "--no-progress", "--set", override)
    assert match in one_error_line(p)


def test_patch_npz_missing_its_arrays_is_one_line(tmp_path, rng):
    np.savez(tmp_path / "bank.npz", other=np.zeros(3))
    cfg = sr_config(tmp_path, [write_png(tmp_path / "im.png", rng)], patches=str(tmp_path / "bank.npz"))
    assert "has no array 'patches'" in one_error_line(run_cli("run", cfg, "--out", tmp_path / "o"))


def test_config_that_is_not_utf8_or_repeats_a_key(tmp_path, rng):
    img = write_png(tmp_path / "im.png", rng)
    bad = tmp_path / "latin1.yml"
    bad.write_bytes(f"task: SR\nmodel: bicubic\nimages: [{img}]\nroi: [0, 0, 8]\n# caf\xe9\n".encode("latin-1"))
    assert "latin1.yml' is not UTF-8 text" in one_error_line(run_cli("run", bad, "--out", tmp_path / "o"))
    dup = tmp_path / "dup.yml"
    dup.write_text(f"task: SR\nmodel: bicubic\nimages: [{img}]\nroi: [0, 0, 8]\nroi: [8, 8, 8]\n")
    assert "key 'roi' is given twice (line 5)" in one_error_line(run_cli("run", dup, "--out", tmp_path / "o"))


def test_unreadable_torchscript_names_the_file(tmp_path, rng):
    bad = tmp_path / "broken.pt"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("broken/code/__torch__.py", "this is not TorchScript")
    cfg = sr_config(tmp_path, [write_png(tmp_path / "im.png", rng)], model=str(bad))
    line = one_error_line(run_cli("run", cfg, "--out", tmp_path / "o", "--trust-model"))
    assert "broken.pt' is not a readable TorchScript program" in line


def test_unexpected_errors_are_one_line_too(monkeypatch, capsys):
    def boom(args):
        raise TypeError("\nsomething deep")  # an empty first line used to print a bare 'cem-fast: error: '

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["info"].set_defaults(func=boom)
    assert cli.main(["info"]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert err.startswith("cem-fast: error: TypeError: something deep") and err.count("\n") == 1


def test_ctrl_c_while_torch_loads_is_one_line(tmp_path, rng):
    cfg = sr_config(tmp_path, [write_png(tmp_path / "im.png", rng)])
    proc = subprocess.Popen(CLI + ["run", str(cfg), "--out", str(tmp_path / "o")], stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 60
    while time.time() < deadline:  # interrupt while torch's library is being loaded: start-up, not the run
        try:
            if "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text():
                break
        except OSError:
            pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "cem-fast: interrupted"


def test_readme_states_the_trust_rules():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for promise in ("trust_model_code", "--trust-model", "max_pixels", "error.json", "weights_only=True"):
        assert promise in readme, promise


# ---- found by an adversarial re-try --------------------------------------------------------------------------

def test_names_never_leave_the_output_folder_or_take_the_reports_name(tmp_path, rng):
    img = write_png(tmp_path / "x.png", rng).rename(tmp_path / "...png")  # its stem is '..'
    sd = cem_fast.models.default_model("dn").state_dict()
    (tmp_path / "m").mkdir()
    torch.save(sd, tmp_path / "m" / "...pth")
    torch.save(sd, tmp_path / "m" / "report.html.pth")
    cfg = sr_config(tmp_path, [img], task="DN", models=[str(tmp_path / "m" / "...pth"),
                                                        str(tmp_path / "m" / "report.html.pth")])
    cfg.write_text(cfg.read_text().replace('"model": "bicubic", ', ""))
    (tmp_path / "o").mkdir()
    before = set(tmp_path.iterdir())
    p = run_cli("run", cfg, "--out", tmp_path / "o", "--no-progress")
    assert p.returncode == 0, p.stderr
    assert set(tmp_path.iterdir()) == before  # nothing written beside the output folder
    assert (tmp_path / "o" / "report.html").is_file()
    runs = sorted(str(f.parent.relative_to(tmp_path / "o")) for f in (tmp_path / "o").rglob("result.npz"))
    assert runs == ["model/image", "report.html_/image"], runs


def test_a_users_own_temporary_files_under_out_are_left_alone(tmp_path, rng):
    mine = tmp_path / "o" / "docs" / ".thesis.tex.tmp99999"
    mine.parent.mkdir(parents=True)
    mine.write_text("my thesis")
    assert run_cli("run", sr_config(tmp_path, [write_png(tmp_path / "im.png", rng)]), "--out", tmp_path / "o",
                   "--no-progress").returncode == 0
    assert mine.read_text() == "my thesis"


HELPER_MODEL = """
import torch
from helper_code import scale


class UsesHelper(torch.nn.Module):
    def forward(self, x):
        return scale(x)
"""


def test_editing_a_helper_the_model_imports_invalidates_its_cached_samples(tmp_path, monkeypatch, image, bank):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "helper_model.py").write_text(HELPER_MODEL)
    (tmp_path / "helper_code.py").write_text("def scale(x):\n    return x * 0.9\n")
    import helper_code
    import helper_model
    args = dict(task="identity", roi=(8, 8, 8), coarse=2, fine=1, patches=bank, cache=tmp_path / "cache")
    cem_fast.causal_effect_map(helper_model.UsesHelper(), image, **args)
    (tmp_path / "helper_code.py").write_text("def scale(x):\n    return x * 0.5 + 0.1\n")
    importlib.reload(helper_code)
    importlib.reload(helper_model)
    edited = cem_fast.causal_effect_map(helper_model.UsesHelper(), image, **args)
    fresh = cem_fast.causal_effect_map(helper_model.UsesHelper(), image, **{**args, "cache": None})
    assert edited.extra["reused_from_cache"] == 0 and np.array_equal(edited.effect, fresh.effect)


class Exits(torch.nn.Module):
    def forward(self, x):
        raise SystemExit(3)  # research code that parses arguments or exits


def make_exits():
    return Exits()


def test_a_model_that_calls_sys_exit_fails_its_run_only(tmp_path, rng):
    cfg = sr_config(tmp_path, [write_png(tmp_path / "im.png", rng)], models=["test_trust:make_exits", "bicubic"])
    cfg.write_text(cfg.read_text().replace('"model": "bicubic", ', ""))
    p = run_cli("run", cfg, "--out", tmp_path / "o", "--no-progress")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert (tmp_path / "o" / "bicubic_x4" / "im" / "result.npz").is_file()
    assert "failed: " in (tmp_path / "o" / "report.html").read_text()


def test_switching_between_roi_and_rois_leaves_no_stale_files(tmp_path, rng):
    cfg = sr_config(tmp_path, [write_png(tmp_path / "im.png", rng)])
    folder = tmp_path / "o" / "bicubic_x4" / "im"
    assert run_cli("run", cfg, "--out", tmp_path / "o", "--no-progress").returncode == 0
    assert (folder / "result.npz").is_file()
    p = run_cli("run", cfg, "--out", tmp_path / "o", "--no-progress", "--set", "roi=null",
                "--set", "rois=[[0, 0, 8], [8, 8, 8]]")
    assert p.returncode == 0, p.stderr
    assert not (folder / "result.npz").exists() and (folder / "rois.json").is_file()
    assert run_cli("run", cfg, "--out", tmp_path / "o", "--no-progress").returncode == 0
    assert not (folder / "rois.json").exists() and not list(folder.glob("roi_*"))


@pytest.mark.parametrize("args,match", [
    (["bogus"], "invalid choice: 'bogus'"),
    (["run", "c.yml"], "the following arguments are required: --out"),
])
def test_usage_mistakes_are_one_line(args, match):
    p = run_cli(*args)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and match in p.stderr, p.stderr


def test_config_keys_that_are_not_names_and_out_that_is_a_file(tmp_path, rng):
    img = write_png(tmp_path / "im.png", rng)
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"task: SR\nmodel: bicubic\nimages: [{img}]\nroi: [0, 0, 8]\n1: 2\n")
    assert "config keys must be names (text), got 1" in one_error_line(run_cli("run", cfg, "--out", tmp_path / "o"))
    (tmp_path / "afile").write_text("x")
    p = run_cli("run", sr_config(tmp_path, [img]), "--out", tmp_path / "afile")
    assert "afile' is a file, expected a folder" in one_error_line(p)


def test_a_pipe_among_the_patches_or_the_cache_does_not_block_the_run(tmp_path, rng, image):
    folder = tmp_path / "patches"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(rng.randint(0, 256, (8, 8, 3)).astype(np.uint8)).save(folder / f"p{i}.png")
    os.mkfifo(folder / "b.png")
    bank = cem_fast.load_patch_bank(folder)  # would block forever reading the pipe
    assert len(bank) == 4
    args = dict(task="identity", roi=(8, 8, 8), coarse=2, fine=1, patches=bank, cache=tmp_path / "cache")
    first = cem_fast.causal_effect_map(OutOfPlace(), image, **args)
    chunk = sorted((tmp_path / "cache").rglob("coarse/*.npz"))[0]
    chunk.unlink()
    os.mkfifo(chunk)
    res = cem_fast.causal_effect_map(OutOfPlace(), image, **args)
    assert "not a regular file" in res.extra["cache_dropped_chunks"][0]
    assert np.array_equal(res.effect, first.effect)
