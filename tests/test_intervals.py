"""Confidence intervals of a block's effect (cem_fast/intervals.py): the control-variate estimate (the
intercept of the regression of its draws' effects on the drawn patches' channel means, HC3 standard errors) and
the plain mean's, Student-t quantiles, and the decisions they give."""
import numpy as np
import pytest

from cem_fast.intervals import HELPS, HURTS, NO_EFFECT, UNDECIDED, block_estimates, decide, t975
from helpers import ols_hc3


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
        a, s = ols_hc3(d[row, :n], x[row, :n])
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


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    df = np.array([1, 2, 3, 4, 9, 19, 29, 35, 49, 99, 150, 1000])
    np.testing.assert_allclose(t975(df), stats.t.ppf(0.975, df), atol=2e-3)
    assert np.isnan(t975(np.array([0]))).all()


def test_decisions_follow_the_interval_and_tol():
    low = np.array([0.2, -0.5, -0.01, -0.3, 0.05])
    high = np.array([0.4, -0.2, 0.02, 0.1, 0.3])
    assert decide(low, high, 0.05).tolist() == [HELPS, HURTS, NO_EFFECT, UNDECIDED, HELPS]
