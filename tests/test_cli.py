"""The CLI as a user runs it: outputs exist and load, the report links only existing files, errors are one line."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLI = [sys.executable, "-m", "cem_fast.cli"]
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run(*args, cwd=None):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env=ENV)


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


def test_the_run_line_names_how_interventions_ran():
    from cem_fast.cli import _locality_note
    base = {"active": True, "skipped_blocks": 12, "crop": [0, 0, 40, 40]}
    assert _locality_note(base) == " (locality: 12 blocks skipped, crop 40x40 input px, verified)"
    assert "recomputed layer by layer" in _locality_note({**base, "incremental": {"used": True},
                                                          "windows": {"used": True}})
    assert "each intervention on its own window" in _locality_note({**base, "incremental": {"used": False},
                                                                    "windows": {"used": True}})


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

def test_folder_names_keep_letters_of_any_script_and_stay_safe():
    from cem_fast.cli import _safe_name, image_labels
    folders, labels = image_labels(["/a/ïmg_😀.png", "/b/ïmg_😁.png", "/c/日本語 テスト.png", "/d/नमस्ते.png",
                                    "/e/😀.png", "/f/i\u0308mg_2.jpg", "/g/a\u202eb.png", "/h/.hidden.png"])
    assert folders == ["ïmg", "ïmg_2", "日本語_テスト", "नमस्ते", "image", "ïmg_2_2", "a_b", "hidden"]
    assert labels[:2] == ["ïmg_😀.png", "ïmg_😁.png"]  # the report tells them apart by their names
    assert _safe_name("ä" * 300).encode() == ("ä" * 100).encode()  # at most 200 bytes: a file name may hold 255
    assert _safe_name("report.html") == "report.html_" and _safe_name("..") == "run"
    from cem_fast.cli import OUR_TEMPORARY  # what a killed compare leaves under such a name is cleaned up
    assert OUR_TEMPORARY.match(".ïmg_cem.png.tmp12") and not OUR_TEMPORARY.match(".ïmg.png.tmp12")


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
