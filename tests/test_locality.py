"""Locality (speed mode): probing finds exactly the blocks a model can reach, cropping changes no sample beyond
round-off, models that are not local are detected and run whole, and many ROIs share one set of forwards."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cem_fast
from cem_fast.locality import Window, plan_locality
from cem_fast.geometry import ROI, BlockGrid
from cem_fast.patches import PatchBank
from helpers import probe, reach_from_radius, tight_window
from model_factories import ConvStack


class GlobalMean(torch.nn.Module):
    """A global path: every output pixel depends on the image mean (like channel attention)."""

    def forward(self, x):
        return 0.8 * x + 0.2 * x.mean(dim=(2, 3), keepdim=True)


class HidesNaN(torch.nn.Module):
    def forward(self, x):
        return torch.nan_to_num(x * 0.9, nan=0.5)


class FixedSize(torch.nn.Module):
    def forward(self, x):
        if x.shape[-2:] != (40, 48):
            raise RuntimeError("this model only takes 40x48 inputs")
        return x * 0.9


class FarCorner(torch.nn.Module):
    """Local plus one far region: every pixel also depends on the top-left 4x4 corner."""

    def forward(self, x):
        return x * 0.9 + 0.1 * x[..., :4, :4].mean(dim=(2, 3), keepdim=True)


class Mirror(torch.nn.Module):
    """Depends on the mirrored position: on a crop it reads other pixels than on the whole image."""

    def forward(self, x):
        return x * 0.9 + 0.1 * x.flip(-1)


@pytest.mark.parametrize("n,dilation,block,roi", [
    (2, 1, 8, (5, 9, 6, 10)),        # radius 2
    (3, 6, 4, (40, 44, 8, 8)),       # radius 18 > the first window's 16-px margin: the window must grow
    (2, 1, 8, (0, 0, 8, 8)),         # ROI on the top-left border
    (2, 3, 8, (64, 88, 16, 8)),      # ROI on the bottom-right border
])
def test_probe_finds_exactly_the_blocks_within_the_receptive_field(n, dilation, block, roi):
    plan, grid = probe(ConvStack(n, dilation), (80, 96), block, [roi])
    want = reach_from_radius(grid, ROI.parse(roi), n * dilation)
    assert plan.active and np.array_equal(plan.reach[0], want), plan.info
    if dilation == 6:
        assert plan.info["probe_rounds"] >= 2
    assert plan.window == tight_window(ROI.parse(roi), n * dilation, 80, 96)


class Multiple8(ConvStack):
    """A local model that only runs on sizes that are multiples of 8 (like a U-Net with three poolings)."""

    def forward(self, x):
        if x.shape[-2] % 8 or x.shape[-1] % 8:
            raise RuntimeError(f"input sizes must be multiples of 8, got {tuple(x.shape[-2:])}")
        return super().forward(x)


def test_a_model_that_refuses_the_tight_crop_gets_the_block_aligned_one():
    plan, grid = probe(Multiple8(2), (80, 96), 8, [(40, 44, 8, 8)])
    assert plan.active and plan.window == Window(32, 40, 24, 16)  # blocks 4-6 x 5-6: radius 2 around the ROI
    assert "RuntimeError: input sizes must be multiples of 8, got (12, 12)" in plan.info["tight_crop_refused"]


def test_probe_cost_follows_the_receptive_field_not_the_image():
    small, _ = probe(ConvStack(2), (64, 64), 8, [(24, 24, 8)])
    large, _ = probe(ConvStack(2), (512, 512), 8, [(240, 240, 8)])
    assert large.info["probe_forwards"] <= small.info["probe_forwards"] + 4
    assert large.info["probe_window"][2] <= 80


@pytest.mark.parametrize("model,width,reason", [
    (GlobalMean(), 48, "every block reaches the ROI"),
    (HidesNaN(), 48, "hides NaN"),
    (FixedSize(), 48, "failed on a crop"),
    (Mirror(), 160, "not a rectangle"),  # the mirrored block lies outside the probe window
])
def test_models_that_are_not_local_run_whole_and_say_why(model, width, reason):
    plan, grid = probe(model, (40, width), 8, [(16, 24, 8)])
    assert not plan.active and plan.reach.all() and plan.window is None
    assert reason in plan.info["reason"]


def test_a_far_dependency_is_found_and_kept():
    plan, grid = probe(FarCorner(), (40, 96), 8, [(16, 40, 8)])
    want = np.zeros((5, 12), bool)
    want[np.ix_([0, 2], [0, 5])] = True  # the corner block and the ROI's own block (rows x columns)
    assert plan.active and np.array_equal(plan.reach[0], want)
    assert plan.window.as_list() == [0, 0, 24, 48]


class Lopsided(torch.nn.Module):
    """Reads 3 px up and left, 1 px down and right of each output pixel: a spread that differs per side."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 5)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=torch.Generator().manual_seed(1)))

    def forward(self, x):
        return x + 0.1 * self.conv(torch.nn.functional.pad(x, (3, 1, 3, 1)))


class Upscale2(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = ConvStack(3)

    def forward(self, x):
        return self.body(torch.nn.functional.interpolate(x, scale_factor=2, mode="bicubic"))


GRID_16 = [(y, x, 16) for y in range(0, 80, 16) for x in range(0, 96, 16)]


@pytest.mark.parametrize("model,scale,rois", [
    (ConvStack(2), 1, GRID_16),
    (ConvStack(3, 3), 1, GRID_16),                             # radius 9: reaches a block further
    (Lopsided(), 1, [(0, 0, 8), (40, 44, 8, 16), (72, 88, 8)]),  # corners and a ROI off the block grid
    (Upscale2(), 2, [(16, 24, 16), (100, 140, 24, 16), (144, 176, 16)]),
])
def test_many_rois_take_their_reach_from_one_block_and_equal_their_single_probes(model, scale, rois):
    shape = (80, 96)
    many, grid = probe(model, shape, 8, rois, scale=scale)
    assert many.info["reach_from"] == "one block's spread, verified per ROI", many.info
    for j, roi in enumerate(rois):
        single, _ = probe(model, shape, 8, [roi], scale=scale)
        assert np.array_equal(many.reach[j], single.reach[0]), (j, roi)


def test_the_block_spread_costs_a_window_per_roi_not_the_union_per_block_row(monkeypatch):
    import cem_fast.locality as locality
    fast, _ = probe(ConvStack(2), (160, 160), 8, [(y, x, 16) for y in range(0, 160, 16) for x in range(0, 160, 16)])

    def refuse(*args, **kwargs):
        raise locality.NoLocality("refused by the test")
    monkeypatch.setattr(locality, "_plan_from_block_spread", refuse)
    union, _ = probe(ConvStack(2), (160, 160), 8, [(y, x, 16) for y in range(0, 160, 16) for x in range(0, 160, 16)])
    assert union.info.get("block_spread_refused") == "refused by the test", union.info
    assert np.array_equal(fast.reach, union.reach) and fast.window == union.window
    # 100 ROIs: a window of 8x8 blocks at most each, against 40 probe rows/columns and 100 verifications of 160x160
    assert fast.info["probe_forwards"] <= 100 + 4 and union.info["probe_forwards"] >= 140


def test_a_model_that_treats_blocks_differently_gets_the_union_probe():
    """FarCorner reads the top-left corner of whatever input it is given: NaN in a ROI's verification window
    (its corner) reaches the ROI, so the union is probed and finds the corner block."""
    plan, grid = probe(FarCorner(), (40, 96), 8, [(16, 40, 8), (24, 72, 8)])
    assert "does not treat every block alike" in plan.info["block_spread_refused"]
    assert plan.info["reach_from"] == "the union's row and column probe"
    assert plan.reach[0, 0, 0] and plan.reach[1, 0, 0] and plan.reach[0, 2, 5] and plan.reach[1, 3, 9]


@pytest.fixture
def bank(rng):
    return PatchBank(torch.from_numpy(rng.randint(0, 256, (32, 3, 8, 8)).astype(np.uint8)))


@pytest.fixture
def image(rng):
    return rng.randint(0, 256, (48, 64, 3)).astype(np.uint8)


@pytest.mark.parametrize("task,model,opts", [
    ("DN", ConvStack(2), dict(sigma=30)),
    ("DR", ConvStack(2, 2), dict(rain_seed=3)),
    ("SR", "bicubic", dict(scale=4)),
])
def test_speed_mode_equals_exact_mode(task, model, opts, image, bank):
    args = dict(task=task, roi=(16, 24, 16), block=8, coarse=2, fine=3, tol=0.0, patches=bank, seed=5, **opts)
    exact = cem_fast.causal_effect_map(model, image, locality="off", **args)
    fast = cem_fast.causal_effect_map(model, image, locality="auto", **args)
    loc = fast.extra["locality"]
    assert loc["active"] and loc["skipped_blocks"] > 0 and fast.num_forwards < exact.num_forwards
    reach = fast.reachable
    assert fast.psnr_origin == pytest.approx(exact.psnr_origin, abs=1e-4)
    # reachable blocks: the same draws, so the same samples (to the round-off of a different input size)
    np.testing.assert_allclose(fast.samples_coarse[reach], exact.samples_coarse[reach], atol=1e-3)
    # unreachable blocks: exact mode measures no effect at all; speed mode writes Y(I) without running them
    np.testing.assert_allclose(exact.samples_coarse[~reach], exact.psnr_origin, atol=1e-9)
    assert np.all(fast.cem[~reach] == 0) and np.all(exact.cem[~reach] == 0)
    np.testing.assert_allclose(fast.cem, exact.cem, atol=1e-3)


def test_many_rois_share_the_forwards_and_equal_single_runs(image, bank):
    rois = [(8, 8, 8), (16, 24, 16), (32, 48, 8, 16)]
    args = dict(task="DN", sigma=30, block=8, coarse=2, fine=3, patches=bank, seed=2, locality="off")
    multi = cem_fast.causal_effect_maps(ConvStack(2), image, rois=rois, **args)
    assert len(multi) == 3 and multi[0].num_forwards == multi[2].num_forwards
    singles = [cem_fast.causal_effect_map(ConvStack(2), image, roi=r, **args) for r in rois]
    assert multi[0].num_forwards < sum(s.num_forwards for s in singles)
    for m, s in zip(multi, singles):
        assert m.roi == s.roi
        assert m.psnr_origin == pytest.approx(s.psnr_origin, abs=1e-9)
        np.testing.assert_allclose(m.samples_coarse, s.samples_coarse, atol=1e-4)
        assert np.array_equal(m.gated, s.gated)
        np.testing.assert_allclose(m.cem, s.cem, atol=1e-4)


def test_many_rois_with_locality_equal_single_runs(image, bank):
    rois = [(8, 8, 8), (32, 48, 8, 16)]
    args = dict(task="DN", sigma=30, block=8, coarse=2, fine=3, patches=bank, seed=2)
    multi = cem_fast.causal_effect_maps(ConvStack(2), image, rois=rois, **args)
    for m, r in zip(multi, rois):
        s = cem_fast.causal_effect_map(ConvStack(2), image, roi=r, **args)
        assert np.array_equal(m.reachable, s.reachable)
        np.testing.assert_allclose(m.cem, s.cem, atol=1e-3)


def test_roi_grid_gives_every_tile(image, bank):
    res = cem_fast.causal_effect_maps(ConvStack(2), image, roi_grid=16, task="DN", coarse=1, fine=0,
                                      patches=bank)
    assert [r.roi.as_tuple() for r in res] == [(y, x, 16, 16) for y in (0, 16, 32) for x in (0, 16, 32, 48)]
    assert res.summary()["rois"][5]["roi"] == {"y": 16, "x": 16, "height": 16, "width": 16}


def test_multi_roi_results_save_folders_index_and_sheet(image, bank, tmp_path):
    res = cem_fast.causal_effect_maps(ConvStack(2), image, rois=[(8, 8, 8), (16, 24, 16)], task="DN", coarse=1,
                                      fine=2, patches=bank)
    res.save(tmp_path)
    import json
    idx = json.loads((tmp_path / "rois.json").read_text())
    assert [e["folder"] for e in idx["rois"]] == ["roi_000_y8_x8_8x8", "roi_001_y16_x24_16x16"]
    assert (tmp_path / "maps.png").is_file() and (tmp_path / "roi_001_y16_x24_16x16" / "cem.png").is_file()
    assert idx["locality"]["mode"] == "auto"


def test_large_input_runs_without_a_full_size_forward(bank):
    """1088x1088 (above the full-forward limit): probe, crop and verification on the ROI's window; the samples
    of a block equal a direct full-image computation."""
    rng = np.random.RandomState(7)
    img = rng.randint(0, 256, (1088, 1088, 3)).astype(np.uint8)
    calls = []

    class Recording(ConvStack):
        def forward(self, x):
            calls.append(tuple(x.shape[-2:]))
            return super().forward(x)

    model = Recording(2)
    roi = (520, 560, 16)
    res = cem_fast.causal_effect_map(model, img, task="identity", roi=roi, coarse=2, fine=0, patches=bank, seed=1)
    loc = res.extra["locality"]
    assert loc["active"] and loc["verified_against"].startswith("the ROIs' windows")
    assert max(h * w for h, w in calls) < 200 * 200  # never the full 1088x1088 input
    assert res.reachable.sum() == 16 and res.output.shape == (3, 1088, 1088)
    # one block, recomputed by hand on the whole image
    r, c = 66, 71
    assert res.reachable[r, c]
    block = r * res.cem.shape[1] + c
    ids = torch.tensor([block * (1 << 20)])
    p = cem_fast.rng.patch_draws(1, ids, len(bank))[0]
    x = torch.from_numpy(img).permute(2, 0, 1).float().clone()
    x[:, r * 8:r * 8 + 8, c * 8:c * 8 + 8] = bank.patches[p].float()
    with torch.inference_mode():
        out = ConvStack(2)(x[None, :, 480:620, 520:660] / 255)[0]  # a window holding the receptive field
    q = torch.round(out.clamp(0, 1) * 255)[:, 40:56, 40:56].double()
    mse = ((q - torch.from_numpy(img[520:536, 560:576]).permute(2, 0, 1).double()) ** 2).mean()
    assert res.samples_coarse[r, c, 0] == pytest.approx(10 * math.log10(255 ** 2 / float(mse)), abs=1e-6)


def test_channel_attention_runs_whole():
    """RCAN's channel attention pools the whole image: nothing may be skipped or cropped."""
    from cem_fast.models import RCAN
    torch.manual_seed(0)
    rcan = RCAN(num_feat=8, num_group=1, num_block=1, squeeze_factor=4, upscale=2).eval()
    plan, _ = probe(rcan, (24, 32), 8, [(16, 24, 8)], scale=2)
    assert not plan.active and plan.reach.all()


@pytest.mark.parametrize("block", [4, 8])
def test_shifted_window_attention_speed_mode_equals_exact_mode(block, bank):
    """SwinIR's windows are anchored at the image origin: a crop is exact only where it keeps the window grid
    (window 8: 8-px blocks do, 4-px blocks may not). Whatever locality decides, the samples must not change."""
    from cem_fast.models import SwinIR
    torch.manual_seed(0)
    swin = SwinIR(8, 3, 12, (2,), (2,), 8, 2.0, 1, 1.0, "", 8).eval()
    img = np.random.RandomState(3).randint(0, 256, (48, 64, 3)).astype(np.uint8)
    args = dict(task="identity", roi=(24, 32, 8), block=block, coarse=1, fine=0, patches=bank, seed=1)
    fast = cem_fast.causal_effect_map(swin, img, **args)
    exact = cem_fast.causal_effect_map(swin, img, locality="off", **args)
    loc = fast.extra["locality"]
    if block == 8:
        assert loc["active"] and loc["crop"] is not None and loc["crop"][0] % 8 == 0 and loc["crop"][1] % 8 == 0
        assert "differs from the full input" in loc["tight_crop_refused"]  # the pixel-tight crop breaks the grid
    else:  # the crop starts at a multiple of 4 only: the check against the full input catches the other windows
        assert not loc["active"] and "differs from the full input" in loc["reason"]
    reach = fast.reachable
    np.testing.assert_allclose(fast.samples_coarse[reach], exact.samples_coarse[reach], atol=1e-3)
    np.testing.assert_allclose(exact.samples_coarse[~reach], exact.psnr_origin, atol=1e-9)


def test_probe_builds_its_inputs_a_batch_at_a_time():
    sizes = []

    class Counting(ConvStack):
        def forward(self, x):
            sizes.append(x.shape[0])
            return super().forward(x)

    base = torch.rand(3, 64, 64)
    grid = BlockGrid(64, 64, 8)
    with torch.inference_mode():
        plan = plan_locality(Counting(2), base, grid, [ROI(24, 24, 8, 8)], batch_size=3)
    assert plan.active and max(sizes) <= 3 and sum(sizes) == plan.info["probe_forwards"]


def test_exhaustive_mode_with_locality_equals_exact_mode(image, bank):
    args = dict(task="DN", sigma=30, roi=(16, 24, 16), mode="exhaustive", samples=3, patches=bank, seed=4)
    fast = cem_fast.causal_effect_map(ConvStack(2), image, **args)
    exact = cem_fast.causal_effect_map(ConvStack(2), image, locality="off", **args)
    assert fast.extra["locality"]["skipped_blocks"] > 0 and fast.gated.all() and exact.gated.all()
    np.testing.assert_allclose(fast.samples_fine, exact.samples_fine, atol=1e-3)  # skipped blocks: Y(I) exactly
    np.testing.assert_allclose(fast.cem, exact.cem, atol=1e-3)


# ---- property test (hypothesis): any conv stack, image size and ROI --------------------------------------------------

@settings(max_examples=25, deadline=None, derandomize=True)
@given(n=st.integers(1, 3), dilation=st.integers(1, 3), block=st.sampled_from([4, 8]),
       h=st.integers(16, 72), w=st.integers(16, 72), data=st.data())
def test_probe_reach_is_the_receptive_field(n, dilation, block, h, w, data):
    """Any conv stack, image size (partial edge blocks included) and ROI: the probed reach is exactly the blocks
    within the receptive field, and the plan is verified."""
    from helpers import probe, reach_from_radius, tight_window
    from model_factories import ConvStack
    rh, rw = data.draw(st.integers(1, h)), data.draw(st.integers(1, w))
    y, x = data.draw(st.integers(0, h - rh)), data.draw(st.integers(0, w - rw))
    plan, grid = probe(ConvStack(n, dilation), (h, w), block, [(y, x, rh, rw)])
    want = reach_from_radius(grid, ROI(y, x, rh, rw), n * dilation)
    assert np.array_equal(plan.reach[0], want), plan.info
    crop = tight_window(ROI(y, x, rh, rw), n * dilation, h, w, step=dilation)
    whole = (crop.h, crop.w) == (h, w)  # every pixel needed: nothing to gain
    assert plan.window == (None if whole else crop) and plan.active == (not want.all() or not whole)
