"""Paired comparison of models with common random numbers (cem_fast/compare.py): a model compared with itself
differs by exactly nothing, paired differences are tighter than independent ones (the control variate's too),
what a comparison calls significant, the ROI left out of the largest difference, and the names of models of one
class."""
import numpy as np
import pytest
import torch

import cem_fast
from cem_fast import plotting
from cem_fast.compare import difference
from cem_fast.models import DnCNN
from helpers import control_variate_case, make_result
from model_factories import ConvStack


def test_a_model_compared_with_itself_differs_by_nothing(rng):
    img = rng.randint(0, 256, (16, 24, 3)).astype(np.uint8)
    bank = cem_fast.PatchBank(torch.from_numpy(rng.randint(0, 256, (8, 3, 8, 8)).astype(np.uint8)))
    results, diffs = cem_fast.compare_models([DnCNN(3, 4, 2), DnCNN(3, 4, 2)], img, task="DN", roi=(0, 8, 8),
                                             patches=bank, coarse=2, fine=3)
    a = results[0]
    same = difference(a, a)
    assert np.array_equal(same.diff, np.zeros_like(same.diff)) and not same.significant.any()
    assert (same.half_width == 0).all()
    d = diffs[0]  # two different random DnCNNs: paired differences over the same draws
    assert d.diff.shape == a.cem.shape and (d.draws >= 2).all()


def test_paired_differences_are_tighter_than_independent_ones(rng):
    img = rng.randint(0, 256, (24, 24, 3)).astype(np.uint8)
    bank = cem_fast.PatchBank(torch.from_numpy(rng.randint(0, 256, (32, 3, 8, 8)).astype(np.uint8)))
    kw = dict(task="SR", scale=2, roi=(8, 8, 8), patches=bank, mode="exhaustive", samples=8)
    a = cem_fast.causal_effect_map(cem_fast.models.Bicubic(2), img, seed=0, **kw)

    class Sharper(torch.nn.Module):
        def forward(self, x):
            up = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="bicubic", align_corners=False)
            return up + 0.3 * (up - torch.nn.functional.avg_pool2d(up, 3, 1, 1))

    b_same = cem_fast.causal_effect_map(Sharper(), img, seed=0, **kw)
    b_other = cem_fast.causal_effect_map(Sharper(), img, seed=1, **kw)
    paired = difference(b_same, a).half_width
    # unpaired: the spread of the per-draw effect difference with independent draws
    ind = (cem_fast.pipeline.samples.effects(b_other.psnr_origin, b_other.samples_fine)
           - cem_fast.pipeline.samples.effects(a.psnr_origin, a.samples_fine))
    unpaired = 1.96 * ind.std(axis=2, ddof=1) / np.sqrt(8)
    assert np.median(paired) < 0.5 * np.median(unpaired)


# ---- significance ----------------------------------------------------------------------------------------------------

def paired(diffs, noise, name_a="a", name_b="b"):
    """Two maps whose paired per-draw difference at block (r, c) is diffs[r][c] + (-1, 0, +1) * noise[r][c]:
    model b's draws all equal its Y(I) (no effect), model a's carry the difference."""
    d, e = np.asarray(diffs, float), np.asarray(noise, float)
    draws = d[..., None] + e[..., None] * np.array([-1.0, 0.0, 1.0])
    a = make_result(np.zeros(d.shape), coarse=30.0 - draws, name=name_a)
    b = make_result(np.zeros(d.shape), coarse=np.full(draws.shape, 30.0), name=name_b)
    return difference(a, b), a


def test_the_roi_is_left_out_of_the_largest_difference_and_the_scale():
    d, a = paired([[2.0, 0.08, 0.08], [0.08, 0.05, 0.0]], np.full((2, 3), 0.001))  # ROI = block (0, 0)
    s = d.summary()
    assert s["max_abs_diff_db"] == pytest.approx(0.08) and s["max_abs_diff_block"] in ([0, 1], [0, 2], [1, 0])
    fig = plotting.difference_figure(d, a)
    assert fig.axes[1].get_yticklabels()[-1].get_text() == "+0.08"  # bound 0.08, not 2
    assert "ROI (green outline): left out of the maximum and the colour scale" in \
        fig.legends[0].get_texts()[0].get_text()
    assert fig.axes[0].get_title() == "a \u2212 b"


def test_significant_needs_tol_and_an_interval_that_excludes_zero():
    diffs = [[2.0, 0.005, 0.05, 0.05]]
    noise = [[0.001, 0.0001, 0.1, 0.001]]  # 95% half-width = t(2) 4.30 * noise / sqrt(3)
    d, _ = paired(diffs, noise)
    assert d.half_width[0, 1] < 0.005 and d.half_width[0, 2] > 0.05  # (0, 1) certain but tiny, (0, 2) noise
    assert d.significant.tolist() == [[False, False, False, True]]  # ROI, below tol, CI has 0, significant
    assert d.summary()["significant_blocks"] == 1


class Upsample(torch.nn.Module):
    def __init__(self, gain):
        super().__init__()
        self.gain = gain

    def forward(self, x):
        return x * self.gain


def test_models_of_one_class_get_distinct_names(rng):
    img = rng.randint(0, 256, (16, 16, 3)).astype(np.uint8)
    args = dict(task="identity", roi=(0, 0, 8), coarse=2, fine=0, progress=False)
    results, diffs = cem_fast.compare_models([Upsample(0.95), Upsample(0.9)], img, **args)
    assert [r.model_name for r in results] == ["Upsample", "Upsample_2"]
    assert (diffs[0].name_a, diffs[0].name_b) == ("Upsample_2", "Upsample")
    results, diffs = cem_fast.compare_models([Upsample(0.95), Upsample(0.9)], img, names=["one", "two"], **args)
    assert (diffs[0].name_a, diffs[0].name_b) == ("two", "one")
    with pytest.raises(ValueError, match="names must give one name per model"):
        cem_fast.compare_models([Upsample(0.95), Upsample(0.9)], img, names=["one"], **args)
    same = difference(make_result([[0.0, 0.1]], name="Net"), make_result([[0.0, 0.1]], name="Net"))
    assert (same.name_a, same.name_b) == ("Net", "Net_2")


# ---- the control variate, paired -------------------------------------------------------------------------------------

def test_a_paired_difference_is_the_difference_of_the_maps():
    """compare pairs the control variate too: on the same covariates, the fit is linear in the draws, so the
    difference of two maps estimated from the same draws is exactly a.effect - b.effect."""
    from cem_fast.compare import difference
    case = control_variate_case()
    a = cem_fast.causal_effect_map(**case)
    b = cem_fast.causal_effect_map(**{**case, "model": ConvStack(2, seed=1)})
    d = difference(a, b)
    rated = a.reachable & ~a.roi_mask
    np.testing.assert_allclose(d.diff[rated], (a.effect - b.effect)[rated], rtol=0, atol=1e-9)
    assert (d.draws[rated] == 16).all()
    pa, pb = (cem_fast.causal_effect_map(estimator="mean", **{**case, "model": m})
              for m in (case["model"], ConvStack(2, seed=1)))
    plain = difference(pa, pb)
    want = ((pa.psnr_origin - pa.samples_fine) - (pb.psnr_origin - pb.samples_fine)).mean(2)
    np.testing.assert_allclose(plain.diff[rated], want[rated], rtol=0, atol=1e-9)


def test_the_control_variate_narrows_a_real_comparison():
    """Bicubic against the shipped SR network on the demo: the paired intervals of the control variate are
    narrower than those of the plain paired means (between random toy nets, whose differences the patches'
    brightness does not explain, they need not be)."""
    from importlib import resources

    from cem_fast.compare import compare_models
    image = str(resources.files("cem_fast") / "data" / "demo.png")
    widths = []
    for estimator in ("control-variate", "mean"):
        results, (d,) = compare_models(["bicubic", "default:sr"], image, task="SR", scale=4, roi=(48, 56, 16),
                                       estimator=estimator, fine=20, progress=False)
        rated = results[0].reachable & ~results[0].roi_mask & (d.draws == 20)
        widths.append(float(np.median(d.half_width[rated])))
    assert widths[0] < 0.85 * widths[1], widths


def test_adaptive_maps_pair_the_draws_both_made():
    from cem_fast.compare import difference
    case = {**control_variate_case(), "mode": "adaptive", "samples": None, "coarse": 3, "fine": 24}
    a = cem_fast.causal_effect_map(**case)
    b = cem_fast.causal_effect_map(**{**case, "model": ConvStack(2, seed=1)})
    d = difference(a, b)
    rated = a.reachable & ~a.roi_mask
    np.testing.assert_array_equal(d.draws[rated], np.minimum(a.effect_draws, b.effect_draws)[rated])
    same = rated & (a.effect_draws == b.effect_draws)
    assert same.any()
    np.testing.assert_allclose(d.diff[same], (a.effect - b.effect)[same], rtol=0, atol=1e-9)
    assert (difference(a, a).diff == 0).all() and (difference(a, a).half_width[rated] == 0).all()
