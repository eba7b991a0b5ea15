"""Control variates (cem_fast/pipeline/covariates.py): each block's effect is the intercept of the regression of
its draws' effects on the drawn patches' channel means (whose mean over the bank is known), and a grey bank is one
covariate, not a singular fit."""
import numpy as np
import pytest
import torch

import cem_fast
from cem_fast import rng as crng
from cem_fast.options import DRAW_STRIDE
from cem_fast.patches import PatchBank
from helpers import control_variate_case, ols_hc3


def test_a_maps_effect_is_the_intercept_on_the_drawn_patches_channel_means():
    case = control_variate_case()
    res = cem_fast.causal_effect_map(**case)
    mean = cem_fast.causal_effect_map(estimator="mean", **case)
    np.testing.assert_array_equal(res.samples_fine, mean.samples_fine)  # the same draws, estimated two ways
    bank = case["patches"].patches.double().mean(dim=(2, 3)).numpy()
    bank -= bank.mean(0)
    r, c = np.argwhere(res.reachable & ~res.roi_mask)[0]
    block = r * res.cem.shape[1] + c
    ids = torch.tensor(block * DRAW_STRIDE + np.arange(16), dtype=torch.int64)
    x = bank[crng.patch_draws(4, ids, 64).numpy()]
    want, want_se = ols_hc3(res.psnr_origin - res.samples_fine[r, c], x)
    assert res.effect[r, c] == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert res.effect_se[r, c] == pytest.approx(want_se, rel=1e-9, abs=1e-12) and res.effect_df[r, c] == 12
    np.testing.assert_allclose(mean.effect, (mean.psnr_origin - mean.samples_fine).mean(2), atol=1e-12)
    assert res.estimator == "control-variate" and mean.estimator == "mean"
    assert res.uncertainty()["estimator"] == "control-variate"
    with pytest.raises(ValueError, match="estimator must be one of control-variate, mean, got 'median'"):
        cem_fast.causal_effect_map(**{**case, "estimator": "median"})


def test_a_grey_bank_is_one_covariate_not_a_singular_fit(tmp_path):
    """A bank of grey patches (three equal channel means) still gets the control variate, on its one covariate."""
    case = control_variate_case()
    grey = case["patches"].patches[:, :1].repeat(1, 3, 1, 1)
    case["patches"] = PatchBank(grey.contiguous())
    res = cem_fast.causal_effect_map(**case)
    r, c = np.argwhere(res.reachable & ~res.roi_mask)[0]
    block = r * res.cem.shape[1] + c
    ids = torch.tensor(block * DRAW_STRIDE + np.arange(16), dtype=torch.int64)
    means = grey[:, 0].double().mean(dim=(1, 2)).numpy()
    x = (means - means.mean())[crng.patch_draws(4, ids, 64).numpy()]
    want, want_se = ols_hc3(res.psnr_origin - res.samples_fine[r, c], x[:, None])
    assert res.effect[r, c] == pytest.approx(want, rel=1e-9, abs=1e-12) and res.effect_df[r, c] == 14
    assert res.effect_se[r, c] == pytest.approx(want_se, rel=1e-9, abs=1e-12)
    assert res.uncertainty()["control_variate_blocks"] == int((res.reachable & ~res.roi_mask).sum())
    res.save(tmp_path)
    with np.load(tmp_path / "result.npz") as z:
        np.testing.assert_array_equal(z["effect_df"], res.effect_df)
