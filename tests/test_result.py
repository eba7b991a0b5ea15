"""The result of a run (cem_fast/result.py): statistics over the blocks outside the ROI, samples built on first
read, the uncertainty every map carries (the standard error and 95 % Student-t interval of each block's effect,
and how many blocks the draws decide) in the object, summary.json and result.npz, and files that stay valid when
Y(I) is infinite."""
import json

import numpy as np
import pytest
import torch

import cem_fast
from cem_fast.geometry import ROI
from cem_fast.intervals import HELPS, NO_EFFECT, UNDECIDED
from cem_fast.patches import PatchBank
from cem_fast.result import CEMResult, Deferred
from helpers import random_bank, strict_json
from model_factories import ConvStack


# ---- statistics ------------------------------------------------------------------------------------------------------

def _result(cem, roi=ROI(0, 0, 8, 8)):
    rows, cols = cem.shape
    z = torch.zeros(3, rows * 8, cols * 8, dtype=torch.uint8)
    return CEMResult(cem=cem, effect=cem, samples_coarse=np.zeros((rows, cols, 1)),
                     samples_fine=np.zeros((rows, cols, 1)), gated=cem != 0, psnr_origin=30.0, roi=roi, block=8,
                     scale=1, tol=0.01, task={"task": "DN"}, seed=0, mode="coarse-to-fine", model_name="m",
                     image_name="i", num_forwards=1, wall_time=0.0, backend="torch", device="cpu", patch_bank={},
                     gt=z, degraded=z, output=z)


def test_statistics_exclude_the_roi_blocks():
    cem = np.array([[5.0, 0.2, -0.3], [0.0, 0.1, 0.0]])  # ROI = block (0, 0), a large value that must not count
    st = _result(cem).stats()
    assert (st["positive"], st["negative"], st["zero"], st["roi_blocks"]) == (2, 1, 2, 1)
    assert st["max_db"] == 0.2 and st["max_block"] == [0, 1]
    assert st["min_db"] == -0.3 and st["min_block"] == [0, 2]
    assert st["range_db"] == pytest.approx(0.5)
    # farthest effect: block (0, 2), centre (4, 20) from the ROI centre (4, 4)
    assert st["radius_of_influence_px"] == pytest.approx(16.0)


def test_absent_extremes_are_none_not_zero_at_the_corner():
    st = _result(np.array([[5.0, 0.2, 0.0], [0.0, 0.1, 0.0]])).stats()  # nothing hurts the ROI
    assert st["min_db"] is None and st["min_block"] is None
    assert st["max_db"] == 0.2 and st["range_db"] == pytest.approx(0.2)
    st = _result(np.array([[5.0, 0.0], [0.0, 0.0]])).stats()
    assert st["max_db"] is None and st["min_db"] is None and st["range_db"] == 0.0


def test_deferred_samples_are_built_once_on_first_read_only():
    built = []

    def build():
        built.append(1)
        return np.full((2, 3, 4), 7.0)

    res = _result(np.array([[0.0, 0.2, 0.0], [0.0, 0.0, 0.0]]))
    res.samples_fine = Deferred((2, 3, 4), build)
    assert res.summary()["fine"] == 4 and res.stats()["positive"] == 1 and not built  # no read, no build
    assert res.samples_fine.shape == (2, 3, 4) and res.samples_fine[1, 2, 3] == 7.0 and built == [1]


def test_all_zero_map_still_plots_and_saves(tmp_path):
    res = _result(np.zeros((2, 3)))
    res.save(tmp_path)
    assert (tmp_path / "cem.png").stat().st_size > 1000 and (tmp_path / "pie.png").exists()


# ---- every map carries its uncertainty -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def result():
    rng = np.random.RandomState(7)
    image = rng.randint(0, 256, (64, 64, 3)).astype(np.uint8)
    bank = PatchBank(torch.from_numpy(rng.randint(0, 256, (32, 3, 8, 8)).astype(np.uint8)))
    return cem_fast.causal_effect_map(ConvStack(3), image, task="DN", sigma=25, roi=(24, 24, 16), coarse=3, fine=6,
                                      tol=0.05, patches=bank, seed=2)


def test_the_standard_error_is_that_of_the_draws_behind_each_effect(result):
    """Six fine draws are too few for the control variate: the mean's standard error, from the fine draws where
    gated; blocks the coarse gate screened out carry none (NaN), unreachable ones an exact 0."""
    fine_d = result.psnr_origin - result.samples_fine  # NaN where not gated
    want_se = np.where(result.gated, fine_d.std(axis=2, ddof=1) / np.sqrt(6), np.nan)
    want_se = np.where(result.reachable, want_se, 0.0)
    np.testing.assert_allclose(result.effect_se, want_se, rtol=1e-12, atol=1e-12)
    want_n = np.where(result.reachable, np.where(result.gated, 6, 3), 0)
    np.testing.assert_array_equal(result.effect_draws, want_n)
    assert result.gated.any() and (~result.gated & result.reachable).any()  # both kinds of block are checked


def test_screened_blocks_have_no_interval_and_count_as_no_effect(result):
    low, high = result.interval()
    screened = result.reachable & ~result.gated
    np.testing.assert_array_equal(result.screened, screened)
    assert np.isnan(low[screened]).all() and np.isnan(high[screened]).all()
    assert (result.decided()[screened] == NO_EFFECT).all()
    half = (high - low) / 2
    np.testing.assert_allclose(half[result.gated], 2.571 * result.effect_se[result.gated], rtol=1e-12)
    assert (half[~result.reachable] == 0).all()
    summary = result.uncertainty()
    assert summary["screened"] == int((screened & ~result.roi_mask).sum()) > 0


def test_summary_and_npz_carry_the_uncertainty(result, tmp_path):
    result.save(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())["uncertainty"]
    rated = int((~result.roi_mask).sum())
    assert summary["helps"] + summary["hurts"] + summary["no_effect"] + summary["screened"] + \
        summary["undecided"] == rated
    d = result.decided()[~result.roi_mask]
    assert summary["undecided"] == int((d == UNDECIDED).sum()) and summary["helps"] == int((d == HELPS).sum())
    with np.load(tmp_path / "result.npz") as z:
        low, high = result.interval()
        np.testing.assert_array_equal(z["ci_low"], low)
        np.testing.assert_array_equal(z["ci_high"], high)
        np.testing.assert_array_equal(z["decided"], result.decided())
        np.testing.assert_array_equal(z["effect_se"], result.effect_se)
        np.testing.assert_array_equal(z["screened"], result.screened)


# ---- an infinite Y(I) is written as valid JSON -----------------------------------------------------------------------

@pytest.fixture
def bank(rng):
    return random_bank(rng, 16)


class Constant(torch.nn.Module):
    """Outputs the uniform image whatever its input: Y(I) and every sample are +inf, every effect is 0."""

    def forward(self, x):
        return torch.full_like(x, 77 / 255)


def test_an_infinite_y_is_written_as_valid_json(tmp_path, bank):
    flat = np.full((16, 16, 3), 77, np.uint8)
    res = cem_fast.causal_effect_map(Constant(), flat, task="identity", roi=(0, 0, 8), patches=bank, coarse=1,
                                     fine=1)
    assert res.psnr_origin == float("inf") and not res.cem.any()
    res.save(tmp_path / "r")
    assert strict_json(tmp_path / "r" / "summary.json")["psnr_origin"] == "inf"
    maps = cem_fast.causal_effect_maps(Constant(), flat, task="identity", rois=[(0, 0, 8), (8, 8, 8)],
                                       patches=bank, coarse=1, fine=1)
    maps.save(tmp_path / "m")
    assert strict_json(tmp_path / "m" / "rois.json")["rois"][1]["psnr_origin"] == "inf"
