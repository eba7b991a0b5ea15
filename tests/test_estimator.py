"""The estimator against a naive loop with the reference's structure, determinism, modes and errors."""
import math

import numpy as np
import pytest
import torch

import cem_fast
from cem_fast.patches import PatchBank
from cem_fast.result import Deferred
from cem_fast.rng import patch_draws
from model_factories import RollBlur


@pytest.fixture
def small_image(rng):
    return rng.randint(0, 256, (20, 28, 3)).astype(np.uint8)  # 20x28: partial edge blocks at block 8


@pytest.fixture
def bank(rng):
    return PatchBank(torch.from_numpy(rng.randint(0, 256, (16, 3, 8, 8)).astype(np.uint8)))


def naive_cem(model, img, bank, roi, block, coarse, fine, tol, seed):
    """One intervention at a time, full output to numpy, PSNR there (the reference's structure)."""
    H, W, _ = img.shape
    rows, cols = math.ceil(H / block), math.ceil(W / block)
    # the documented draw plan: patch of (block, draw) = patch_draws(seed, block * 2^20 + draw)
    blocks = torch.arange(rows * cols).view(rows, cols, 1) * (1 << 20)
    cidx = patch_draws(seed, blocks + torch.arange(coarse), len(bank)).numpy()
    fidx = patch_draws(seed, blocks + coarse + torch.arange(fine), len(bank)).numpy()
    patches = bank.patches.permute(0, 2, 3, 1).numpy()
    y, x, h, w = roi

    def psnr(inp):
        with torch.no_grad():
            out = model(torch.from_numpy(inp).permute(2, 0, 1)[None].float() / 255)[0]
        q = np.round(np.clip(out.permute(1, 2, 0).numpy().astype(np.float64), 0, 1) * 255)
        mse = ((q[y:y + h, x:x + w] - img[y:y + h, x:x + w]) ** 2).mean()
        return 10 * np.log10(255 ** 2 / mse)

    def sample(r, c, p):
        inp = img.copy()
        ph, pw = inp[r * block:(r + 1) * block, c * block:(c + 1) * block].shape[:2]
        inp[r * block:r * block + ph, c * block:c * block + pw] = patches[p][:ph, :pw]
        return psnr(inp)

    y0 = psnr(img)
    sc = np.array([[[sample(r, c, cidx[r, c, k]) for k in range(coarse)] for c in range(cols)] for r in range(rows)])
    gated = (np.abs(y0 - sc) >= tol).any(2)
    sf = np.full((rows, cols, fine), np.nan)
    for r, c in zip(*np.nonzero(gated)):
        sf[r, c] = [sample(r, c, fidx[r, c, k]) for k in range(fine)]
    ce = np.where(gated, y0 - np.nan_to_num(sf).mean(2), y0 - sc.mean(2))
    return y0, sc, sf, gated, np.where(np.abs(ce) >= tol, ce, 0)


@pytest.mark.parametrize("locality", ["off", "auto"])
def test_estimator_matches_the_naive_reference_loop(tiny_net, small_image, bank, locality):
    roi = (5, 9, 6, 10)
    res = cem_fast.causal_effect_map(tiny_net, small_image, task="identity", roi=roi, block=8, coarse=2,
                                     fine=4, tol=0.01, patches=bank, seed=3, batch_size=5, locality=locality)
    y0, sc, sf, gated, cem = naive_cem(tiny_net, small_image, bank, roi, 8, 2, 4, 0.01, 3)
    assert res.psnr_origin == pytest.approx(y0, abs=1e-9)
    np.testing.assert_allclose(res.samples_coarse, sc, atol=2e-3)
    assert np.array_equal(res.gated, gated)
    np.testing.assert_allclose(res.samples_fine, sf, atol=2e-3)  # NaN where not gated, on both sides
    np.testing.assert_allclose(res.cem, cem, atol=2e-3)
    assert gated.sum() > 0 and (~gated).sum() > 0  # both branches exercised
    reach = res.reachable
    if locality == "off":
        assert res.num_forwards == 2 + sc.size + 4 * gated.sum() and reach.all()  # Y(I) at the start and end
    else:  # tiny_net has radius 2: only input rows < 13 and columns < 21 reach the ROI (rows 5-10, cols 9-18)
        want = np.zeros((3, 4), bool)
        want[:2, :3] = True
        assert res.extra["locality"]["active"] and np.array_equal(reach, want)
        assert res.num_forwards == 3 + 2 * reach.sum() + 4 * gated.sum()  # Y(I): full input, crop, crop at the end


def test_dn_counter_input_noise_runs_on_the_run_device(small_image, bank):
    from helpers import counter_noise_by_hand
    res = cem_fast.causal_effect_map(RollBlur(), small_image, task="DN", sigma=25, noise_seed=4, input_noise="counter",
                                     roi=(4, 4, 8), coarse=2, fine=2, patches=bank, seed=1, device="cpu")
    base = counter_noise_by_hand(torch.from_numpy(small_image).permute(2, 0, 1), 25, 4)
    assert res.task["input_noise"] == "counter"
    assert torch.equal(res.degraded, (base * 255).round().to(torch.uint8))
    q = torch.round(RollBlur()(base[None])[0].clamp(0, 1) * 255).double()
    mse = ((q[:, 4:12, 4:12] - torch.from_numpy(small_image).permute(2, 0, 1)[:, 4:12, 4:12].double()) ** 2).mean()
    assert res.psnr_origin == pytest.approx(10 * math.log10(255 ** 2 / mse.item()), abs=1e-9)


def test_samples_do_not_depend_on_the_batch_size(small_image, bank):
    runs = [cem_fast.causal_effect_map(RollBlur(), small_image, task="DN", sigma=25, roi=(4, 4, 8), coarse=2,
                                       fine=3, patches=bank, seed=1, batch_size=b) for b in (1, 7, 64)]
    for r in runs[1:]:
        np.testing.assert_array_equal(r.samples_coarse, runs[0].samples_coarse)
        np.testing.assert_array_equal(r.samples_fine, runs[0].samples_fine)
    other = cem_fast.causal_effect_map(RollBlur(), small_image, task="DN", sigma=25, roi=(4, 4, 8), coarse=2,
                                       fine=3, patches=bank, seed=2, batch_size=7)
    assert not np.array_equal(other.samples_coarse, runs[0].samples_coarse)


def test_conv_model_samples_agree_across_batch_sizes_to_round_off(tiny_net, small_image, bank):
    # oneDNN may pick other algorithms per batch size: an output can land on the other side of a uint8 level
    a, b = (cem_fast.causal_effect_map(tiny_net, small_image, task="DN", roi=(4, 4, 8), coarse=2, fine=3,
                                       patches=bank, seed=1, batch_size=bs) for bs in (1, 64))
    np.testing.assert_allclose(a.samples_coarse, b.samples_coarse, atol=2e-3)


def test_exhaustive_mode_samples_every_block(tiny_net, small_image, bank):
    res = cem_fast.causal_effect_map(tiny_net, small_image, task="identity", roi=(0, 0, 8), mode="exhaustive",
                                     samples=3, patches=bank, tol=0.0)
    assert res.samples_coarse.shape == (3, 4, 0) and res.samples_fine.shape == (3, 4, 3)
    assert not np.isnan(res.samples_fine).any() and res.gated.all()
    np.testing.assert_allclose(res.effect, (res.psnr_origin - res.samples_fine).mean(2))


def test_sr_cem_with_bicubic_and_a_custom_task(small_image, bank):
    img = small_image[:16, :24]
    res = cem_fast.causal_effect_map("bicubic", img, task="SR", scale=4, roi=(4, 8, 8), patches=bank, fine=3)
    assert res.cem.shape == (2, 3) and res.output.shape == (3, 16, 24)
    pool = cem_fast.CustomTask(lambda x: torch.nn.functional.avg_pool2d(x, 2), scale=2)
    res = cem_fast.causal_effect_map(cem_fast.models.Bicubic(2), img, task=pool, roi=(4, 8, 8), patches=bank,
                                     fine=3)
    assert res.cem.shape == (2, 3) and res.task["task"] == "custom"


def test_a_large_input_holds_samples_of_the_blocks_that_ran(rng):
    """512x512 at block 4: 16,384 blocks, of which tiny_net-like locality lets a handful reach the ROI. The sample
    arrays are made on first read, and then hold Y(I) (coarse) and NaN (fine) for every block that did not run."""
    img = rng.randint(0, 256, (512, 512, 3)).astype(np.uint8)
    model = torch.nn.Conv2d(3, 3, 3, padding=1)
    bank = PatchBank(torch.from_numpy(rng.randint(0, 256, (8, 3, 4, 4)).astype(np.uint8)))
    res = cem_fast.causal_effect_map(model, img, task="identity", roi=(256, 256, 8), block=4, coarse=2, fine=3,
                                     patches=bank, seed=0)
    assert isinstance(res.__dict__["_samples_fine"], Deferred)
    reach = res.reachable
    # 4x4 blocks: ROI + ring; Y(I) on the full input, the crop, and the crop again at the end
    assert reach.sum() == 16 and res.num_forwards == 3 + 2 * 16 + 3 * res.gated.sum()
    sc, sf = res.samples_coarse, res.samples_fine
    assert sc.shape == (128, 128, 2) and sf.shape == (128, 128, 3)
    assert (sc[~reach] == res.psnr_origin).all() and np.isnan(sf[~res.gated]).all()
    assert np.isfinite(sf[res.gated]).all() and not (sc[reach] == res.psnr_origin).all()


class WrongScale(torch.nn.Module):
    def forward(self, x):
        return x[:, :, ::2, ::2]


class NaNNet(torch.nn.Module):
    def forward(self, x):
        return torch.where(x.mean() > -1, x * float("nan"), x)


class Raises(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(roi=(30, 0, 8)), ValueError, r"must lie inside the 20x28 output"),
    (dict(task="SR", scale=3, block=8), ValueError, "multiple of the scale"),
    (dict(block=-8), ValueError, "block must be a positive integer"),
    (dict(coarse=0), ValueError, "coarse must be a positive integer"),
    (dict(tol=-1), ValueError, "tol must be a non-negative"),
    (dict(mode="fast"), ValueError, "mode must be one of"),
    (dict(model=WrongScale()), ValueError, r"output must be \(1, 3, 20, 28\)"),
    (dict(model=NaNNet()), ValueError, "NaN/Inf values on the unintervened"),
    (dict(model=Raises()), RuntimeError, "raised on the"),
    (dict(image=np.zeros((5, 5))), ValueError, r"image array must be \(H, W, 3\)"),
    (dict(image="/nonexistent.png"), ValueError, "does not exist"),
])
def test_bad_arguments_give_one_line_errors(tiny_net, small_image, bank, kwargs, err, match):
    args = dict(model=tiny_net, image=small_image, task="identity", roi=(0, 0, 8), patches=bank, fine=2)
    args.update(kwargs)
    with pytest.raises(err, match=match) as e:
        cem_fast.causal_effect_map(**args)
    assert "\n" not in str(e.value)


def test_a_missing_roi_is_an_error_not_the_demo_roi(small_image, tiny_net):
    with pytest.raises(ValueError, match=r"roi is required: \(y, x, size\)"):
        cem_fast.causal_effect_map(tiny_net, small_image, task="identity")
