"""The draws of a run (cem_fast/pipeline/stages.py): adaptive sampling draws until every block is decided and
precise or capped, keeps to its budget and resumes, and its draws are those of coarse-to-fine."""
import numpy as np
import pytest
import torch

import cem_fast
from cem_fast.intervals import UNDECIDED
from cem_fast.patches import PatchBank
from model_factories import ConvStack


@pytest.fixture(scope="module")
def adaptive_case():
    rng = np.random.RandomState(11)
    image = rng.randint(0, 256, (64, 64, 3)).astype(np.uint8)
    bank = PatchBank(torch.from_numpy(rng.randint(0, 256, (32, 3, 8, 8)).astype(np.uint8)))
    return dict(model=ConvStack(3), image=image, task="DN", sigma=25, roi=(24, 24, 16), patches=bank, seed=1,
                tol=0.05, coarse=3, fine=24)


def test_adaptive_draws_until_every_block_is_decided_and_precise_or_capped(adaptive_case):
    res = cem_fast.causal_effect_map(mode="adaptive", estimator="mean", **adaptive_case)
    low, high = res.interval()
    half = (high - low) / 2
    target = np.maximum(np.maximum(0.05, 0.2 * np.abs(res.effect)), 0.05)
    capped = res.effect_draws >= 3 + 24
    going = ((res.decided() == UNDECIDED) | (half > target)) & res.reachable
    assert not (going & ~capped).any() and (~going & res.reachable).any()
    # every reachable block drew at least one round beyond the coarse stage (three draws give no honest interval)
    assert (res.effect_draws[res.reachable] >= 3 + 8).all() and res.gated[res.reachable].all()
    # with the mean estimator, the effect is the mean of all the block's draws, coarse ones included
    r, c = np.argwhere(res.gated)[0]
    k = int(res.effect_draws[r, c]) - 3
    draws = np.concatenate([res.samples_coarse[r, c], res.samples_fine[r, c, :k]])
    assert np.isnan(res.samples_fine[r, c, k:]).all()
    np.testing.assert_allclose(res.effect[r, c], res.psnr_origin - draws.mean(), rtol=0, atol=1e-12)


def test_a_looser_half_width_stops_sooner(adaptive_case):
    tight = cem_fast.causal_effect_map(mode="adaptive", half_width_rel=0.01, half_width_db=0.0, **adaptive_case)
    loose = cem_fast.causal_effect_map(mode="adaptive", **adaptive_case)
    assert loose.num_forwards < tight.num_forwards
    low, high = tight.interval()
    assert ((high - low) / 2 > 0.05)[tight.effect_draws < 3 + 24].sum() == 0  # the tighter target was kept
    with pytest.raises(ValueError, match="half_width_rel applies to mode: adaptive"):
        cem_fast.causal_effect_map(half_width_rel=0.3, **adaptive_case)
    with pytest.raises(ValueError, match=r"half_width_db must be a finite number in \[0, inf\], got -1"):
        cem_fast.causal_effect_map(mode="adaptive", half_width_db=-1, **adaptive_case)


def test_adaptive_draws_are_those_of_coarse_to_fine(adaptive_case):
    """Draws are keyed by (seed, block, draw index): the first 8 extra draws are coarse-to-fine's first 8."""
    a = cem_fast.causal_effect_map(mode="adaptive", **adaptive_case)
    c = cem_fast.causal_effect_map(**adaptive_case)
    both = a.gated & c.gated
    assert both.any()
    np.testing.assert_array_equal(a.samples_fine[both][:, :8], c.samples_fine[both][:, :8])
    np.testing.assert_array_equal(a.samples_coarse, c.samples_coarse)


def test_adaptive_keeps_to_its_budget_and_resumes(adaptive_case, tmp_path):
    res = cem_fast.causal_effect_map(mode="adaptive", budget=20, cache=tmp_path, **adaptive_case)
    extra = int((res.effect_draws[res.reachable] - 3).sum())
    assert extra == 20  # spent, never more
    again = cem_fast.causal_effect_map(mode="adaptive", budget=20, cache=tmp_path, **adaptive_case)
    assert again.extra["reused_from_cache"] == int(res.effect_draws[res.reachable].sum())
    np.testing.assert_array_equal(again.effect, res.effect)


def test_a_budget_left_over_refines_the_rated_blocks_not_the_roi(adaptive_case):
    free = cem_fast.causal_effect_map(mode="adaptive", **adaptive_case)
    rich = cem_fast.causal_effect_map(mode="adaptive", budget=200, **adaptive_case)
    rated = rich.reachable & ~rich.roi_mask
    extra = [int((r.effect_draws[r.reachable] - 3).sum()) for r in (rich, free)]
    assert extra[0] == 200 > extra[1]
    np.testing.assert_array_equal(rich.effect_draws[rich.roi_mask], free.effect_draws[free.roi_mask])  # stopped
    assert (rich.effect_draws[rated] >= free.effect_draws[rated]).all()
    assert rich.effect_draws[rated].sum() > free.effect_draws[rated].sum()


def test_adaptive_needs_two_coarse_draws_and_budget_needs_adaptive(adaptive_case):
    with pytest.raises(ValueError, match="coarse must be an integer >= 2, got 1"):
        cem_fast.causal_effect_map(mode="adaptive", **{**adaptive_case, "coarse": 1})
    with pytest.raises(ValueError, match="budget applies to mode: adaptive"):
        cem_fast.causal_effect_map(budget=10, **adaptive_case)
