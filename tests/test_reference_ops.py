"""The torch reference ops against naive Python loops and closed forms."""
import math

import pytest
import torch

from cem_fast import ops, rng
from cem_fast.geometry import ROI
from cem_fast.reference import intervene_ref, roi_psnr_ref, roi_sq_err_ref
from helpers import naive_intervene, random_case


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_intervene_matches_naive_paste(seed):
    base, patches, idx, origins, sizes = random_case(seed)
    got = intervene_ref(base, patches, idx, origins, sizes)
    want = naive_intervene(base, patches, idx, origins, sizes).float()
    assert torch.equal(got, want), (got - want).abs().max()


def test_intervene_noise_and_rain_match_naive():
    base, patches, idx, origins, sizes = random_case(5)
    ids = torch.arange(len(idx)) * 3 + 11
    key = rng.stream_key(7, ids)
    pb = patches.shape[-1]
    counter = torch.arange(3 * pb * pb).view(3, pb, pb)
    # gaussian12 in units of 2^-16, times 30: noise in grey levels (exact in float64)
    noise = [rng.gaussian12(key[k], counter).double() * 30.0 / 65536 for k in range(len(idx))]
    got = intervene_ref(base, patches, idx, origins, sizes, ids=ids, seed=7, noise_sigma=30.0)
    want = naive_intervene(base, patches, idx, origins, sizes, noise=noise).float()
    assert torch.equal(got, want)
    rain = torch.rand(base.shape, generator=torch.Generator().manual_seed(3)) * 200
    got = intervene_ref(base, patches, idx, origins, sizes, rain=rain)
    want = naive_intervene(base, patches, idx, origins, sizes, rain=rain).float()
    assert torch.equal(got, want)


def test_intervene_writes_crops_of_the_input():
    base, patches, idx, origins, sizes = random_case(9, h=16, w=16, K=5)
    windows = torch.tensor([[0, 0], [2, 3], [8, 8], [5, 0], [0, 9]])
    got = intervene_ref(base, patches, idx, origins, sizes, window_origins=windows, window_size=(7, 6))
    want = naive_intervene(base, patches, idx, origins, sizes, windows=windows.tolist(), wsize=(7, 6)).float()
    assert got.shape == (5, 3, 7, 6)
    assert torch.equal(got, want)


def test_intervene_into_channels_last_buffer():
    base, patches, idx, origins, sizes = random_case(4)
    out = torch.full((len(idx), 3, 13, 11), float("nan")).contiguous(memory_format=torch.channels_last)
    intervene_ref(base, patches, idx, origins, sizes, out=out)
    assert torch.equal(out, naive_intervene(base, patches, idx, origins, sizes).float())


def test_noise_statistics_and_independence():
    K, pb = 400, 8
    patches = torch.full((1, 3, pb, pb), 128, dtype=torch.uint8)
    base = torch.zeros(3, pb, pb)
    ids = torch.arange(K)
    out = intervene_ref(base, patches, torch.zeros(K, dtype=torch.long), torch.zeros(K, 2, dtype=torch.long),
                        torch.full((K, 2), pb), ids=ids, seed=0, noise_sigma=25.0) * 255
    d = out.double() - 128
    # truncation lowers the mean by ~0.5; sigma 25 is far from the clip bounds
    assert abs(d.mean().item() + 0.5) < 0.2, d.mean()
    assert abs(d.std().item() - 25.0) < 0.5, d.std()
    flat = d.view(K, -1)
    corr = torch.corrcoef(torch.stack([flat[:-1].reshape(-1), flat[1:].reshape(-1)]))[0, 1]
    assert abs(corr.item()) < 0.02  # neighbouring interventions draw independent noise


def test_rng_is_keyed_by_seed_and_id():
    c = torch.arange(1000)
    a = rng.gaussian12(rng.stream_key(0, torch.tensor([5])), c)
    assert torch.equal(a, rng.gaussian12(rng.stream_key(0, torch.tensor([5])), c))
    assert not torch.equal(a, rng.gaussian12(rng.stream_key(1, torch.tensor([5])), c))
    assert not torch.equal(a, rng.gaussian12(rng.stream_key(0, torch.tensor([6])), c))
    u = rng.uniform_from_counter(rng.stream_key(3, torch.tensor([0])), torch.arange(100000))
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.005


def test_gaussian12_moments():
    z = rng.gaussian12(rng.stream_key(11, torch.tensor([4])), torch.arange(200000)).double() / 65536
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    kurt = ((z - z.mean()) ** 4).mean() / z.var() ** 2
    assert 2.85 < kurt.item() < 2.95  # Irwin-Hall(12): 3 - 1.2 / 12 = 2.9
    assert z.abs().max() <= 6


def _gt(seed=0, size=(3, 6, 5)):
    return torch.randint(20, 230, size, generator=torch.Generator().manual_seed(seed)).to(torch.uint8)


@pytest.mark.parametrize("offset", [1, 3, 10])
def test_roi_psnr_closed_form_offset(offset):
    gt = _gt()
    roi = ROI(2, 1, 4, 3)
    out = ((gt.double() + offset) / 255).float().unsqueeze(0)
    target = gt[:, 2:6, 1:4]
    got = roi_psnr_ref(out, target, roi)
    assert got.dtype == torch.float64
    assert abs(got.item() - 20 * math.log10(255 / offset)) < 1e-9


def test_roi_psnr_uses_the_uint8_convention():
    gt = _gt(1)
    roi = ROI(0, 0, 6, 5)
    # +0.4 of a level rounds back to the GT: an exact match is inf dB
    assert math.isinf(roi_psnr_ref(((gt.double() + 0.4) / 255).float()[None], gt, roi).item())
    # values above 1 clamp to 255: error 255 - g per pixel
    out = torch.full((1, 3, 6, 5), 1.7)
    mse = ((255.0 - gt.double()) ** 2).mean().item()
    assert abs(roi_psnr_ref(out, gt, roi).item() - 10 * math.log10(255 ** 2 / mse)) < 1e-9


def test_roi_psnr_reads_only_the_roi():
    gt = _gt(2, (3, 10, 10))
    roi = ROI(3, 4, 5, 2)
    out = torch.rand(4, 3, 10, 10)
    poisoned = out.clone()
    mask = torch.ones(10, 10, dtype=torch.bool)
    mask[3:8, 4:6] = False
    poisoned[:, :, mask] = float("nan")
    target = gt[:, 3:8, 4:6]
    assert torch.equal(roi_sq_err_ref(out, target, roi), roi_sq_err_ref(poisoned, target, roi))
    assert torch.equal(ops.roi_psnr(out, target, roi, backend="torch"), roi_psnr_ref(out, target, roi))


def test_dispatch_explains_unavailable_backends():
    assert ops.resolve_backend("auto", torch.device("cpu")) in ("cpp", "torch")
    assert ops.resolve_backend("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.resolve_backend("fast", torch.device("cpu"))


def test_dispatch_env_override(monkeypatch):
    monkeypatch.setenv("CEM_FAST_BACKEND", "torch")
    assert ops.resolve_backend(None, torch.device("cpu")) == "torch"


def test_multi_roi_reduction_equals_one_roi_at_a_time():
    from cem_fast.reference import roi_grid, roi_sq_err_multi_ref
    g = torch.Generator().manual_seed(8)
    out = torch.rand(5, 3, 40, 36, generator=g) * 1.3 - 0.1
    gt = torch.randint(0, 256, (3, 40, 36), generator=g, dtype=torch.uint8)
    rois = roi_grid(40, 36, 8) + [ROI(3, 5, 17, 9), ROI(0, 0, 40, 36), ROI(39, 35, 1, 1)]
    assert len(roi_grid(40, 36, 8)) == 5 * 4
    got = roi_sq_err_multi_ref(out, gt, rois)
    assert got.shape == (5, len(rois))
    for i, r in enumerate(rois):
        ys, xs = r.slices()
        assert torch.allclose(got[:, i], roi_sq_err_ref(out, gt[:, ys, xs], r), rtol=1e-12, atol=1e-6), r


def test_gt_free_form_measures_the_change_of_the_output():
    from cem_fast.reference import quantize_output, roi_sq_err_multi_ref
    g = torch.Generator().manual_seed(9)
    out0 = torch.rand(1, 3, 16, 16, generator=g)
    moved = out0.repeat(3, 1, 1, 1)
    moved[1, :, 2:4, 2:4] += 0.5   # changes pixels inside the first ROI only
    moved[2, :, 12:14, 12:14] -= 0.5  # inside the second ROI only
    ref = quantize_output(out0[0])
    got = roi_sq_err_multi_ref(moved, ref, [ROI(0, 0, 8, 8), ROI(8, 8, 8, 8)])
    assert got[0].eq(0).all()
    assert got[1, 0] > 0 and got[1, 1] == 0 and got[2, 0] == 0 and got[2, 1] > 0


def test_multi_roi_op_dispatches_per_op():
    import cem_fast
    out = torch.rand(2, 3, 16, 16)
    gt = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    got = cem_fast.roi_sq_err_multi(out, gt, cem_fast.roi_grid(16, 16, 8))
    assert got.shape == (2, 4)
    assert ops.resolve_backend("auto", torch.device("cpu"), "roi_sq_err_multi") == \
        ops.resolve_backend("auto", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="has no no_such_op kernel yet"):
        ops.resolve_backend("torch", torch.device("cpu"), "no_such_op")


def test_multi_roi_nan_stays_in_the_rois_that_hold_it():
    from cem_fast.reference import roi_sq_err_multi_ref
    out = torch.rand(2, 3, 16, 16)
    out[0, 0, 2, 2] = float("nan")
    gt = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    got = roi_sq_err_multi_ref(out, gt, [ROI(0, 0, 8, 8), ROI(8, 8, 8, 8), ROI(0, 8, 8, 8)])
    assert torch.isnan(got[0, 0]) and not torch.isnan(got[0, 1:]).any() and not torch.isnan(got[1]).any()


def test_quantisation_rounds_x255_in_float32():
    from cem_fast.reference import quantize_output
    # float32(0.38627452) * 255 rounds to 98.5 in float32 (-> 98, half to even) but is 98.50000036 in float64 (-> 99)
    v = torch.tensor([0.38627452], dtype=torch.float32)
    assert quantize_output(v).item() == 98.0
    assert round(float(v.double()) * 255) == 99
