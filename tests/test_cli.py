"""The CLI as a user runs it: outputs exist and load, the report links only existing files, errors are one line. And
against adversarial inputs: no code runs from a model or config file without the user's word, every run has a
folder of its own, one failure does not stop the other runs, earlier results are replaced only by complete new ones,
a model with NaN outputs or that calls sys.exit fails its run with one clear line."""
import json
import re
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
from helpers import CLI, CLI_ENV as ENV, crafted_pt2, one_error_line, run_cli as run, strict_json, write_png, x4_config


@pytest.fixture
def sr_config(tmp_path, demo2):
    Image.fromarray(demo2[96:160, 64:128]).save(tmp_path / "img_7.png")  # 64x64
    cfg = tmp_path / "sr.yml"
    cfg.write_text(f"""# reference keys
task: SR
sr: 4
model: bicubic
TextImg_path: {tmp_path}
Imagelist: [img_7.png]
h: 24
w: 16
ROI_size: 16
mask_block_size: 8
coarse_num: 3
fine_num: 6
tol: 0.01
""")
    return cfg


def report_links(report: Path) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', report.read_text())


def test_run_writes_results_and_a_report(sr_config, tmp_path):
    out = tmp_path / "out"
    p = run("run", sr_config, "--out", out, "--set", "models=[bicubic, 'torch.nn:Identity']", "--set", "task=SR")
    # Identity is not an x4 model: that run fails with a one-line error, the other completes
    assert p.returncode == 1, p.stderr
    assert "Identity on img_7.png: model Identity output must be (1, 3, 64, 64)" in p.stderr
    assert "Traceback" not in p.stderr
    res_dir = out / "bicubic_x4" / "img_7"
    z = np.load(res_dir / "result.npz")
    assert z["cem"].shape == (8, 8) and z["samples_coarse"].shape == (8, 8, 3)
    assert z["samples_fine"].shape == (8, 8, 6)
    assert np.isnan(z["samples_fine"][~z["gated"]]).all() and not np.isnan(z["samples_fine"][z["gated"]]).any()
    assert np.isfinite(z["psnr_origin"])
    s = json.loads((res_dir / "summary.json").read_text())
    assert s["roi"] == {"y": 24, "x": 16, "height": 16, "width": 16}
    assert s["stats"]["positive"] + s["stats"]["negative"] + s["stats"]["zero"] == 64 - s["stats"]["roi_blocks"]
    reach = z["reachable"]
    assert s["locality"]["active"] and s["stats"]["skipped"] == (~reach).sum() > 0  # bicubic is local
    assert np.all(z["cem"][~reach] == 0)
    # Y(I) on the whole input, on the crop and on the crop again at the end, 3 coarse draws per reachable block,
    # 6 per gated one
    assert s["num_forwards"] == 3 + 3 * reach.sum() + 6 * s["stats"]["gated"] and s["config"]["sr"] == 4
    for name in ("cem.png", "overlay.png", "pie.png", "input.png", "output.png", "gt.png"):
        Image.open(res_dir / name).verify()
    report = out / "report.html"
    links = report_links(report)
    assert any(link.endswith("cem.png") for link in links)
    for link in links:
        assert (out / link).is_file(), link
    assert "failed: model Identity output" in report.read_text()


def test_many_rois_write_one_folder_each_and_a_sheet(tmp_path, demo2):
    Image.fromarray(demo2[96:160, 64:128]).save(tmp_path / "im.png")
    cfg = tmp_path / "multi.yml"
    cfg.write_text(f"task: SR\nscale: 4\nmodel: bicubic\nimages: [{tmp_path / 'im.png'}]\n"
                   "rois: [[24, 16, 16], [40, 40, 8]]\ncoarse: 2\nfine: 3\n")
    out = tmp_path / "out"
    p = run("run", cfg, "--out", out)
    assert p.returncode == 0, p.stderr
    assert "2 ROIs from" in p.stderr and "locality:" in p.stderr
    folder = out / "bicubic_x4" / "im"
    idx = json.loads((folder / "rois.json").read_text())
    assert [e["roi"]["y"] for e in idx["rois"]] == [24, 40]
    for e in idx["rois"]:
        assert np.load(folder / e["folder"] / "result.npz")["cem"].shape == (8, 8)
    Image.open(folder / "maps.png").verify()
    links = report_links(out / "report.html")
    assert "bicubic_x4/im/maps.png" in links
    for link in links:
        assert (out / link).is_file(), link


def test_exact_flag_turns_locality_off(sr_config, tmp_path):
    out = tmp_path / "out"
    p = run("run", sr_config, "--out", out, "--exact", "--set", "fine_num=2")
    assert p.returncode == 0, p.stderr
    s = json.loads((out / "bicubic_x4" / "img_7" / "summary.json").read_text())
    assert s["locality"]["mode"] == "off" and not s["locality"]["active"] and s["precision"] == "fp32"
    assert s["num_forwards"] == 2 + 64 * 3 + 2 * s["stats"]["gated"]  # Y(I) at the start and at the end


def test_unknown_key_suggests_the_closest(sr_config, tmp_path):
    p = run("run", sr_config, "--out", tmp_path / "o", "--set", "fine_nun=3")
    assert p.returncode == 2
    assert p.stderr.strip() == "cem-fast: error: unknown config key 'fine_nun' (did you mean 'fine_num'?)"


@pytest.mark.parametrize("override,match", [
    ("images=[/no/such.png]", "does not exist"),
    ("roi=[60, 60, 16]", "must lie inside the 64x64 output"),
    ("mask_block_size=6", "multiple of the scale"),
    ("coarse_num=-1", "coarse must be a positive integer"),
    ("task=XX", "task must be SR, DN, DR or identity"),
    ("rois=[[0, 0, 8]]", "config must give one of roi, rois, roi_grid, got roi, rois"),
    ("locality=fast", "locality must be one of auto, off, got 'fast'"),
    ("precision=fp8", "precision must be one of fp32, tf32, bf16, fp16, got 'fp8'"),
    ("input_noise=philox", "input_noise must be one of numpy, counter, got 'philox'"),
])
def test_bad_inputs_are_one_line_errors(sr_config, tmp_path, override, match):
    p = run("run", sr_config, "--out", tmp_path / "o", "--set", override)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert match in p.stderr, p.stderr
    assert len([line for line in p.stderr.splitlines() if "error" in line]) == 1


def test_missing_config_and_debug_traceback(tmp_path):
    p = run("run", tmp_path / "none.yml", "--out", tmp_path)
    assert p.returncode == 2 and p.stderr.strip() == f"cem-fast: error: config '{tmp_path / 'none.yml'}' does not exist"
    p = run("--debug", "run", tmp_path / "none.yml", "--out", tmp_path)
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_info_lists_backends():
    p = run("info")
    assert p.returncode == 0
    assert "torch   cpu   available" in p.stdout and "cuda" in p.stdout


@pytest.mark.slow
def test_demo_runs_offline_and_says_where(tmp_path):
    p = run("demo", "--out", tmp_path / "demo", "--fine", "5", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    report = tmp_path / "demo" / "report.html"
    assert str(report) in p.stdout and report.is_file()
    for link in report_links(report):
        assert (report.parent / link).is_file(), link


def test_crop_key_runs_on_a_crop_of_the_image(sr_config, tmp_path):
    out = tmp_path / "o"
    p = run("run", sr_config, "--out", out, "--set", "crop=[0, 0, 32, 48]", "--set", "roi=[8, 8, 8]")
    assert p.returncode == 0, p.stderr
    z = np.load(out / "bicubic_x4" / "img_7" / "result.npz")
    assert z["cem"].shape == (6, 4)  # 48 rows x 32 columns, 8-px blocks
    p = run("run", sr_config, "--out", out, "--set", "crop=[0, 0, 200, 48]")
    assert p.returncode == 1 and "crop [0, 0, 200, 48] must lie inside the 64x64 image" in p.stderr


@pytest.mark.slow
def test_cli_reproduces_the_sr_golden_configuration(tmp_path, shared):
    from helpers import assert_agrees
    root = Path(__file__).resolve().parents[1]
    if not (root.parent / "shared" / "data").is_dir():
        pytest.skip("configs/golden_sr_bicubic_demo2.yml names ../../shared/data: shared/data beside the repository")
    out = tmp_path / "golden"
    p = run("run", root / "configs" / "golden_sr_bicubic_demo2.yml", "--out", out, "--no-progress", cwd=tmp_path)
    assert p.returncode == 0, p.stderr

    class Loaded:  # the parts of a CEMResult that assert_agrees reads, from result.npz
        z = np.load(out / "bicubic_x4" / "demo_2" / "result.npz")
        cem, psnr_origin = z["cem"], float(z["psnr_origin"])
        roi_mask = np.zeros_like(cem, dtype=bool)
        roi_mask[19:23, 12:16] = True  # ROI (152, 96, 32) = blocks rows 19-22, cols 12-15

    assert_agrees(Loaded, shared / "golden" / "sr_bicubic_demo2_cpu")


def test_compare_writes_side_by_side_and_difference_maps(sr_config, tmp_path):
    out = tmp_path / "cmp"
    p = run("compare", sr_config, "--out", out, "--no-progress",
            "--set", "models=[bicubic, 'cem_fast.models:Bicubic', 'model_factories:make']")
    assert p.returncode == 0, p.stderr
    html = (out / "compare.html").read_text()
    for link in report_links(out / "compare.html"):
        assert (out / link).is_file(), link
    assert "paired differences" in html
    same = np.load(out / "compare" / "img_7" / "Bicubic_vs_bicubic_x4" / "diff.npz")
    assert np.array_equal(same["diff"], np.zeros((8, 8))) and not same["significant"].any()
    other = np.load(out / "compare" / "img_7" / "make_vs_bicubic_x4" / "diff.npz")
    assert np.abs(other["diff"]).max() > 0.01
    for name in ("bicubic_x4", "Bicubic", "make"):  # every map again on one shared scale
        assert f"compare/img_7/{name}_cem.png" in report_links(out / "compare.html")
    assert "significant blocks (|diff| &ge; tol" in html and "max |diff| outside the ROI" in html


def test_plot_scale_key_sets_the_pictures_scale(sr_config, tmp_path):
    out = tmp_path / "o"
    p = run("run", sr_config, "--out", out, "--set", "plot_scale=0.5", "--set", "fine_num=2")
    assert p.returncode == 0, p.stderr
    s = json.loads((out / "bicubic_x4" / "img_7" / "summary.json").read_text())
    assert s["display_scale"] == {"kind": "fixed", "bound_db": 0.5, "gamma": 1.0}
    assert "&plusmn;0.5 dB (fixed)" in (out / "report.html").read_text()


def test_compare_needs_two_models(sr_config, tmp_path):
    p = run("compare", sr_config, "--out", tmp_path / "c")
    assert p.returncode == 2 and "compare needs at least two models in the config, got 1" in p.stderr


def test_model_options_wrap_every_model(tmp_path, demo2):
    Image.fromarray(demo2[:32, :32]).save(tmp_path / "im.png")
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"task: DN\nsigma: 25\nmodel: model_factories:make_fdncnn\nimages: [{tmp_path / 'im.png'}]\n"
                   "roi: [8, 8, 8]\nfine: 2\nmodel_options: {noise_level: 25, pad_multiple: 16}\n")
    p = run("run", cfg, "--out", tmp_path / "o", "--no-progress")
    assert p.returncode == 0, p.stderr
    p = run("run", cfg, "--out", tmp_path / "o2", "--set", "model_options={noise: 3}")
    assert p.returncode == 2 and "model_options: unknown key(s) ['noise']" in p.stderr


def test_a_folder_of_checkpoints_is_compared(tmp_path, demo2):
    import torch
    from cem_fast.models import DnCNN
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for i, width in enumerate((4, 6)):
        torch.manual_seed(i)
        torch.save({"params": DnCNN(3, width, 3).state_dict()}, folder / f"dncnn_{width}.pth")
    Image.fromarray(demo2[:24, :24]).save(tmp_path / "im.png")
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"task: DN\nmodels: [{folder}]\nimages: [{tmp_path / 'im.png'}]\nroi: [8, 8, 8]\nfine: 2\n")
    p = run("compare", cfg, "--out", tmp_path / "o", "--no-progress")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "o" / "compare" / "im" / "dncnn_6_vs_dncnn_4" / "diff.png").is_file()
    (folder / "dncnn_4.pth").unlink()
    (folder / "dncnn_6.pth").unlink()
    p = run("compare", cfg, "--out", tmp_path / "o")
    assert p.returncode == 2 and "holds no checkpoints" in p.stderr


def test_backend_is_selectable_from_the_cli(sr_config, tmp_path):
    samples = {}
    for backend in ("torch", "cpp"):
        p = run("run", sr_config, "--out", tmp_path / backend, "--set", f"backend={backend}", "--set", "task=DN",
                "--set", "model=default", "--set", "fine_num=2")
        if backend == "cpp" and "cem_fast._C is not built" in p.stderr:
            pytest.skip("cem_fast._C is not built here")
        assert p.returncode == 0, p.stderr
        res = tmp_path / backend / "default_denoiser" / "img_7"
        assert json.loads((res / "summary.json").read_text())["backend"] == backend
        samples[backend] = np.load(res / "result.npz")["samples_coarse"]
    np.testing.assert_array_equal(samples["torch"], samples["cpp"])


def test_version_and_bare_command_show_what_it_is():
    import cem_fast
    p = run("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"cem-fast {cem_fast.__version__}"
    p = run()
    assert p.returncode == 0 and "usage: cem-fast" in p.stdout and "run" in p.stdout and not p.stderr


# ---- paths in a config: relative to the config's folder; what cannot be opened says why, with the full path ----

def _same_files_in(*folders: Path) -> None:
    for folder in folders:
        (folder / "nets").mkdir(parents=True)
        (folder / "bank").mkdir()
        (folder / "im.png").write_bytes(b"")
        (folder / "nets" / "net.pth").write_bytes(b"")


def test_relative_paths_resolve_against_the_config_folder_and_set_values_against_the_current(tmp_path,
                                                                                              monkeypatch):
    from cem_fast.config import load_config
    here, there = tmp_path / "cwd", tmp_path / "cfgs"
    _same_files_in(here, there)  # the same names in both folders: the config's folder wins, not the first found
    (there / "c.yml").write_text("model: nets/net.pth\nimages: [im.png]\npatches: bank\nroi: [0, 0, 8]\n")
    (there / "ref.yml").write_text("Modellist: [nets, default, 'torch.nn:Identity', 'spandrel:nets/net.pth']\n"
                                   "TextImg_path: .\nImagelist: [im.png]\npatch_path: bank\nroi: [0, 0, 8]\n")
    monkeypatch.chdir(here)
    c = load_config("../cfgs/c.yml")
    assert c.images == [str(there / "im.png")] and c.models == [str(there / "nets" / "net.pth")]
    assert c.options["patches"] == str(there / "bank")
    c = load_config("../cfgs/ref.yml")
    assert c.images == [str(there / "im.png")] and c.options["patches"] == str(there / "bank")
    assert c.models == [str(there / "nets" / "net.pth"), "default", "torch.nn:Identity",
                        f"spandrel:{there / 'nets' / 'net.pth'}"]
    c = load_config("../cfgs/c.yml", ["images=[im.png]", "model=nets/net.pth", "patches=bank"])
    assert c.images == [str(here / "im.png")] and c.models == [str(here / "nets" / "net.pth")]
    assert c.options["patches"] == str(here / "bank")


def test_a_missing_model_file_says_no_such_file_with_its_resolved_path(tmp_path, monkeypatch, capsys):
    from cem_fast.cli import main
    (tmp_path / "cfgs").mkdir()
    cfg = tmp_path / "cfgs" / "c.yml"
    cfg.write_text("model: nets/missing.pth\nimages: [im.png]\nroi: [0, 0, 8]\n")
    monkeypatch.chdir(tmp_path)
    assert main(["run", "cfgs/c.yml", "--out", "o", "--no-progress"]) == 1
    errors = capsys.readouterr().err.splitlines()
    assert errors == [f"cem-fast: error: model: no such file: {tmp_path / 'cfgs' / 'nets' / 'missing.pth'}"]


def test_symlink_loops_and_missing_files_say_what_they_are(tmp_path, monkeypatch):
    from cem_fast.config import load_config
    from cem_fast.images import load_image
    from cem_fast.models import load_model
    for name in ("loop.yml", "loop.pth", "loop.png"):
        (tmp_path / name).symlink_to(tmp_path / name)
    (tmp_path / "gone.pth").symlink_to(tmp_path / "nowhere.pth")
    monkeypatch.chdir(tmp_path)
    loop = re.escape(f"config '{tmp_path / 'loop.yml'}' is a symlink loop (cannot be resolved)")
    with pytest.raises(ValueError, match=f"^{loop}$"):
        load_config("loop.yml")
    with pytest.raises(ValueError, match=f"^config '{tmp_path / 'none.yml'}' does not exist$"):
        load_config("none.yml")
    with pytest.raises(ValueError, match=f"^model '{tmp_path / 'loop.pth'}' is a symlink loop"):
        load_model("loop.pth")
    with pytest.raises(ValueError, match=f"^model '{tmp_path / 'gone.pth'}' is a broken symlink \\(to "):
        load_model("gone.pth")
    with pytest.raises(ValueError, match=f"^model: no such file: {tmp_path / 'nets' / 'none.pth'}$"):
        load_model("nets/none.pth")
    with pytest.raises(ValueError, match="^model 'DnCNN' is not a file, 'bicubic"):  # a name, not a path
        load_model("DnCNN")
    with pytest.raises(ValueError, match=f"^image '{tmp_path / 'loop.png'}' is a symlink loop"):
        load_image(tmp_path / "loop.png")


# ---- folder names keep the letters of any script -------------------------------------------------------------

def test_an_image_with_a_unicode_name_gets_a_readable_folder(sr_config, tmp_path):
    Image.open(tmp_path / "img_7.png").save(tmp_path / "ïmg_😀.png")
    out = tmp_path / "o"
    p = run("run", sr_config, "--out", out, "--no-progress", "--set", "Imagelist=[ïmg_😀.png]", "--set", "fine_num=1")
    assert p.returncode == 0, p.stderr
    s = json.loads((out / "bicubic_x4" / "ïmg" / "summary.json").read_text(encoding="utf-8"))
    assert s["image_path"] == str(tmp_path / "ïmg_😀.png")
    assert "bicubic_x4/ïmg/cem.png" in report_links(out / "report.html")


# ---- own models from the CLI: pkg.module:factory beside the config or in the current folder --------------------

OWN_MODEL = """
import torch


class Sharpen(torch.nn.Module):
    def forward(self, x):
        return (x + 0.1 * (x - torch.nn.functional.avg_pool2d(x, 3, 1, 1))).clamp(0, 1)


def factory():
    return Sharpen()
"""


def tiny_png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    return path


def own_model_config(folder: Path, module: str) -> Path:
    tiny_png(folder / "im.png")
    cfg = folder / "c.yml"
    cfg.write_text(f"task: DN\nsigma: 25\nmodel: {module}:factory\nimages: [im.png]\nroi: [4, 4, 8]\nblock: 8\n"
                   "fine: 2\nlocality: off\n")
    return cfg


def console_script() -> Path:
    script = Path(sys.executable).parent / "cem-fast"
    if not script.is_file():
        pytest.skip(f"no cem-fast console script beside {sys.executable} (cem_fast not installed in this venv)")
    return script


@pytest.mark.parametrize("where,found_in", [("beside", "config folder"), ("cwd", "current folder")])
def test_a_factory_module_is_found_beside_the_config_or_in_the_current_folder(tmp_path, where, found_in):
    """Run by the console script, as a user runs it: neither folder is on its sys.path."""
    cfg = own_model_config(tmp_path / "study", f"mymodels_{where}")
    (tmp_path / "work").mkdir()
    module = (tmp_path / ("study" if where == "beside" else "work") / f"mymodels_{where}.py")
    module.write_text(OWN_MODEL)
    p = subprocess.run([console_script(), "run", cfg, "--out", tmp_path / "o", "--no-progress"], capture_output=True,
                       text=True, cwd=tmp_path / "work", timeout=600, env=ENV)
    assert p.returncode == 0, p.stderr
    s = json.loads((tmp_path / "o" / "factory" / "im" / "summary.json").read_text())
    assert s["model_module_path"] == str(module.resolve())
    assert s["model_module_found_in"] == found_in


def test_a_factory_module_that_is_nowhere_says_how_to_make_it_found(tmp_path):
    cfg = own_model_config(tmp_path / "study", "mymodels_nowhere")
    p = run("run", cfg, "--out", tmp_path / "o", "--no-progress", cwd=tmp_path)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("cem-fast: error:")][0]
    assert "no module 'mymodels_nowhere'" in line and str(tmp_path / "study") in line
    assert "put mymodels_nowhere.py beside the config file" in line and "PYTHONPATH" in line


def test_no_report_when_every_run_failed(tmp_path):
    cfg = own_model_config(tmp_path, "mymodels_report")
    (tmp_path / "mymodels_report.py").write_text(OWN_MODEL)
    p = run("run", cfg, "--out", tmp_path / "o", "--no-progress")
    assert p.returncode == 0 and (tmp_path / "o" / "report.html").is_file(), p.stderr
    # the only run fails: no page of error lines, and the earlier page (its results are gone) is removed
    p = run("run", cfg, "--out", tmp_path / "o", "--no-progress", "--set", "model=no_such_module_xyz:factory")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "o" / "report.html").exists()
    assert "report:" not in p.stdout and len(p.stderr.strip().splitlines()) == 1  # the error line alone
    assert "no_such_module_xyz" in json.loads((tmp_path / "o" / "factory" / "im" / "error.json").read_text())["error"]


# ---- adversarial inputs (issue 11): no code runs from a model or config file without the user's word -----------------

def test_cli_refuses_a_pt2_in_a_model_folder_and_runs_the_other_models(tmp_path, rng):
    marker = tmp_path / "pwned"
    models = tmp_path / "models"
    models.mkdir()
    crafted_pt2(models / "evil.pt2", marker)
    torch.save({"weight": torch.zeros(1)}, models / "junk.pth")  # a checkpoint of an unknown architecture
    img = write_png(tmp_path / "im.png", rng)
    cfg = x4_config(tmp_path, [img], models=[str(models), "bicubic"], task="SR")
    cfg.write_text(cfg.read_text().replace('"model": "bicubic", ', ""))
    p = run("run", cfg, "--out", tmp_path / "o", "--no-progress")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert not marker.exists()
    assert "evil.pt2' is a torch.export program" in p.stderr and "--trust-model" in p.stderr
    assert "Fallback to weights_only=False" not in p.stderr  # torch's own logger stayed quiet
    assert (tmp_path / "o" / "bicubic_x4" / "im" / "result.npz").is_file()
    report = (tmp_path / "o" / "report.html").read_text()
    assert report.count("failed: ") == 2 and "evil" in report and "junk" in report


def test_trusting_a_crafted_pt2_is_one_line_without_a_logged_traceback(tmp_path, rng):
    evil = crafted_pt2(tmp_path / "evil.pt2", tmp_path / "pwned")
    cfg = x4_config(tmp_path, [write_png(tmp_path / "im.png", rng)], model=str(evil))
    p = run("run", cfg, "--out", tmp_path / "o", "--no-progress", "--trust-model")
    assert "is not a readable torch.export program" in one_error_line(p)


def test_config_tags_that_build_python_objects_are_refused(tmp_path, rng):
    marker = tmp_path / "pwned"
    img = write_png(tmp_path / "im.png", rng)
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"task: SR\nmodel: !!python/object/apply:builtins.open ['{marker}', 'w']\n"
                   f"images: [{img}]\nroi: [0, 0, 8]\n")
    p = run("run", cfg, "--out", tmp_path / "o")
    assert "is not valid YAML" in one_error_line(p) and not marker.exists()


# ---- every run has a folder of its own -------------------------------------------------------------------------------

def test_images_with_one_name_or_one_safe_name_get_their_own_folders(tmp_path, rng):
    paths = [write_png(tmp_path / "A" / "img.png", rng), write_png(tmp_path / "B" / "img.png", rng),
             write_png(tmp_path / "a b.png", rng), write_png(tmp_path / "a_b.png", rng)]
    p = run("run", x4_config(tmp_path, paths), "--out", tmp_path / "o", "--no-progress")
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


def test_names_never_leave_the_output_folder_or_take_the_reports_name(tmp_path, rng):
    img = write_png(tmp_path / "x.png", rng).rename(tmp_path / "...png")  # its stem is '..'
    sd = cem_fast.models.default_model("dn").state_dict()
    (tmp_path / "m").mkdir()
    torch.save(sd, tmp_path / "m" / "...pth")
    torch.save(sd, tmp_path / "m" / "report.html.pth")
    cfg = x4_config(tmp_path, [img], task="DN", models=[str(tmp_path / "m" / "...pth"),
                                                        str(tmp_path / "m" / "report.html.pth")])
    cfg.write_text(cfg.read_text().replace('"model": "bicubic", ', ""))
    (tmp_path / "o").mkdir()
    before = set(tmp_path.iterdir())
    p = run("run", cfg, "--out", tmp_path / "o", "--no-progress")
    assert p.returncode == 0, p.stderr
    assert set(tmp_path.iterdir()) == before  # nothing written beside the output folder
    assert (tmp_path / "o" / "report.html").is_file()
    runs = sorted(str(f.parent.relative_to(tmp_path / "o")) for f in (tmp_path / "o").rglob("result.npz"))
    assert runs == ["model/image", "report.html_/image"], runs


def test_switching_between_roi_and_rois_leaves_no_stale_files(tmp_path, rng):
    cfg = x4_config(tmp_path, [write_png(tmp_path / "im.png", rng)])
    folder = tmp_path / "o" / "bicubic_x4" / "im"
    assert run("run", cfg, "--out", tmp_path / "o", "--no-progress").returncode == 0
    assert (folder / "result.npz").is_file()
    p = run("run", cfg, "--out", tmp_path / "o", "--no-progress", "--set", "roi=null",
                "--set", "rois=[[0, 0, 8], [8, 8, 8]]")
    assert p.returncode == 0, p.stderr
    assert not (folder / "result.npz").exists() and (folder / "rois.json").is_file()
    assert run("run", cfg, "--out", tmp_path / "o", "--no-progress").returncode == 0
    assert not (folder / "rois.json").exists() and not list(folder.glob("roi_*"))


# ---- one failure does not stop the other runs ------------------------------------------------------------------------

def test_failures_of_any_kind_each_get_a_row_and_the_rest_run(tmp_path, rng, monkeypatch, capsys):
    images = [write_png(tmp_path / "one.png", rng), write_png(tmp_path / "two.png", rng)]
    cfg = x4_config(tmp_path, images, models=["model_factories:raising_factory", str(tmp_path / "missing.pth"),
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


def test_a_model_that_calls_sys_exit_fails_its_run_only(tmp_path, rng):
    cfg = x4_config(tmp_path, [write_png(tmp_path / "im.png", rng)], models=["model_factories:make_exit_3", "bicubic"])
    cfg.write_text(cfg.read_text().replace('"model": "bicubic", ', ""))
    p = run("run", cfg, "--out", tmp_path / "o", "--no-progress")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert (tmp_path / "o" / "bicubic_x4" / "im" / "result.npz").is_file()
    assert "failed: " in (tmp_path / "o" / "report.html").read_text()


# ---- results replaced only by complete new ones; temporaries and staging folders -------------------------------------

def test_a_failed_rerun_does_not_leave_the_previous_result_in_place(tmp_path, rng):
    img = write_png(tmp_path / "im.png", rng)
    cfg = x4_config(tmp_path, [img])
    assert run("run", cfg, "--out", tmp_path / "o", "--no-progress").returncode == 0
    folder = tmp_path / "o" / "bicubic_x4" / "im"
    assert (folder / "result.npz").is_file()
    (tmp_path / "empty").mkdir()
    p = run("run", cfg, "--out", tmp_path / "o", "--no-progress", "--set", f"patches={tmp_path / 'empty'}")
    assert "holds no images" in one_error_line(p)
    assert not (folder / "result.npz").exists() and not (folder / "summary.json").exists()
    assert "holds no images" in strict_json(folder / "error.json")["error"]
    assert run("run", cfg, "--out", tmp_path / "o", "--no-progress").returncode == 0
    assert (folder / "result.npz").is_file() and not (folder / "error.json").exists()


def test_temporary_files_of_a_killed_run_are_cleaned(tmp_path, rng):
    img = write_png(tmp_path / "im.png", rng)
    stale = tmp_path / "o" / "bicubic_x4" / "im" / ".result.npz.tmp999999999"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a file")
    assert run("run", x4_config(tmp_path, [img]), "--out", tmp_path / "o", "--no-progress").returncode == 0
    assert not stale.exists()
    assert not list((tmp_path / "o").rglob("*.tmp*"))


def test_a_users_own_temporary_files_under_out_are_left_alone(tmp_path, rng):
    mine = tmp_path / "o" / "docs" / ".thesis.tex.tmp99999"
    mine.parent.mkdir(parents=True)
    mine.write_text("my thesis")
    assert run("run", x4_config(tmp_path, [write_png(tmp_path / "im.png", rng)]), "--out", tmp_path / "o",
                   "--no-progress").returncode == 0
    assert mine.read_text() == "my thesis"


def sr_run_config(tmp_path: Path, rng) -> Path:
    image = tmp_path / "im.png"
    Image.fromarray(rng.randint(0, 256, (16, 16, 3)).astype(np.uint8)).save(image)
    cfg = {"task": "SR", "scale": 4, "model": "bicubic", "images": [str(image)], "roi": [0, 0, 8], "coarse": 1,
           "fine": 1}
    path = tmp_path / "sr.yml"
    path.write_text(json.dumps(cfg))
    return path


def test_a_file_in_place_of_the_cache_folder_is_one_warning_and_the_run_goes_on(tmp_path, rng):
    cfg, out = sr_run_config(tmp_path, rng), tmp_path / "o"
    assert run("run", cfg, "--out", out, "--no-progress").returncode == 0
    folder = out / "bicubic_x4" / "im"
    first = json.loads((folder / "summary.json").read_text())
    (out / ".cem_cache").rename(tmp_path / "old_cache")
    (out / ".cem_cache").write_text("not a folder")
    p = run("run", cfg, "--out", out, "--no-progress", "--set", "seed=1")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    warnings = [ln for ln in p.stderr.splitlines() if "warning" in ln.lower()]
    assert len(warnings) == 1 and "sample cache" in warnings[0] and "cannot be used" in warnings[0], p.stderr
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["seed"] == 1 and first["seed"] == 0  # the new results replaced the earlier ones
    assert "cannot be used" in summary["cache_note"] and "cache_entry" not in summary
    assert all((folder / f).is_file() for f in RESULT_FILES) and not (folder / "error.json").exists()


def test_an_interrupted_save_leaves_the_earlier_results_as_they_were(tmp_path, rng, monkeypatch, capsys):
    from cem_fast import plotting
    cfg, out = sr_run_config(tmp_path, rng), tmp_path / "o"
    assert cli.main(["run", str(cfg), "--out", str(out), "--no-progress"]) == 0
    folder = out / "bicubic_x4" / "im"
    before = {f.name: f.read_bytes() for f in folder.iterdir()}

    def interrupted(*a, **k):
        raise KeyboardInterrupt  # Ctrl-C while the pictures are written, after result.npz and summary.json

    monkeypatch.setattr(plotting, "save_pictures", interrupted)
    assert cli.main(["run", str(cfg), "--out", str(out), "--no-progress", "--set", "seed=1"]) == 130
    assert {f.name: f.read_bytes() for f in folder.iterdir()} == before
    assert [p.name for p in folder.parent.iterdir()] == ["im"]  # no staging folder left


def test_a_staging_folder_of_a_killed_run_is_removed_and_no_one_elses(tmp_path, rng):
    cfg, out = sr_run_config(tmp_path, rng), tmp_path / "o"
    stale = out / "bicubic_x4" / ".im.staging999999999"
    stale.mkdir(parents=True)
    (stale / "result.npz").write_bytes(b"half a run")
    mine = out / "bicubic_x4" / ".my_notes"
    mine.mkdir()
    assert run("run", cfg, "--out", out, "--no-progress").returncode == 0
    assert not stale.exists() and mine.is_dir()


# ---- models whose outputs are NaN or that call sys.exit --------------------------------------------------------------

RESULT_FILES = ("result.npz", "summary.json", "cem.png")


def dn_config(tmp_path: Path, image: Path, **extra) -> Path:
    cfg = {"task": "DN", "sigma": 25, "images": [str(image)], "roi": [16, 16, 8], **extra}
    path = tmp_path / "c.yml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def test_the_cli_fails_a_model_with_nan_outputs_and_writes_no_results(tmp_path, rng):
    cfg = dn_config(tmp_path, write_png(tmp_path / "im.png", rng, size=(48, 48)),
                    model="model_factories:make_nan_every_third")
    p = run("run", cfg, "--out", tmp_path / "o", "--no-progress")
    assert "NaN/Inf" in one_error_line(p) and p.returncode == 1
    folder = tmp_path / "o" / "make_nan_every_third" / "im"
    assert not any((folder / f).exists() for f in RESULT_FILES)
    assert "NaN/Inf" in json.loads((folder / "error.json").read_text())["error"]


def test_a_model_calling_sys_exit_is_one_clear_line(tmp_path, rng):
    cfg = dn_config(tmp_path, write_png(tmp_path / "im.png", rng, size=(48, 48)),
                    model="model_factories:make_exits", locality="off", batch_size=4)
    line = one_error_line(run("run", cfg, "--out", tmp_path / "o", "--no-progress"))
    assert line == ("cem-fast: error: make_exits on im.png: the model called sys.exit('usage: model.py [-h]') "
                    "during its forward pass")


# ---- every mistake is one line ---------------------------------------------------------------------------------------

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
    ("model=model_factories:raising_factory", "raising_factory() raised KeyError"),
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
    cfg = x4_config(tmp_path, [write_png(tmp_path / "im.png", rng)])
    p = run("run", cfg, "--out", tmp_path / "o", "--no-progress", "--set", override)
    assert match in one_error_line(p)


@pytest.mark.parametrize("setup,override,match", [
    ("empty_patches", "patches={tmp}/empty", "holds no images"),
    ("unknown_ckpt", "model={tmp}/unknown.pth", "unknown architecture"),
    ("corrupt_ckpt", "model={tmp}/corrupt.pth", "not a readable PyTorch checkpoint"),
    ("none", "sigma=0", "sigma must be a finite number in (0, 255], got 0"),
    ("none", "block=0", "block must be a positive"),
    ("none", "roi=[0, 0]", "roi must be (y, x, size) or (y, x, height, width)"),
    ("none", "crop=[1, 2]", "crop must be a PIL box"),
    ("none", "seed=1.5", "seed must be an integer"),
])
def test_cli_bad_inputs(tmp_path, rng, setup, override, match):
    Image.fromarray(rng.randint(0, 256, (16, 16, 3)).astype(np.uint8)).save(tmp_path / "im.png")
    (tmp_path / "empty").mkdir()
    torch.save({"foo.weight": torch.rand(2, 2)}, tmp_path / "unknown.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"\x00\x01 not a checkpoint")
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"task: DN\nmodel: default\nimages: [{tmp_path / 'im.png'}]\nroi: [0, 0, 8]\nfine: 1\n")
    p = run("run", cfg, "--out", tmp_path / "o", "--set", override.format(tmp=tmp_path))
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and match in errors[0], p.stderr


def test_patch_npz_missing_its_arrays_is_one_line(tmp_path, rng):
    np.savez(tmp_path / "bank.npz", other=np.zeros(3))
    cfg = x4_config(tmp_path, [write_png(tmp_path / "im.png", rng)], patches=str(tmp_path / "bank.npz"))
    assert "has no array 'patches'" in one_error_line(run("run", cfg, "--out", tmp_path / "o"))


def test_config_that_is_not_utf8_or_repeats_a_key(tmp_path, rng):
    img = write_png(tmp_path / "im.png", rng)
    bad = tmp_path / "latin1.yml"
    bad.write_bytes(f"task: SR\nmodel: bicubic\nimages: [{img}]\nroi: [0, 0, 8]\n# caf\xe9\n".encode("latin-1"))
    assert "latin1.yml' is not UTF-8 text" in one_error_line(run("run", bad, "--out", tmp_path / "o"))
    dup = tmp_path / "dup.yml"
    dup.write_text(f"task: SR\nmodel: bicubic\nimages: [{img}]\nroi: [0, 0, 8]\nroi: [8, 8, 8]\n")
    assert "key 'roi' is given twice (line 5)" in one_error_line(run("run", dup, "--out", tmp_path / "o"))


def test_unreadable_torchscript_names_the_file(tmp_path, rng):
    bad = tmp_path / "broken.pt"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("broken/code/__torch__.py", "this is not TorchScript")
    cfg = x4_config(tmp_path, [write_png(tmp_path / "im.png", rng)], model=str(bad))
    line = one_error_line(run("run", cfg, "--out", tmp_path / "o", "--trust-model"))
    assert "broken.pt' is not a readable TorchScript program" in line


def test_config_keys_that_are_not_names_and_out_that_is_a_file(tmp_path, rng):
    img = write_png(tmp_path / "im.png", rng)
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"task: SR\nmodel: bicubic\nimages: [{img}]\nroi: [0, 0, 8]\n1: 2\n")
    assert "config keys must be names (text), got 1" in one_error_line(run("run", cfg, "--out", tmp_path / "o"))
    (tmp_path / "afile").write_text("x")
    p = run("run", x4_config(tmp_path, [img]), "--out", tmp_path / "afile")
    assert "afile' is a file, expected a folder" in one_error_line(p)


@pytest.mark.parametrize("args,match", [
    (["bogus"], "invalid choice: 'bogus'"),
    (["run", "c.yml"], "the following arguments are required: --out"),
])
def test_usage_mistakes_are_one_line(args, match):
    p = run(*args)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and match in p.stderr, p.stderr


def test_unexpected_errors_are_one_line_too(monkeypatch, capsys):
    def boom(args):
        raise TypeError("\nsomething deep")  # an empty first line used to print a bare 'cem-fast: error: '

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["info"].set_defaults(func=boom)
    assert cli.main(["info"]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert err.startswith("cem-fast: error: TypeError: something deep") and err.count("\n") == 1


def _default_sigint() -> None:
    """In the child, before exec: SIGINT back to its default, so that Python installs its KeyboardInterrupt handler
    (a runner that ignores SIGINT, as a shell's background job does, would hand the child an ignored SIGINT)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_while_torch_loads_is_one_line(tmp_path, rng):
    cfg = x4_config(tmp_path, [write_png(tmp_path / "im.png", rng)])
    proc = subprocess.Popen(CLI + ["run", str(cfg), "--out", str(tmp_path / "o")], stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=ENV, preexec_fn=_default_sigint)
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


def _field_config(tmp_path, rng, **extra) -> Path:
    write_png(tmp_path / "small.png", rng, (64, 96))
    cfg = tmp_path / "field.yml"
    lines = {"model": "bicubic", "task": "SR", "scale": 4, "image": str(tmp_path / "small.png"), "tile": 32,
             "coarse": 2, "fine": 3, **extra}
    cfg.write_text("".join(f"{k}: {v}\n" for k, v in lines.items()))
    return cfg


def test_field_writes_its_metric_maps_and_report_and_resumes(tmp_path, rng):
    cfg = _field_config(tmp_path, rng)
    p = run("field", cfg, "--out", tmp_path / "out", "--no-progress")
    assert p.returncode == 0, p.stderr
    assert f"report: {tmp_path / 'out' / 'report.html'}" in p.stdout
    out = tmp_path / "out"
    meta = json.loads((out / "field.json").read_text())
    assert meta["status"] == "complete" and meta["shape"] == [2, 3]  # 64x96 output: 2 x 3 tiles of 32
    assert meta["info"]["chunks"]["computed"] == meta["info"]["chunks"]["count"] > 0
    with np.load(out / "metrics.npz") as z:
        assert z["radius90_px"].shape == (2, 3)
    assert all((out / link).is_file() for link in report_links(out / "report.html"))
    again = run("field", cfg, "--out", out, "--no-progress")
    assert again.returncode == 0, again.stderr
    chunks = json.loads((out / "field.json").read_text())["info"]["chunks"]
    assert chunks["computed"] == 0 and chunks["reused"] == chunks["count"]


@pytest.mark.parametrize("extra, match", [
    ({"roi": "[0, 0, 8]"}, "a field's ROIs are its tiles: give tile: SIZE, not roi"),
    ({"tile": 0}, "tile"),
    ({"images": "[a.png, b.png]"}, "one model and one image"),
])
def test_field_config_errors_are_one_line(tmp_path, rng, extra, match):
    cfg = _field_config(tmp_path, rng, **extra)
    if "images" in extra:
        text = cfg.read_text().replace(f"image: {tmp_path / 'small.png'}\n", "")
        for name in ("a.png", "b.png"):
            write_png(tmp_path / name, rng)
        cfg.write_text(text.replace("images: [a.png, b.png]", f"images: [{tmp_path / 'a.png'}, {tmp_path / 'b.png'}]"))
    assert re.search(match, one_error_line(run("field", cfg, "--out", tmp_path / "o")))


def test_a_field_folder_is_never_overwritten_by_another_field(tmp_path, rng):
    cfg = _field_config(tmp_path, rng)
    assert run("field", cfg, "--out", tmp_path / "out", "--no-progress").returncode == 0
    line = one_error_line(run("field", cfg, "--out", tmp_path / "out", "--set", "seed=5", "--no-progress"))
    assert "holds another field (its inputs differ in: seed)" in line
    assert run("field", cfg, "--out", tmp_path / "out", "--set", "seed=5", "--fresh",
               "--no-progress").returncode == 0
