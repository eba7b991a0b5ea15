"""The control-variate estimate of a block's effect (issue 17, item 3): the intercept of the regression of its
draws' effects on the drawn patches' channel means, whose mean over the bank is known; HC3 standard errors."""
import numpy as np
import pytest
import torch

import cem_fast
from cem_fast import rng
from cem_fast.intervals import block_estimates, t975
from cem_fast.patches import PatchBank
from cem_fast.options import DRAW_STRIDE
from helpers import ConvStack


def _direct(y, x):
    """Least squares and the HC3 covariance, written out row by row."""
    a = np.column_stack([np.ones(len(y)), x])
    inv = np.linalg.inv(a.T @ a)
    coef = inv @ a.T @ y
    e = y - a @ coef
    h = np.array([a[i] @ inv @ a[i] for i in range(len(y))])
    meat = sum(e[i] ** 2 / (1 - h[i]) ** 2 * np.outer(a[i], a[i]) for i in range(len(y)))
    return coef[0], np.sqrt((inv @ meat @ inv)[0, 0])


def test_the_estimate_is_the_regression_intercept_with_hc3_errors():
    g = np.random.default_rng(0)
    x = g.normal(size=(4, 30, 3))
    d = 1.0 + x @ np.array([1.0, -2.0, 0.5]) + g.normal(size=(4, 30)) * (1 + np.abs(x[..., 0]))
    mask = np.ones((4, 30), dtype=bool)
    mask[1, 17:] = False  # adaptive rows draw different numbers
    mask[2, 9:] = False  # too few for the regression (3 covariates need 11): the mean
    x[3] = 0.25  # covariates that do not vary: the mean
    est, se, df = block_estimates(d, mask, x)
    for row, n in ((0, 30), (1, 17)):
        a, s = _direct(d[row, :n], x[row, :n])
        assert est[row] == pytest.approx(a, rel=1e-10) and se[row] == pytest.approx(s, rel=1e-10)
        assert df[row] == n - 4
    for row, n in ((2, 9), (3, 30)):
        assert est[row] == pytest.approx(d[row, :n].mean(), rel=1e-12)
        assert se[row] == pytest.approx(d[row, :n].std(ddof=1) / np.sqrt(n), rel=1e-10) and df[row] == n - 1
    plain, plain_se, plain_df = block_estimates(d, mask, None)
    assert plain[0] == pytest.approx(d[0].mean()) and plain_df[0] == 29 and est[0] != pytest.approx(plain[0])


@pytest.mark.parametrize("n", [11, 20, 50])
def test_intervals_cover_the_true_mean_and_are_narrower_than_the_means(n):
    """Skewed draws (a gamma effect of a uniform brightness plus lognormal noise), 4,000 blocks: the 95 %
    interval holds the true mean in 93-97 % of them, and the estimate is closer than the plain mean."""
    g = np.random.default_rng(n)
    blocks = 4000
    x = g.uniform(-0.5, 0.5, size=(blocks, n, 1))  # centred: its mean over the bank is 0
    noise = g.lognormal(0.0, 0.6, size=(blocks, n)) - np.exp(0.18)
    d = 0.3 + 1.5 * x[..., 0] + 0.8 * x[..., 0] ** 2 - 0.8 / 12 + 0.2 * noise  # true mean 0.3
    mask = np.ones((blocks, n), dtype=bool)
    est, se, df = block_estimates(d, mask, x)
    half = t975(df) * se
    coverage = float(((est - half <= 0.3) & (0.3 <= est + half)).mean())
    assert 0.93 <= coverage <= 0.97
    assert np.abs(est - 0.3).mean() < 0.7 * np.abs(d.mean(1) - 0.3).mean()


def _case():
    g = np.random.RandomState(3)
    image = g.randint(0, 256, (48, 48, 3)).astype(np.uint8)
    bank = PatchBank(torch.from_numpy(g.randint(0, 256, (64, 3, 8, 8)).astype(np.uint8)))
    return dict(model=ConvStack(2), image=image, task="DN", sigma=25, roi=(16, 16, 16), patches=bank, seed=4,
                mode="exhaustive", samples=16)


def test_a_maps_effect_is_the_intercept_on_the_drawn_patches_channel_means():
    case = _case()
    res = cem_fast.causal_effect_map(**case)
    mean = cem_fast.causal_effect_map(estimator="mean", **case)
    np.testing.assert_array_equal(res.samples_fine, mean.samples_fine)  # the same draws, estimated two ways
    bank = case["patches"].patches.double().mean(dim=(2, 3)).numpy()
    bank -= bank.mean(0)
    r, c = np.argwhere(res.reachable & ~res.roi_mask)[0]
    block = r * res.cem.shape[1] + c
    ids = torch.tensor(block * DRAW_STRIDE + np.arange(16), dtype=torch.int64)
    x = bank[rng.patch_draws(4, ids, 64).numpy()]
    want, want_se = _direct(res.psnr_origin - res.samples_fine[r, c], x)
    assert res.effect[r, c] == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert res.effect_se[r, c] == pytest.approx(want_se, rel=1e-9, abs=1e-12) and res.effect_df[r, c] == 12
    np.testing.assert_allclose(mean.effect, (mean.psnr_origin - mean.samples_fine).mean(2), atol=1e-12)
    assert res.estimator == "control-variate" and mean.estimator == "mean"
    assert res.uncertainty()["estimator"] == "control-variate"
    with pytest.raises(ValueError, match="estimator must be one of control-variate, mean, got 'median'"):
        cem_fast.causal_effect_map(**{**case, "estimator": "median"})


def test_a_grey_bank_is_one_covariate_not_a_singular_fit(tmp_path):
    """A bank of grey patches (three equal channel means) still gets the control variate, on its one covariate."""
    case = _case()
    grey = case["patches"].patches[:, :1].repeat(1, 3, 1, 1)
    case["patches"] = PatchBank(grey.contiguous())
    res = cem_fast.causal_effect_map(**case)
    r, c = np.argwhere(res.reachable & ~res.roi_mask)[0]
    block = r * res.cem.shape[1] + c
    ids = torch.tensor(block * DRAW_STRIDE + np.arange(16), dtype=torch.int64)
    means = grey[:, 0].double().mean(dim=(1, 2)).numpy()
    x = (means - means.mean())[rng.patch_draws(4, ids, 64).numpy()]
    want, want_se = _direct(res.psnr_origin - res.samples_fine[r, c], x[:, None])
    assert res.effect[r, c] == pytest.approx(want, rel=1e-9, abs=1e-12) and res.effect_df[r, c] == 14
    assert res.effect_se[r, c] == pytest.approx(want_se, rel=1e-9, abs=1e-12)
    assert res.uncertainty()["control_variate_blocks"] == int((res.reachable & ~res.roi_mask).sum())
    res.save(tmp_path)
    with np.load(tmp_path / "result.npz") as z:
        np.testing.assert_array_equal(z["effect_df"], res.effect_df)


def test_a_paired_difference_is_the_difference_of_the_maps():
    """compare pairs the control variate too: on the same covariates, the fit is linear in the draws, so the
    difference of two maps estimated from the same draws is exactly a.effect - b.effect."""
    from cem_fast.compare import difference
    case = _case()
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
    case = {**_case(), "mode": "adaptive", "samples": None, "coarse": 3, "fine": 24}
    a = cem_fast.causal_effect_map(**case)
    b = cem_fast.causal_effect_map(**{**case, "model": ConvStack(2, seed=1)})
    d = difference(a, b)
    rated = a.reachable & ~a.roi_mask
    np.testing.assert_array_equal(d.draws[rated], np.minimum(a.effect_draws, b.effect_draws)[rated])
    same = rated & (a.effect_draws == b.effect_draws)
    assert same.any()
    np.testing.assert_allclose(d.diff[same], (a.effect - b.effect)[same], rtol=0, atol=1e-9)
    assert (difference(a, a).diff == 0).all() and (difference(a, a).half_width[rated] == 0).all()
