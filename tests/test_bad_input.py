"""Every bad input gives a one-line error that names the input, what was expected and what was found; the CLI
exits non-zero without a traceback."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import cem_fast
from cem_fast.patches import PatchBank


@pytest.fixture
def bank(rng):
    return PatchBank(torch.from_numpy(rng.randint(0, 256, (8, 3, 8, 8)).astype(np.uint8)))


class Dim(torch.nn.Module):
    """Not an exact restorer, so Y(I) is finite."""

    def forward(self, x):
        return x * 0.5


def cem(image, bank, **kw):
    args = dict(model=Dim(), task="identity", roi=(0, 0, 8), patches=bank, coarse=1, fine=1)
    args.update(kw)
    return cem_fast.causal_effect_map(image=image, **args)


def one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_corrupt_image_file(tmp_path, bank):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="bad.png' cannot be read") as e:
        cem(tmp_path / "bad.png", bank)
    one_line(e)


def test_greyscale_and_rgba_images_are_converted(tmp_path, bank, rng):
    grey = rng.randint(0, 256, (16, 16)).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    rgba = rng.randint(0, 256, (16, 16, 4)).astype(np.uint8)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    g = cem(tmp_path / "g.png", bank)
    assert torch.equal(g.gt, torch.from_numpy(grey).expand(3, 16, 16))  # replicated to RGB
    a = cem(tmp_path / "a.png", bank)
    assert torch.equal(a.gt, torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1))  # alpha dropped


def test_flipped_read_only_and_strided_arrays_are_read_as_given(bank, rng):
    img = rng.randint(0, 256, (24, 20, 3)).astype(np.uint8)
    ro = img.copy()
    ro.flags.writeable = False
    for arr in (img[::-1], ro, img[:, ::2], np.asfortranarray(img)):
        res = cem(arr, bank)
        assert torch.equal(res.gt, torch.from_numpy(np.array(arr)).permute(2, 0, 1))
    res = cem(img, bank)
    img[:] = 0  # the result does not alias the caller's array
    assert res.gt.sum() > 0


def test_image_smaller_than_a_block_or_the_roi(bank, rng):
    tiny = rng.randint(0, 256, (6, 6, 3)).astype(np.uint8)
    with pytest.raises(ValueError, match="image 6x6 must be at least one block") as e:
        cem(tiny, bank)
    one_line(e)
    small = rng.randint(0, 256, (16, 16, 3)).astype(np.uint8)
    with pytest.raises(ValueError, match=r"roi \(y=0, x=0, 32x32\) must lie inside the 16x16 output"):
        cem(small, bank, roi=(0, 0, 32))


def test_sr_image_is_cropped_to_a_multiple_of_the_scale_and_says_so(bank, rng):
    img = rng.randint(0, 256, (18, 17, 3)).astype(np.uint8)
    res = cem(img, bank, model="bicubic", task="SR", scale=4)
    assert tuple(res.gt.shape) == (3, 16, 16)
    assert res.extra["cropped_from"] == [18, 17]


@pytest.mark.parametrize("kw,match", [
    (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
    (dict(fine=-1), "fine must be a non-negative integer, got -1"),
    (dict(task="DN", sigma=-5), "sigma must be positive"),
    (dict(task="SR", scale=0), "sr scale must be a positive integer, got 0"),
    (dict(mode="exhaustive", samples=0), "samples must be a positive integer, got 0"),
    (dict(block=2.5), "block must be a positive integer, got 2.5"),
])
def test_zero_or_negative_parameters(bank, rng, kw, match):
    img = rng.randint(0, 256, (16, 16, 3)).astype(np.uint8)
    with pytest.raises(ValueError, match=match) as e:
        cem(img, bank, **kw)
    one_line(e)


def test_patch_bank_mismatched_with_the_image_channels(rng):
    with pytest.raises(ValueError, match=r"patch bank must be \(P, 3, pb, pb\) uint8, got \(4, 1, 8, 8\)"):
        PatchBank(torch.zeros(4, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="is empty"):
        PatchBank(torch.zeros(0, 3, 8, 8, dtype=torch.uint8))


def cli(*args):
    return subprocess.run([sys.executable, "-m", "cem_fast.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


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
    p = cli("run", cfg, "--out", tmp_path / "o", "--set", override.format(tmp=tmp_path))
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and match in errors[0], p.stderr


# ---- configs that would exhaust memory or the stack: refused while the YAML is composed, in one line ----------

CONFIG = "model: bicubic\nimages: [a.png]\nroi: [0, 0, 8]\n"


def billion_laughs(levels: int = 9) -> str:
    """Under an ignored key: 10 ** levels strings once expanded (5.7 GB written out as JSON)."""
    lines = ["prefix:", "  l0: &l0 [" + ", ".join(["lol"] * 10) + "]"]
    lines += [f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, match", [
    (billion_laughs(), r"YAML aliases are not accepted, got \*l0 \(line 6\)"),
    ("prefix: &a [1, *a]\n", r"YAML aliases are not accepted, got \*a"),  # a value that holds itself
    ("prefix: " + "[" * 10_000 + "]" * 10_000 + "\n", r"values may nest 32 levels deep, got more \(line 4\)"),
    ("prefix: {[1, 2]: 3}\n", r"keys must be names or numbers, got a list \(line 4\)"),
    ("? {a: 1}\n: 2\n", r"keys must be names or numbers, got a mapping \(line 4\)"),
])
def test_configs_that_would_explode_are_one_line_errors(tmp_path, text, match):
    from cem_fast.config import load_config
    cfg = tmp_path / "c.yml"
    cfg.write_text(CONFIG + text)
    with pytest.raises(ValueError, match=match) as e:
        load_config(str(cfg))
    assert one_line(e).startswith(f"config {str(cfg)!r}: ")


def test_set_values_are_read_with_the_same_limits(tmp_path):
    from cem_fast.config import load_config
    cfg = tmp_path / "c.yml"
    cfg.write_text(CONFIG)
    with pytest.raises(ValueError, match=r"^--set prefix: YAML aliases are not accepted, got \*a"):
        load_config(str(cfg), ["prefix=[&a [1, 2], *a]"])
    with pytest.raises(ValueError, match=r"^--set prefix: values may nest 32 levels deep"):
        load_config(str(cfg), ["prefix=" + "[" * 5000 + "]" * 5000])


def test_the_cli_refuses_an_alias_bomb_in_one_line(tmp_path, capsys):
    from cem_fast.cli import main
    cfg = tmp_path / "bomb.yml"
    cfg.write_text(CONFIG + billion_laughs())  # a.png does not exist: without the check the run fails (exit 1)
    assert main(["run", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == f"cem-fast: error: config {str(cfg)!r}: YAML aliases are not accepted, got *l0 (line 6): " \
                  "write the value out\n"


def test_json_safe_refuses_values_nested_too_deep_or_holding_themselves():
    from cem_fast.jsonsafe import json_safe
    deep: list = []
    inner = deep
    for _ in range(10_000):
        inner.append([])
        inner = inner[0]
    itself: list = [1]
    itself.append(itself)
    for value in (deep, itself, {"a": {"b": itself}}):
        with pytest.raises(ValueError, match=r"^json_safe: values may nest 100 levels deep, got more \(or a value "
                                             r"holds itself\)$"):
            json_safe(value)
    assert json_safe({"a": [[np.float32(1.5), float("inf")]], 2: np.arange(2)}) == {"a": [[1.5, "inf"]],
                                                                                     "2": [0, 1]}


def test_an_array_given_as_the_patch_bank_is_named(rng):
    """An array is not one of the bank's forms: say which forms are (it was a TypeError from Path)."""
    img = (rng.rand(16, 16, 3) * 255).astype(np.uint8)
    with pytest.raises(ValueError, match="patches must be None, 'default', a folder .* got ndarray"):
        cem_fast.causal_effect_map(torch.nn.Identity(), img, task="DN", sigma=10, roi=(0, 0, 8), block=8, coarse=1,
                                   fine=1, patches=np.zeros((2, 8, 8, 3)))


def test_a_model_with_integer_output_is_named(bank, rng):
    """A uint8 output would be scored as if 0..255 were 0..1: refused with the model's name and dtype."""
    class ToUint8(torch.nn.Module):
        def forward(self, x):
            return (x * 255).to(torch.uint8)

    img = (rng.rand(16, 16, 3) * 255).astype(np.uint8)
    with pytest.raises(ValueError, match="model ToUint8 output must be a floating-point tensor .* got torch.uint8"):
        cem_fast.causal_effect_map(ToUint8(), img, task="DN", sigma=10, roi=(0, 0, 8), block=8, coarse=1, fine=1,
                                   patches=bank)
