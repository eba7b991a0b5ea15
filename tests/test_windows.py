"""Intervention-centred windows (issue 14): each intervention runs on the input window that determines the part
of the ROIs it can change; the composed ROI errors are exact, so the maps equal the crop's; verified per run,
refused with a reason where they do not apply."""
import numpy as np
import pytest
import torch

import cem_fast
from cem_fast.patches import PatchBank
from cem_fast.pipeline.windows import Spread
from helpers import ConvStack


@pytest.fixture
def image(rng):
    return rng.randint(0, 256, (96, 96, 3)).astype(np.uint8)


@pytest.fixture
def bank(rng):
    return PatchBank(torch.from_numpy(rng.randint(0, 256, (32, 3, 8, 8)).astype(np.uint8)))


def both(model, image, **kw):
    """The windows and the crop, each alone (the incremental engine, which would take over, is off)."""
    return (cem_fast.causal_effect_maps(model, image, windows="auto", incremental="off", **kw),
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
    np.testing.assert_array_equal(own[0].samples_coarse, crop[0].samples_coarse)
    np.testing.assert_array_equal(own[0].samples_fine, crop[0].samples_fine)
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
        np.testing.assert_array_equal(a.samples_coarse, b.samples_coarse)
        np.testing.assert_array_equal(a.effect, b.effect)


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
    from cem_fast.pipeline import windows
    monkeypatch.setattr(windows, "spread_of", lambda plan, region: Spread(1, 1, 1, 1))
    res = cem_fast.causal_effect_map(ConvStack(4), image, task="DN", roi=(40, 36, 16), coarse=1, fine=0,
                                     patches=bank)
    info = res.extra["locality"]["windows"]
    assert not info["used"] and "differ from the crop's" in info["reason"], info
