"""Intervention-centred windows (issue 14): each intervention runs on the input window that determines the part
of the ROIs it can change; the composed ROI errors are exact, so the maps equal the crop's; verified per run,
refused with a reason where they do not apply."""
import json
import os

import numpy as np
import pytest
import torch

import cem_fast
from cem_fast.pipeline.engines.windows import Spread
from model_factories import ConvStack, NaNEveryThird


# Samples of one intervention computed on inputs of different shapes (its own window against the crop, the
# layer-by-layer engine's rectangles, another batch size) are bit-identical on the CPU, where the same kernels run
# for every shape. cuDNN picks its convolution algorithm per shape, so there the fp32 round-off differs (about
# 1e-6 of a value, TF32 being off); the outputs are rounded to uint8 before the PSNR, and now and then a value
# lands on the other side of a step. One flip in a ROI of N values moves its squared error by (2|e| + 1) / N
# (e: that value's error, in uint8 steps), a few thousandths of a dB for these ROIs (N >= 768, |e| <= 40).
# The bound on CUDA: every sample within SHAPE_FLIP_DB of the other's, at most SHAPE_FLIP_FRACTION of them
# different at all (a wrong window or rectangle moves whole blocks' samples by tenths of a dB or more). The size
# of each difference goes to $CEM_FAST_RECORD_DIFFS (a JSONL file; the GPU check collects them).
SHAPE_FLIP_DB = 0.05
SHAPE_FLIP_FRACTION = 0.2


def assert_same_samples(a, b, atol=0.0, what=""):
    """``a`` and ``b`` (samples or maps, dB) of the same draws on inputs of different shapes: equal (to ``atol``)
    on the CPU; within the cross-shape bound above on CUDA, and recorded."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape and np.array_equal(np.isnan(a), np.isnan(b)), what
    d = np.abs(np.nan_to_num(a) - np.nan_to_num(b))
    record = os.environ.get("CEM_FAST_RECORD_DIFFS")
    if record and d.size:
        with open(record, "a") as f:
            f.write(json.dumps({"kind": "cross_shape_difference", "test": os.environ.get("PYTEST_CURRENT_TEST", ""),
                                "what": what, "device": "cuda" if torch.cuda.is_available() else "cpu",
                                "values": int(d.size), "max_abs_db": float(d.max()),
                                "differ_fraction": float((d > atol).mean())}) + "\n")
    if not torch.cuda.is_available():
        np.testing.assert_allclose(a, b, atol=atol, rtol=0, err_msg=what)
        return
    assert d.max() <= max(atol, SHAPE_FLIP_DB), f"{what}: {d.max():.4g} dB apart (bound {SHAPE_FLIP_DB})"
    assert (d > atol).mean() <= SHAPE_FLIP_FRACTION, f"{what}: {(d > atol).mean():.1%} of the values differ"


def both(model, image, **kw):
    """The windows and the crop, each alone (the incremental engine, which would take over, is off)."""
    return (cem_fast.causal_effect_maps(model, image, windows="on", incremental="off", **kw),
            cem_fast.causal_effect_maps(model, image, windows="crop", incremental="off", **kw))


@pytest.mark.parametrize("task, opts, model", [
    ("DN", dict(sigma=25), ConvStack(4)),
    ("identity", {}, ConvStack(3, dilation=2)),
    ("DR", dict(rain_seed=3), ConvStack(4)),
])
def test_windows_give_the_crops_samples_exactly(image, bank, task, opts, model):
    own, crop = both(model, image, task=task, rois=[(40, 36, 16)], coarse=2, fine=3, patches=bank, seed=1, **opts)
    info = own[0].extra["locality"]["windows"]
    assert info["used"] and info["gain"] > 1.2, info
    assert crop[0].extra["locality"]["windows"] == {"used": False, "reason": "asked (windows: crop)"}
    assert_same_samples(own[0].samples_coarse, crop[0].samples_coarse, what="coarse samples")
    assert_same_samples(own[0].samples_fine, crop[0].samples_fine, what="fine samples")
    assert own[0].extra["plan"]["windows"] == "intervention-centred"
    assert own[0].extra["plan"]["input_px_per_forward"] < crop[0].extra["plan"]["input_px_per_forward"]


def test_windows_for_sr_and_many_rois(rng, bank):
    """x2 SR (a conv net after bicubic upsampling: the spread is in output px) and three ROIs, one at the edge."""
    class SR2(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = ConvStack(3)

        def forward(self, x):
            return self.body(torch.nn.functional.interpolate(x, scale_factor=2, mode="bicubic"))

    img = rng.randint(0, 256, (96, 128, 3)).astype(np.uint8)
    rois = [(8, 8, 16), (40, 64, 16, 24), (80, 112, 16)]
    own, crop = both(SR2(), img, task="SR", scale=2, rois=rois, coarse=2, fine=2, patches=bank, seed=5)
    assert own[0].extra["locality"]["windows"]["used"], own[0].extra["locality"]["windows"]
    for a, b in zip(own, crop):
        assert_same_samples(a.samples_coarse, b.samples_coarse, what="coarse samples")
        assert_same_samples(a.effect, b.effect, what="effects")


def test_a_global_model_keeps_no_windows(image, bank):
    class Global(torch.nn.Module):
        def forward(self, x):
            return x * 0.9 + 0.1 * x.mean(dim=(2, 3), keepdim=True)

    res = cem_fast.causal_effect_map(Global(), image, task="DN", roi=(40, 36, 16), coarse=1, fine=0, patches=bank)
    info = res.extra["locality"]["windows"]
    assert not info["used"] and info["reason"] == "one pixel's change reaches the edge of the crop", info
    assert res.extra["plan"]["windows"] == "crop"


def test_the_composition_is_checked_against_the_crop(image, bank, monkeypatch):
    """A spread measured too small (a model whose reach the one-pixel probe underestimates) must be caught by the
    verification and the run must keep the crop, with the reason."""
    from cem_fast.pipeline.engines import windows
    monkeypatch.setattr(windows, "spread_of", lambda plan, region: Spread(1, 1, 1, 1))
    res = cem_fast.causal_effect_map(ConvStack(4), image, task="DN", roi=(40, 36, 16), coarse=1, fine=0,
                                     patches=bank, windows="on")
    info = res.extra["locality"]["windows"]
    assert not info["used"] and "differ from the crop's" in info["reason"], info


class Recording(ConvStack):
    """ConvStack that records, for each forward, whether its input holds NaN and cuDNN's flags at that moment."""

    def __init__(self, n):
        super().__init__(n)
        self.seen = []

    def forward(self, x):
        self.seen.append((bool(torch.isnan(x).any()), torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark))
        return super().forward(x)


def test_nan_probes_run_without_cudnn_and_no_forward_autotunes(image, bank, monkeypatch):
    """The probes (NaN in the input) run with cuDNN off: its Winograd/FFT tiles would smear one NaN over a tile
    and the measured spread would exceed the reach, refusing the windows and the engine on a GPU without an error.
    A user's ``cudnn.benchmark = True`` is off during every forward of the run (the shapes vary from batch to
    batch: each new one would be autotuned), and both flags are the user's again afterwards."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    model = Recording(4)
    res = cem_fast.causal_effect_map(model, image, task="DN", roi=(40, 36, 16), coarse=1, fine=0, patches=bank,
                                     windows="on")
    assert res.extra["locality"]["windows"]["used"]
    probes = [s for s in model.seen if s[0]]
    assert probes and all(not enabled for _, enabled, _ in probes), probes
    assert any(enabled for nan, enabled, _ in model.seen if not nan)  # the samples keep cuDNN
    assert not any(bench for _, _, bench in model.seen), model.seen
    assert torch.backends.cudnn.benchmark is True and torch.backends.cudnn.enabled is True


# ---- what the windows compose and what they refuse -------------------------------------------------------------------

def test_nan_in_a_window_outside_the_changed_rectangle_is_still_the_models(image32, bank256):
    """A flaky model's NaN that falls in a ROI but outside the part an intervention changes is its output's all the
    same: reported, not composed away."""
    model = NaNEveryThird()
    model.calls = 1  # its phase: the NaN falls on batches of interventions, not on Y(I)'s or the probe's forwards
    with pytest.raises(ValueError, match=r"NaNEveryThird produced NaN/Inf outputs in the ROI for \d+ coarse "
                                         r"interventions \(first: block \(\d+, \d+\), draw \d\)"):
        cem_fast.causal_effect_map(model, np.tile(image32, (2, 2, 1))[:48, :48], task="DN", sigma=25,
                                   roi=(16, 16, 8), patches=bank256, windows="on")


def test_probes_that_disagree_are_named_not_an_overflowed_window():
    """A block that the reach map says meets a ROI but whose measured spread changes none (a model whose probe
    forwards disagree) was given a window of height about -2**63 ('window_size [-9223372036854775805, ...]')."""
    from types import SimpleNamespace

    from cem_fast.geometry import ROI, BlockGrid
    from cem_fast.pipeline.engines.windows import Spread, block_windows
    grid = BlockGrid(64, 64, 8)
    reach = np.zeros((1, grid.rows, grid.cols), dtype=bool)
    reach[0, 0, 0] = reach[0, 7, 7] = True  # (7, 7) lies far from the ROI at (0, 0) for a spread of 2 px
    plan = SimpleNamespace(grid=grid, task=SimpleNamespace(scale=1), rois=[ROI(0, 0, 8, 8)],
                           locality=SimpleNamespace(reach=reach))
    with pytest.raises(ValueError, match=r"block \(row 7, col 7\) was measured to reach a ROI.*locality=off"):
        block_windows(plan, Spread(2, 2, 2, 2))
    reach[0, 7, 7] = False
    assert block_windows(plan, Spread(2, 2, 2, 2)).inputs.min() >= 0
