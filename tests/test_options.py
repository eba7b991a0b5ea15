"""Options are defined once (cem_fast.pipeline.options): the Python API, the config and the tasks agree with them."""
import inspect
from dataclasses import fields

import pytest

import cem_fast
from cem_fast import config
from cem_fast.pipeline.options import (API_ONLY, BACKENDS, MODES, PRECISIONS, RAIN_PRESETS, RunOptions,
                                       TaskOptions)


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
