"""roi_sq_err (one ROI, and the ROI PSNR made from it) and roi_sq_err_multi (many ROIs from one pass): the torch
reference against closed forms and one ROI at a time, then every backend that can run here against the reference,
bit for bit (CUDA ones on a GPU)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cem_fast
from cem_fast import ops, reference, triton_ops
from cem_fast.geometry import ROI
from cem_fast.reference import quantize_output, roi_grid, roi_psnr_ref, roi_sq_err_multi_ref, roi_sq_err_ref
from helpers import (CPU_BACKENDS, GPU_BACKENDS, hypothesis_settings, in_layout, interpreted, multi_roi_case,
                     random_gt)


# --- one ROI: the reference against closed forms ----------------------------------------------------------------

@pytest.mark.parametrize("offset", [1, 3, 10])
def test_roi_psnr_closed_form_offset(offset):
    gt = random_gt()
    roi = ROI(2, 1, 4, 3)
    out = ((gt.double() + offset) / 255).float().unsqueeze(0)
    target = gt[:, 2:6, 1:4]
    got = roi_psnr_ref(out, target, roi)
    assert got.dtype == torch.float64
    assert abs(got.item() - 20 * math.log10(255 / offset)) < 1e-9


def test_roi_psnr_uses_the_uint8_convention():
    gt = random_gt(1)
    roi = ROI(0, 0, 6, 5)
    # +0.4 of a level rounds back to the GT: an exact match is inf dB
    assert math.isinf(roi_psnr_ref(((gt.double() + 0.4) / 255).float()[None], gt, roi).item())
    # values above 1 clamp to 255: error 255 - g per pixel
    out = torch.full((1, 3, 6, 5), 1.7)
    mse = ((255.0 - gt.double()) ** 2).mean().item()
    assert abs(roi_psnr_ref(out, gt, roi).item() - 10 * math.log10(255 ** 2 / mse)) < 1e-9


def test_roi_psnr_reads_only_the_roi():
    gt = random_gt(2, (3, 10, 10))
    roi = ROI(3, 4, 5, 2)
    out = torch.rand(4, 3, 10, 10)
    poisoned = out.clone()
    mask = torch.ones(10, 10, dtype=torch.bool)
    mask[3:8, 4:6] = False
    poisoned[:, :, mask] = float("nan")
    target = gt[:, 3:8, 4:6]
    assert torch.equal(roi_sq_err_ref(out, target, roi), roi_sq_err_ref(poisoned, target, roi))
    assert torch.equal(ops.roi_psnr(out, target, roi, backend="torch"), roi_psnr_ref(out, target, roi))


def test_quantisation_rounds_x255_in_float32():
    # float32(0.38627452) * 255 rounds to 98.5 in float32 (-> 98, half to even) but is 98.50000036 in float64 (-> 99)
    v = torch.tensor([0.38627452], dtype=torch.float32)
    assert quantize_output(v).item() == 98.0
    assert round(float(v.double()) * 255) == 99


# --- many ROIs: the reference against one ROI at a time -----------------------------------------------------------

def test_multi_roi_reduction_equals_one_roi_at_a_time():
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
    g = torch.Generator().manual_seed(9)
    out0 = torch.rand(1, 3, 16, 16, generator=g)
    moved = out0.repeat(3, 1, 1, 1)
    moved[1, :, 2:4, 2:4] += 0.5   # changes pixels inside the first ROI only
    moved[2, :, 12:14, 12:14] -= 0.5  # inside the second ROI only
    ref = quantize_output(out0[0])
    got = roi_sq_err_multi_ref(moved, ref, [ROI(0, 0, 8, 8), ROI(8, 8, 8, 8)])
    assert got[0].eq(0).all()
    assert got[1, 0] > 0 and got[1, 1] == 0 and got[2, 0] == 0 and got[2, 1] > 0


def test_multi_roi_nan_stays_in_the_rois_that_hold_it():
    out = torch.rand(2, 3, 16, 16)
    out[0, 0, 2, 2] = float("nan")
    gt = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    got = roi_sq_err_multi_ref(out, gt, [ROI(0, 0, 8, 8), ROI(8, 8, 8, 8), ROI(0, 8, 8, 8)])
    assert torch.isnan(got[0, 0]) and not torch.isnan(got[0, 1:]).any() and not torch.isnan(got[1]).any()


# --- every backend against the reference ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_roi_sq_err_equals_the_reference(backend, layout, dtype):
    g = torch.Generator().manual_seed(5)
    out = (torch.rand(9, 3, 30, 26, generator=g) * 1.4 - 0.2).to(dtype)
    out[0, 1, 29, 25] = float("nan")  # on the ROI border: must give NaN for that intervention only
    out = in_layout(out, layout)
    roi = ROI(10, 7, 20, 19)  # touches the bottom-right border
    target = torch.randint(0, 256, (3, 20, 19), generator=g, dtype=torch.uint8)
    got, want = ops.roi_sq_err(out, target, roi, backend=backend), roi_sq_err_ref(out, target, roi)
    assert torch.isnan(got[0]) and torch.isnan(want[0])
    assert torch.equal(got[1:], want[1:]), (got - want).abs().max()


def rounding_edges(channels: int) -> torch.Tensor:
    """(N, channels, 1, 1) outputs whose x * 255 lands on a half-way point k + 0.5 in float32, or next to one, for
    every grey level k: round half to even must see float32(x * 255), not the exact product (a fused multiply-add)."""
    k = np.arange(256, dtype=np.float64)
    ties = ((k + 0.5) / 255).astype(np.float32)
    values = np.concatenate([ties, np.nextafter(ties, 0), np.nextafter(ties, 1), [0.0, 1.0, 1.5, -0.5]])
    values = values.astype(np.float32)
    values = values[: len(values) // channels * channels]
    return torch.from_numpy(values).view(-1, channels, 1, 1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("channels", [1, 3])
def test_roi_sq_err_rounds_half_way_points_like_the_reference(backend, channels):
    out = in_layout(rounding_edges(channels), "channels_last")
    # the cases include products that float32 rounds onto a tie, which the exact product is not
    assert ((out * 255 % 1 == 0.5) & (out.double() * 255 % 1 != 0.5)).any()
    target = torch.zeros(channels, 1, 1, dtype=torch.uint8)  # the error is q^2: one level off changes it
    assert torch.equal(ops.roi_sq_err(out, target, ROI(0, 0, 1, 1), backend=backend),
                       roi_sq_err_ref(out, target, ROI(0, 0, 1, 1)))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_roi_sq_err_multi_equals_one_roi_at_a_time(backend, layout, dtype):
    out, target, rois = multi_roi_case(dtype, layout, small=interpreted(backend))
    got = ops.roi_sq_err_multi(out, target, rois, backend=backend)
    assert got.shape == (out.shape[0], len(rois)) and got.dtype == torch.float64
    for i, r in enumerate(rois):
        ys, xs = r.slices()
        want = roi_sq_err_ref(out, target[:, ys, xs], r)
        assert torch.equal(torch.isnan(got[:, i]), torch.isnan(want)), r
        assert torch.equal(got[:, i].nan_to_num(-1), want.nan_to_num(-1)), r
    ref = ops.roi_sq_err_multi(out, target, rois, backend="torch")  # the summed-area-table reference
    assert torch.equal(got.nan_to_num(-1), ref.nan_to_num(-1))
    assert torch.isnan(got[1]).any() and not torch.isnan(got[1]).all() and not torch.isnan(got[0]).any()


@pytest.mark.needs_backend("cpp")
def test_the_cpp_operator_refuses_a_roi_outside_the_outputs():
    out = torch.rand(2, 3, 8, 8)
    rois = torch.tensor([[0, 0, 4, 4], [6, 5, 3, 2]])
    with pytest.raises(ValueError, match=r"roi 1 \(6, 5, 3x2\) must lie inside the 8x8 outputs"):
        torch.ops.cem_fast.roi_sq_err_multi(out, torch.zeros(3, 8, 8), rois)
    with pytest.raises(ValueError, match=r"roi \(6, 5, 3x2\) must lie inside the 8x8 outputs"):
        torch.ops.cem_fast.roi_sq_err(out, torch.zeros(3, 3, 2), 6, 5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_roi_sq_err_equals_the_reference(backend, dtype):
    g = torch.Generator().manual_seed(6)
    outputs = (torch.rand(4096, 3, 64, 64, generator=g) * 1.4 - 0.2).to(dtype).cuda()
    roi = ROI(20, 17, 32, 32)
    target = torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8).cuda()
    assert torch.equal(ops.roi_sq_err(outputs, target, roi, backend=backend), roi_sq_err_ref(outputs, target, roi))
    full = torch.randint(0, 256, (3, 64, 64), generator=g, dtype=torch.uint8).cuda()
    rois = cem_fast.roi_grid(64, 64, 16) + [ROI(3, 5, 40, 21)]
    assert torch.equal(ops.roi_sq_err_multi(outputs, full, rois, backend=backend),
                       ops.roi_sq_err_multi(outputs, full, rois, backend="torch"))
    for edge in (rounding_edges(1), rounding_edges(3)):
        edge, zero = edge.to(dtype).cuda(), torch.zeros(edge.shape[1], 1, 1, dtype=torch.uint8, device="cuda")
        assert torch.equal(ops.roi_sq_err(edge, zero, ROI(0, 0, 1, 1), backend=backend),
                           roi_sq_err_ref(edge, zero, ROI(0, 0, 1, 1)))


# ---- the reference against numpy, over random shapes and ROIs (hypothesis) -------------------------------------------

SETTINGS = hypothesis_settings()


@SETTINGS
@given(st.data())
def test_roi_psnr_matches_numpy(data):
    H, W = data.draw(st.integers(1, 16)), data.draw(st.integers(1, 16))
    y, x = data.draw(st.integers(0, H - 1)), data.draw(st.integers(0, W - 1))
    roi = ROI(y, x, data.draw(st.integers(1, H - y)), data.draw(st.integers(1, W - x)))
    rs = np.random.RandomState(data.draw(st.integers(0, 2 ** 31 - 1)))
    out = rs.uniform(-0.2, 1.2, (2, 3, H, W)).astype(np.float32)
    gt = rs.randint(0, 256, (3, H, W)).astype(np.uint8)
    # the convention quantises in float32 (the model's dtype): x255 rounded to float32, then to the nearest level
    q = np.round(np.clip(out, 0, 1) * np.float32(255)).astype(np.float64)[:, :, y:y + roi.height, x:x + roi.width]
    mse = ((q - gt[:, y:y + roi.height, x:x + roi.width]) ** 2).reshape(2, -1).mean(1)
    with np.errstate(divide="ignore"):
        want = 10 * np.log10(255.0 ** 2 / mse)
    target = torch.from_numpy(gt[:, y:y + roi.height, x:x + roi.width].copy())
    got = roi_psnr_ref(torch.from_numpy(out), target, roi).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


# ---- many-ROI launches within the grid limit -------------------------------------------------------------------------

@pytest.mark.needs_backend("triton")
def test_many_roi_launches_are_split_at_the_grid_limit(monkeypatch, rng):
    out = torch.from_numpy(rng.rand(2, 3, 8, 8).astype(np.float32))
    target = torch.from_numpy(rng.randint(0, 256, (3, 8, 8)).astype(np.uint8))
    rois = [ROI(y, x, 3, 2) for y in range(0, 5, 2) for x in range(0, 6, 3)]  # 6 ROIs
    want = reference.roi_sq_err_multi_ref(out, target, rois)
    monkeypatch.setattr(triton_ops, "MAX_ROIS_PER_LAUNCH", 4)  # 4 + 2: two launches, like 65,535 + more
    got = ops.roi_sq_err_multi(out, target, rois, backend="triton")
    assert torch.equal(got, want)
