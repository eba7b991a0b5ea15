"""The layer-by-layer engine (cem_fast/pipeline/engines/incremental.py): the pipeline's samples equal the window
path's and the crop's, and everything it cannot compute exactly falls back with the reason in summary.json (the
recomputation itself: tests/layerwise/test_layerwise.py)."""
import numpy as np
import pytest
import torch

import cem_fast
from cem_fast.patches import PatchBank
from cem_fast.layerwise import LayerwiseGraph
from model_factories import ConvStack, RandomNet, Reflect, TinySR
from test_windows import assert_same_samples  # the cross-shape bound on CUDA (documented there)


@pytest.fixture
def bank(rng):
    return PatchBank(torch.from_numpy(rng.randint(0, 256, (32, 3, 8, 8)).astype(np.uint8)))


@pytest.fixture
def image(rng):
    return rng.randint(0, 256, (64, 72, 3)).astype(np.uint8)


ARGS = dict(task="DN", sigma=30, coarse=2, fine=3, tol=0.0, seed=5, progress=False)
# the test nets are too small for the engine to pay for its fixed cost: "on" runs it wherever it applies (the
# shipped models choose it by themselves)
ON = dict(ARGS, incremental="on", windows="on")


@pytest.mark.parametrize("model", [ConvStack(4, 2), RandomNet([(3, 1, 1), (5, 2, 3), (3, 1, 1), (3, 2, 1)], 6, 1),
                                   "default"], ids=["dilated", "random", "default-DnCNN"])
@pytest.mark.parametrize("rois", [[(24, 32, 16)], [(0, 0, 16), (40, 48, 24, 16)]], ids=["one", "two"])
def test_the_pipeline_gives_the_window_paths_samples(model, rois, image, bank):
    inc = cem_fast.causal_effect_maps(model, image, rois=rois, patches=bank, **(ARGS if model == "default" else ON))
    off = cem_fast.causal_effect_maps(model, image, rois=rois, patches=bank, incremental="off", windows="on",
                                      **ARGS)
    info = inc[0].extra["locality"]["incremental"]
    assert info["used"], info
    assert info["verify_max_abs_err"] <= 1e-4 and info["fewer_conv_px"] >= 1.2
    assert off[0].extra["locality"]["incremental"] == {"used": False, "reason": "asked (incremental: off)"}
    for a, b in zip(inc, off):
        assert_same_samples(a.samples_coarse, b.samples_coarse, atol=1e-3, what="coarse samples")
        assert_same_samples(a.cem, b.cem, atol=1e-3, what="maps")
        assert np.array_equal(a.gated, b.gated) and a.num_forwards == b.num_forwards


@pytest.mark.parametrize("task,opts", [("DR", dict(rain_seed=3)), ("identity", {})])
def test_other_tasks_give_the_crops_samples(task, opts, image, bank):
    args = dict(ARGS, task=task, **opts)
    inc = cem_fast.causal_effect_map(ConvStack(4, 2), image, roi=(8, 40, 24, 16), patches=bank,
                                     **dict(args, incremental="on"))
    crop = cem_fast.causal_effect_map(ConvStack(4, 2), image, roi=(8, 40, 24, 16), patches=bank, windows="crop",
                                      **dict(args, incremental="off"))
    assert inc.extra["locality"]["incremental"]["used"]
    assert_same_samples(inc.samples_coarse, crop.samples_coarse, atol=1e-3, what="coarse samples")
    assert_same_samples(inc.samples_fine, crop.samples_fine, atol=1e-3, what="fine samples")


def test_too_small_a_gain_keeps_the_windows(image, bank, monkeypatch):
    """The engine runs only where it computes clearly fewer convolution pixels (here: demanding 1000x)."""
    import cem_fast.pipeline.engines.incremental as incremental
    monkeypatch.setattr(incremental, "MIN_GAIN", 1000)
    res = cem_fast.causal_effect_map(ConvStack(1), image, roi=(24, 32, 16), patches=bank, windows="on", **ARGS)
    info = res.extra["locality"]["incremental"]
    assert not info["used"] and "saves too little" in info["reason"]


def test_a_net_too_small_to_pay_for_its_graphs_fixed_cost_keeps_the_windows(image, bank, monkeypatch):
    """A few thin layers save convolution pixels but not the time of the graph's nodes: auto keeps an engine without
    a graph and says why; without the fixed cost (or with "on") the same run is recomputed layer by layer. The
    windows "on": the graph is traced and weighed (auto's windows count a forward, by which it is refused untraced:
    tests/pipeline/engines/test_cost.py)."""
    import cem_fast.pipeline.engines.incremental as incremental
    args = dict(ARGS, windows="on")
    res = cem_fast.causal_effect_map(ConvStack(4, 2), image, roi=(24, 32, 16), patches=bank, **args)
    info = res.extra["locality"]["incremental"]
    assert not info["used"] and info["reason"].startswith("saves less than its fixed cost"), info
    assert info["fewer_conv_px"] >= incremental.MIN_GAIN and not res.extra["plan"]["incremental"]
    on = cem_fast.causal_effect_map(ConvStack(4, 2), image, roi=(24, 32, 16), patches=bank, **ON)
    assert on.extra["locality"]["incremental"]["used"]
    monkeypatch.setattr(incremental, "NODE_COST_MACS", 0)
    free = cem_fast.causal_effect_map(ConvStack(4, 2), image, roi=(24, 32, 16), patches=bank, **args)
    assert free.extra["locality"]["incremental"]["used"]
    assert np.array_equal(on.gated, free.gated) and np.allclose(on.cem, res.cem, atol=1e-3)


def test_on_still_refuses_what_it_cannot_compute_exactly(image, bank):
    res = cem_fast.causal_effect_map(Reflect(), image, roi=(24, 32, 16), patches=bank, **ON)
    info = res.extra["locality"]["incremental"]
    assert not info["used"] and "reflect padding" in info["reason"], info


def test_a_difference_from_the_crop_falls_back_and_says_so(image, bank, monkeypatch):
    real = LayerwiseGraph.run

    def off_by_a_little(self, *args, **kwargs):
        out, lo = real(self, *args, **kwargs)
        return out + 1e-3, lo
    monkeypatch.setattr(LayerwiseGraph, "run", off_by_a_little)
    res = cem_fast.causal_effect_map(ConvStack(4, 2), image, roi=(24, 32, 16), patches=bank, **ON)
    info = res.extra["locality"]["incremental"]
    assert not info["used"] and "differ from the crop's by 0.001" in info["reason"]


def test_a_failed_windows_check_refuses_the_engine_too(image, bank, monkeypatch):
    """The engine reads the same changed rectangles as the windows: where their check failed, it does not run."""
    import cem_fast.pipeline.engines.windows as windows
    monkeypatch.setattr(windows, "verify_windows", lambda *a, **k: 1.0)
    res = cem_fast.causal_effect_map(ConvStack(4, 2), image, roi=(24, 32, 16), patches=bank, windows="on", **ARGS)
    loc = res.extra["locality"]
    assert loc["windows"]["check_failed"] and not loc["windows"]["used"]
    assert not loc["incremental"]["used"] and loc["incremental"]["reason"].startswith("the windows' check failed")


def test_activations_that_would_not_fit_keep_the_windows(image, bank, monkeypatch):
    import cem_fast.pipeline.engines.incremental as incremental
    # the activations do not fit (on CUDA the device's free memory is asked, on the CPU the host's: one function)
    monkeypatch.setattr(incremental, "free_memory", lambda device: 1 << 18)
    res = cem_fast.causal_effect_map(ConvStack(4, 2), image, roi=(24, 32, 16), patches=bank, **ON)
    info = res.extra["locality"]["incremental"]
    assert not info["used"] and "more than a quarter of the 0.0 GiB available" in info["reason"], info
    assert res.extra["locality"]["windows"]["used"]


def test_the_fp32_recheck_of_a_reduced_precision_run_does_not_use_its_activations(image, bank, monkeypatch):
    """bf16: the unintervened activations are bf16; the fp32 re-check of a sample of blocks must not read them
    (it ran the engine on them and failed, found by review). The probe runs in fp32 here, as on a GPU, so that the
    engine is used (on the CPU oneDNN's bf16 NaN spread is wider than the receptive field, and it is refused)."""
    import cem_fast.pipeline.plan as plan_module
    real = plan_module.plan_locality
    monkeypatch.setattr(plan_module, "plan_locality", lambda forward, *a, **k: real(forward.at_precision("fp32"),
                                                                                     *a, **k))
    res = cem_fast.causal_effect_map(ConvStack(4, 2), image, roi=(24, 32, 16), patches=bank, precision="bf16",
                                     **dict(ON, fine=0))
    assert res.extra["locality"]["incremental"]["used"], res.extra["locality"]["incremental"]
    check = res.extra["precision_check"]
    assert check["max_abs_delta_ce_db"] < 0.5, check


def test_a_failure_of_the_activations_keeps_the_windows(image, bank, monkeypatch):
    def fail(self, *args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")
    monkeypatch.setattr(LayerwiseGraph, "materialise", fail)
    res = cem_fast.causal_effect_map(ConvStack(4, 2), image, roi=(24, 32, 16), patches=bank, **ON)
    info = res.extra["locality"]["incremental"]
    assert not info["used"] and "RuntimeError: CUDA out of memory (simulated)" in info["reason"], info


@pytest.mark.parametrize("model,opts,reason", [
    (ConvStack(4, 2), dict(locality="off"), "locality was not verified"),
    (Reflect(), dict(windows="on"), "reflect padding"),
])
def test_the_summary_says_why_it_did_not_run(model, opts, reason, image, bank):
    res = cem_fast.causal_effect_map(model, image, roi=(24, 32, 16), patches=bank, **ARGS, **opts)
    info = res.extra["locality"]["incremental"]
    assert not info["used"] and reason in info["reason"], info


@pytest.mark.parametrize("model,scale", [(TinySR(2, "bicubic"), 2), (TinySR(4, "bilinear"), 4), ("default:sr", 4)],
                         ids=["x2-bicubic", "x4-bilinear", "default-MSRResNet"])
def test_sr_gives_the_window_paths_samples(model, scale, rng, bank):
    img = rng.randint(0, 256, (96, 96, 3) if scale == 2 else (192, 192, 3)).astype(np.uint8)
    args = dict(task="SR", scale=scale, coarse=2, fine=2, tol=0.0, seed=5, progress=False, patches=bank,
                incremental="auto" if model == "default:sr" else "on")
    rois = [(32, 40, 16)] if scale == 2 else [(80, 88, 16), (8, 120, 16, 24)]
    inc = cem_fast.causal_effect_maps(model, img, rois=rois, **args)
    crop = cem_fast.causal_effect_maps(model, img, rois=rois, windows="crop", **dict(args, incremental="off"))
    info = inc[0].extra["locality"]["incremental"]
    assert info["used"] and info["verify_max_abs_err"] <= 1e-4, info
    for a, b in zip(inc, crop):
        assert_same_samples(a.samples_coarse, b.samples_coarse, atol=1e-3, what="coarse samples")
        assert_same_samples(a.cem, b.cem, atol=1e-3, what="maps")


def test_a_model_without_convolutions_keeps_the_windows(rng, bank, monkeypatch):
    """It saves nothing there, and its graph is not even traced."""
    traced = []
    real = LayerwiseGraph.__init__
    monkeypatch.setattr(LayerwiseGraph, "__init__", lambda self, model: traced.append(model) or real(self, model))
    img = rng.randint(0, 256, (64, 64, 3)).astype(np.uint8)
    res = cem_fast.causal_effect_map("bicubic", img, task="SR", scale=2, roi=(24, 24, 16), coarse=1, fine=0,
                                     patches=bank, progress=False, windows="on")
    info = res.extra["locality"]["incremental"]
    assert not info["used"] and "saves too little" in info["reason"] and "no convolution" in info["reason"], info
    assert traced == [] and res.extra["locality"]["windows"]["used"]


