"""Options are defined once (cem_fast.options): the Python API, the config and the tasks agree with them."""
import inspect
from dataclasses import fields

import numpy as np
import pytest

import cem_fast
from cem_fast import config
from cem_fast.options import (API_ONLY, BACKENDS, MODES, PRECISIONS, RAIN_PRESETS, RunOptions,
                                       TaskOptions)
from helpers import dim_run, one_line, random_bank


def test_the_api_defaults_are_the_options_defaults():
    params = inspect.signature(cem_fast.causal_effect_maps).parameters
    for f in fields(RunOptions):
        assert f.name in params, f"causal_effect_maps has no argument {f.name}"
        assert params[f.name].default == f.default, f.name
    single = inspect.signature(cem_fast.causal_effect_map).parameters
    for name in ("block", "coarse", "fine", "tol", "seed"):
        assert single[name].default == getattr(RunOptions(), name), name


def test_every_option_is_a_config_key_with_its_default():
    for f in fields(RunOptions):
        if f.name in API_ONLY:
            assert f.name not in config.OURS, f"{f.name} is set by the CLI, not the config"
        elif f.name == "max_pixels":
            assert config.OURS[f.name] is None  # null: the default limit
        else:
            assert config.OURS[f.name] == f.default, f.name
    for f in fields(TaskOptions):
        assert config.OURS[f.name] == f.default, f.name


def test_vocabularies_are_the_ones_the_code_uses():
    from cem_fast import ops, rain
    assert tuple(rain.PRESETS) == RAIN_PRESETS
    assert tuple(ops.BACKENDS) == BACKENDS
    assert MODES == ("coarse-to-fine", "exhaustive", "adaptive") and PRECISIONS[0] == "fp32"


@pytest.mark.parametrize("overrides, message", [
    (["mode=fast"], "mode must be one of coarse-to-fine, exhaustive, adaptive, got 'fast'"),
    (["precision=fp8"], "precision must be one of fp32, tf32, bf16, fp16, got 'fp8'"),
    (["samples=5"], "samples applies to mode: exhaustive"),
    (["compile=1.5"], None),
])
def test_the_config_checks_with_the_options_checks(tmp_path, overrides, message):
    cfg = tmp_path / "c.yml"
    cfg.write_text("model: bicubic\nimages: [a.png]\nroi: [0, 0, 8]\n")
    if message is None:  # compile is an option like any other: a config may set it
        assert config.load_config(str(cfg), ["compile=true"]).options["compile"] is True
        return
    with pytest.raises(ValueError, match=message):
        config.load_config(str(cfg), overrides)


def test_an_unknown_task_option_is_one_line_naming_it(tiny_net):
    with pytest.raises(ValueError, match=r"^unknown task option 'sigmaa'; expected one of scale, sigma"):
        cem_fast.causal_effect_map(tiny_net, "x.png", task="DN", roi=(0, 0, 8), sigmaa=25)
    with pytest.raises(ValueError, match="unknown task option 'betta'"):
        cem_fast.make_task("DR", betta=1)


@pytest.mark.parametrize("extra, message", [
    ("fine_num: 6\nfine: 7\n", "config gives 'fine' and 'fine_num', two names of one option: keep one"),
    ("sr: 4\nscale: 2\n", "config gives 'scale' and 'sr', two names of one option: keep one"),
    ("patch_path: p\npatches: q\n", "config gives 'patches' and 'patch_path'"),
    ("Modellist: [bicubic]\nmodels: [default]\n", "config gives 'models' and 'Modellist'"),
    ("h: 8\n", "config gives 'roi' and 'h', two names of one option: keep one"),
    ("h: 8\nw: 8\nROI_size: 8\n", "config gives 'roi' and 'h', 'w', 'ROI_size'"),
])
def test_two_names_of_one_option_are_an_error_naming_both(tmp_path, extra, message):
    cfg = tmp_path / "c.yml"
    cfg.write_text("model: bicubic\nimages: [a.png]\nroi: [0, 0, 8]\n" + extra)
    with pytest.raises(ValueError, match=f"^{message}"):
        config.load_config(str(cfg))


def test_set_replaces_every_name_of_its_option(tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text("model: bicubic\nimages: [a.png]\nh: 0\nw: 0\nROI_size: 8\nfine_num: 6\nsr: 2\n")
    c = config.load_config(str(cfg), ["fine=2", "scale=3", "roi=[8, 8, 16]"])
    assert (c.options["fine"], c.options["scale"], c.roi.as_tuple()) == (2, 3, (8, 8, 16, 16))
    c = config.load_config(str(cfg), ["fine_num=4", "h=16"])
    assert c.options["fine"] == 4 and c.roi.as_tuple() == (16, 0, 8, 8)


# ---- values out of range: one line naming the option -----------------------------------------------------------------

@pytest.fixture
def bank(rng):
    return random_bank(rng, 8)


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
        dim_run(img, bank, **kw)
    one_line(e)
