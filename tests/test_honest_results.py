"""Honest results (issue 24, part 4): a model whose output is NaN or changes from call to call gives an error, not a
map; models with submodules in training mode run in eval mode for the run only, and the summary says so; a cache
chunk of another run is never reused; a cache that cannot be used is skipped, and earlier results are replaced
only by new ones; a model's sys.exit is one clear line. Small images, tiny models: fast."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cem_fast
from cem_fast.patches import PatchBank

CLI = [sys.executable, "-m", "cem_fast.cli"]
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
RESULT_FILES = ("result.npz", "summary.json", "cem.png")


def run_cli(*args):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=600, env=ENV)


def one_error_line(p) -> str:
    assert p.returncode != 0, p.stderr
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1, p.stderr
    return errors[0]


@pytest.fixture
def image(rng):
    return rng.randint(0, 256, (32, 32, 3)).astype(np.uint8)


@pytest.fixture
def bank(rng):
    # 256 patches: two draws of a block rarely paste the same patch (NaNOnRepeat must see the interventions once)
    return PatchBank(torch.from_numpy(rng.randint(0, 256, (256, 3, 8, 8)).astype(np.uint8)))


def box_blur(x: torch.Tensor) -> torch.Tensor:
    w = torch.full((x.shape[1], 1, 3, 3), 1 / 9, dtype=x.dtype, device=x.device)
    return F.conv2d(x, w, padding=1, groups=x.shape[1])


# ---- 1. a non-finite or non-reproducible Y(I) is an error, never a map -----------------------------------------

class NaNEveryThird(torch.nn.Module):
    """A 3x3 box blur that writes NaN into a patch of every third forward's output."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        y = box_blur(x)
        if self.calls % 3 == 0:
            y[..., 2:6, 2:6] = float("nan")
        return y


def make_nan_every_third():
    return NaNEveryThird()


class NaNOnRepeat(torch.nn.Module):
    """A box blur that gives NaN in a patch for a single input it has seen before: here, the unintervened crop,
    which locality verifies and the run then scores as Y(I) (the interventions are new inputs each)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def forward(self, x):
        y = box_blur(x)
        if x.shape[0] == 1:
            key = hashlib.sha256(x.contiguous().cpu().numpy().tobytes()).hexdigest()
            if key in self.seen:
                y[..., 2:5, 2:5] = float("nan")
            self.seen.add(key)
        return y


class Drifts(torch.nn.Module):
    """A box blur plus an offset that grows with every call (state kept between forwards)."""

    def __init__(self, step=1e-3):
        super().__init__()
        self.calls, self.step = 0, step

    def forward(self, x):
        self.calls += 1
        return box_blur(x) + self.step * self.calls


def small_run(model, image, bank, **kw):
    args = dict(task="identity", roi=(8, 8, 8), coarse=2, fine=2, patches=bank, **kw)
    return cem_fast.causal_effect_map(model, image, **args)


@pytest.mark.parametrize("windows", ["crop", "auto"])
def test_nan_in_the_unintervened_roi_is_an_error_not_an_all_zero_map(image, bank, windows):
    """Before: Y(I) = NaN made every effect NaN, the display threshold turned them into 0 and the run passed
    (windows="crop"), or the NaN base was blamed on the interventions (windows="auto")."""
    with pytest.raises(ValueError, match=r"^model NaNOnRepeat output has NaN/Inf values in ROI \(y=8, x=8, 8x8\) "
                                         r"on the unintervened input: Y\(I\).* is undefined$"):
        small_run(NaNOnRepeat(), image, bank, windows=windows)


@pytest.mark.parametrize("locality", ["auto", "off"])
def test_a_model_whose_output_changes_between_calls_is_refused(image, bank, locality):
    with pytest.raises(RuntimeError, match=r"^model Drifts is not deterministic: run again on the unintervened "
                                           r"input at the end of the run, its outputs in the ROIs differ by "):
        small_run(Drifts(), image, bank, locality=locality)


def test_a_deterministic_model_reproduces_y_of_i_exactly(image, bank):
    res = small_run(Drifts(step=0.0), image, bank)
    assert res.extra["origin_check"] == {"max_abs_diff": 0.0, "tolerance": 1e-4}


def test_nan_in_a_window_outside_the_changed_rectangle_is_still_the_models(image, bank):
    """A flaky model's NaN that falls in a ROI but outside the part an intervention changes is its output's all the
    same: reported, not composed away."""
    with pytest.raises(ValueError, match=r"NaNEveryThird produced NaN/Inf outputs in the ROI for \d+ coarse "
                                         r"interventions \(first: block \(\d+, \d+\), draw \d\)"):
        cem_fast.causal_effect_map(NaNEveryThird(), np.tile(image, (2, 2, 1))[:48, :48], task="DN", sigma=25,
                                   roi=(16, 16, 8), patches=bank)


def write_png(path: Path, rng, size=(48, 48)) -> Path:
    Image.fromarray(rng.randint(0, 256, (*size, 3)).astype(np.uint8)).save(path)
    return path


def config(tmp_path: Path, image: Path, **extra) -> Path:
    cfg = {"task": "DN", "sigma": 25, "images": [str(image)], "roi": [16, 16, 8], **extra}
    path = tmp_path / "c.yml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def test_the_cli_fails_a_model_with_nan_outputs_and_writes_no_results(tmp_path, rng):
    cfg = config(tmp_path, write_png(tmp_path / "im.png", rng), model="test_honest_results:make_nan_every_third")
    p = run_cli("run", cfg, "--out", tmp_path / "o", "--no-progress")
    assert "NaN/Inf" in one_error_line(p) and p.returncode == 1
    folder = tmp_path / "o" / "make_nan_every_third" / "im"
    assert not any((folder / f).exists() for f in RESULT_FILES)
    assert "NaN/Inf" in json.loads((folder / "error.json").read_text())["error"]


# ---- 2. submodules in training mode: eval for the run, their own modes restored, the summary says so -----------

class WithBatchNorm(torch.nn.Module):
    """Conv, BatchNorm, Dropout: in training mode the output depends on the batch and on chance."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(3)
        self.drop = torch.nn.Dropout(0.5)
        self.frozen = torch.nn.BatchNorm2d(3).eval()  # a submodule the user put in eval mode on purpose
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, x):
        return x + 0.2 * self.drop(self.frozen(self.bn(self.conv(x))))


def modes(model):
    return {name: m.training for name, m in model.named_modules()}


def test_training_mode_submodules_run_in_eval_for_the_run_only(image, bank):
    model = WithBatchNorm().train()
    model.frozen.eval()
    before = modes(model)
    one = small_run(model, image, bank, batch_size=1)
    assert modes(model) == before  # each submodule's own mode, the frozen one's too
    many = small_run(model, image, bank, batch_size=7)
    assert np.array_equal(one.effect, many.effect) and one.psnr_origin == many.psnr_origin  # no batch statistics
    assert one.extra["switched_to_eval"] == {"submodules_in_training": 4, "names": ["WithBatchNorm", "conv", "bn",
                                                                                    "drop"],
                                             "restored_after_the_run": True}
    assert "switched_to_eval" not in small_run(model.eval(), image, bank).extra  # nothing was switched


def test_modes_are_restored_when_the_run_fails(image, bank):
    class FailsOnBatches(WithBatchNorm):
        def forward(self, x):
            if x.shape[0] > 1:
                raise RuntimeError("no batches here")
            return super().forward(x)

    model = FailsOnBatches().train()
    with pytest.raises(RuntimeError, match="no batches here"):
        small_run(model, image, bank, batch_size=4, locality="off")
    assert all(modes(model).values())


def test_the_wrappers_of_model_options_are_not_reported_as_switched(image, bank):
    from cem_fast.models.wrappers import apply_model_options
    model = apply_model_options(WithBatchNorm().eval(), {"pad_multiple": 8, "per_channel": False})
    assert "switched_to_eval" not in small_run(model, image, bank).extra


# ---- 3. a cache chunk belongs to its run: one copied from another run's entry is recomputed --------------------

def test_chunks_copied_from_a_seed_1_run_into_the_seed_0_entry_are_dropped(image, bank, tmp_path):
    """The intervention ids do not depend on the seed, so before the chunks carried their run's key, a seed-1
    chunk in the seed-0 entry verified and its samples were used as seed 0's."""
    args = dict(task="DN", sigma=25, roi=(8, 8, 8), coarse=2, fine=3, patches=bank, batch_size=4,
                locality="off", cache=tmp_path / "cache")
    seed0 = cem_fast.causal_effect_map(Drifts(step=0.0), image, seed=0, **args)
    seed1 = cem_fast.causal_effect_map(Drifts(step=0.0), image, seed=1, **args)
    assert not np.array_equal(seed0.samples_coarse, seed1.samples_coarse)  # the seeds' samples differ
    entry0, entry1 = Path(seed0.extra["cache_entry"]), Path(seed1.extra["cache_entry"])
    copied = []
    for chunk in sorted(entry1.glob("coarse/*.npz")):  # the coarse stage: the same rows in both runs
        (entry0 / "coarse" / chunk.name).write_bytes(chunk.read_bytes())
        copied.append(f"coarse/{chunk.name}")
    assert len(copied) == 8  # 16 blocks x 2 draws in chunks of 4
    again = cem_fast.causal_effect_map(Drifts(step=0.0), image, seed=0, **args)
    dropped = again.extra["cache_dropped_chunks"]
    assert sorted(d.split(": ")[0] for d in dropped) == copied
    assert all("belongs to another run" in d for d in dropped), dropped
    assert again.extra["reused_from_cache"] == seed0.num_forwards - 2 - 32  # the fine stage's only
    fresh = cem_fast.causal_effect_map(Drifts(step=0.0), image, seed=0, **{**args, "cache": None})
    np.testing.assert_array_equal(again.samples_coarse, fresh.samples_coarse)
    np.testing.assert_array_equal(again.effect, fresh.effect)


# ---- 4. a cache that cannot be used is skipped; earlier results are replaced only by complete new ones ---------

def sr_config(tmp_path: Path, rng) -> Path:
    image = tmp_path / "im.png"
    Image.fromarray(rng.randint(0, 256, (16, 16, 3)).astype(np.uint8)).save(image)
    cfg = {"task": "SR", "scale": 4, "model": "bicubic", "images": [str(image)], "roi": [0, 0, 8], "coarse": 1,
           "fine": 1}
    path = tmp_path / "sr.yml"
    path.write_text(json.dumps(cfg))
    return path


def test_a_file_in_place_of_the_cache_folder_is_one_warning_and_the_run_goes_on(tmp_path, rng):
    cfg, out = sr_config(tmp_path, rng), tmp_path / "o"
    assert run_cli("run", cfg, "--out", out, "--no-progress").returncode == 0
    folder = out / "bicubic_x4" / "im"
    first = json.loads((folder / "summary.json").read_text())
    (out / ".cem_cache").rename(tmp_path / "old_cache")
    (out / ".cem_cache").write_text("not a folder")
    p = run_cli("run", cfg, "--out", out, "--no-progress", "--set", "seed=1")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    warnings = [ln for ln in p.stderr.splitlines() if "warning" in ln.lower()]
    assert len(warnings) == 1 and "sample cache" in warnings[0] and "cannot be used" in warnings[0], p.stderr
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["seed"] == 1 and first["seed"] == 0  # the new results replaced the earlier ones
    assert "cannot be used" in summary["cache_note"] and "cache_entry" not in summary
    assert all((folder / f).is_file() for f in RESULT_FILES) and not (folder / "error.json").exists()


def test_an_interrupted_save_leaves_the_earlier_results_as_they_were(tmp_path, rng, monkeypatch, capsys):
    from cem_fast import cli, plotting
    cfg, out = sr_config(tmp_path, rng), tmp_path / "o"
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
    cfg, out = sr_config(tmp_path, rng), tmp_path / "o"
    stale = out / "bicubic_x4" / ".im.staging999999999"
    stale.mkdir(parents=True)
    (stale / "result.npz").write_bytes(b"half a run")
    mine = out / "bicubic_x4" / ".my_notes"
    mine.mkdir()
    assert run_cli("run", cfg, "--out", out, "--no-progress").returncode == 0
    assert not stale.exists() and mine.is_dir()


def test_a_cache_chunk_that_cannot_be_written_is_one_warning_and_the_run_goes_on(image, bank, tmp_path,
                                                                                  monkeypatch):
    from cem_fast import cache as cache_mod
    args = dict(task="DN", sigma=25, roi=(8, 8, 8), coarse=2, fine=2, patches=bank, locality="off", batch_size=8)
    want = cem_fast.causal_effect_map(Drifts(step=0.0), image, **args)
    real = cache_mod.atomic_write

    def disk_full_for_chunks(path, write):
        if Path(path).suffix == ".npz":
            raise OSError(28, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(cache_mod, "atomic_write", disk_full_for_chunks)
    with pytest.warns(UserWarning, match=r"coarse/000000000-000008\.npz cannot be written \(\[Errno 28\] No space"):
        got = cem_fast.causal_effect_map(Drifts(step=0.0), image, cache=tmp_path / "cache", **args)
    assert "No space left on device" in got.extra["cache_note"]
    np.testing.assert_array_equal(got.effect, want.effect)


# ---- 5. a model's sys.exit is said as such ---------------------------------------------------------------------

class ExitsOnBatches(torch.nn.Module):
    def forward(self, x):
        if x.shape[0] > 1:
            sys.exit("usage: model.py [-h]")  # research code that parses arguments, say
        return box_blur(x)


def make_exits():
    return ExitsOnBatches()


def test_a_model_calling_sys_exit_is_one_clear_line(tmp_path, rng):
    cfg = config(tmp_path, write_png(tmp_path / "im.png", rng), model="test_honest_results:make_exits",
                 locality="off", batch_size=4)
    line = one_error_line(run_cli("run", cfg, "--out", tmp_path / "o", "--no-progress"))
    assert line == ("cem-fast: error: make_exits on im.png: the model called sys.exit('usage: model.py [-h]') "
                    "during its forward pass")


def test_sys_exit_in_a_forward_does_not_end_the_callers_program(image, bank):
    class Exits(torch.nn.Module):
        def forward(self, x):
            sys.exit(3)

    with pytest.raises(RuntimeError, match=r"^model Exits called sys\.exit\(3\) during its forward pass$"):
        small_run(Exits(), image, bank)
    with pytest.raises(RuntimeError, match=r"^the model called sys\.exit\('usage: model\.py \[-h\]'\) during"):
        small_run(ExitsOnBatches(), image, bank, locality="off", batch_size=4)


def test_probes_that_disagree_are_named_not_an_overflowed_window():
    """A block that the reach map says meets a ROI but whose measured spread changes none (a model whose probe
    forwards disagree) was given a window of height about -2**63 ('window_size [-9223372036854775805, ...]')."""
    from types import SimpleNamespace

    from cem_fast.geometry import ROI, BlockGrid
    from cem_fast.pipeline.windows import Spread, block_windows
    grid = BlockGrid(64, 64, 8)
    reach = np.zeros((1, grid.rows, grid.cols), dtype=bool)
    reach[0, 0, 0] = reach[0, 7, 7] = True  # (7, 7) lies far from the ROI at (0, 0) for a spread of 2 px
    plan = SimpleNamespace(grid=grid, task=SimpleNamespace(scale=1), rois=[ROI(0, 0, 8, 8)],
                           locality=SimpleNamespace(reach=reach))
    with pytest.raises(ValueError, match=r"block \(row 7, col 7\) was measured to reach a ROI.*locality=off"):
        block_windows(plan, Spread(2, 2, 2, 2))
    reach[0, 7, 7] = False
    assert block_windows(plan, Spread(2, 2, 2, 2)).inputs.min() >= 0
