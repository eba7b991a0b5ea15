"""Every map carries its uncertainty (issue 17, item 1): the standard error and a 95 % Student-t interval of
each block's effect, from the draws that made it, and how many blocks the draws decide."""
import json

import numpy as np
import pytest
import torch

import cem_fast
from cem_fast.intervals import HELPS, HURTS, NO_EFFECT, UNDECIDED, decide, t975
from cem_fast.patches import PatchBank
from helpers import ConvStack


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


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    df = np.array([1, 2, 3, 4, 9, 19, 29, 35, 49, 99, 150, 1000])
    np.testing.assert_allclose(t975(df), stats.t.ppf(0.975, df), atol=2e-3)
    assert np.isnan(t975(np.array([0]))).all()


def test_decisions_follow_the_interval_and_tol():
    low = np.array([0.2, -0.5, -0.01, -0.3, 0.05])
    high = np.array([0.4, -0.2, 0.02, 0.1, 0.3])
    assert decide(low, high, 0.05).tolist() == [HELPS, HURTS, NO_EFFECT, UNDECIDED, HELPS]


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


def test_the_convergence_command_writes_its_table_and_plot(tmp_path, capsys):
    from importlib import resources

    from cem_fast.cli import main
    cfg = tmp_path / "c.yml"
    image = resources.files("cem_fast") / "data" / "demo.png"
    cfg.write_text(f"model: bicubic\nimages: [{image}]\ntask: SR\nscale: 4\nroi: [48, 56, 16]\n")
    assert main(["convergence", str(cfg), "--out", str(tmp_path / "out"), "--truth", "30", "--seeds", "2"]) == 0
    result = json.loads((tmp_path / "out" / "convergence.json").read_text())
    assert [s["plan"] for s in result["summary"]] == [
        "coarse-to-fine 3/50, mean (the paper's)", "coarse-to-fine 3/50", "exhaustive 5", "exhaustive 20",
        "adaptive 3 + up to 50", "adaptive, the paper's forwards"]
    forwards = {(r["plan"], r["seed"]): r["forwards"] for r in result["rows"]}
    for seed in (0, 1):  # each seed's budget is the paper's plan's fine stage with that seed
        assert forwards["adaptive, the paper's forwards", seed] == forwards["coarse-to-fine 3/50, mean (the paper's)",
                                                                            seed]
    assert result["truth"]["draws"] == 30 and all(s["forwards"] > 0 for s in result["summary"])
    assert (tmp_path / "out" / "convergence.png").stat().st_size > 1000
    assert "| coarse-to-fine 3/50 | 2 |" in capsys.readouterr().out
    assert main(["convergence", str(cfg), "--out", str(tmp_path / "o2"), "--truth", "0"]) == 2  # one line, no run
    first = (tmp_path / "out" / "convergence.json").read_bytes()
    assert main(["convergence", str(cfg), "--out", str(tmp_path / "out"), "--truth", "20", "--seeds", "1"]) == 0
    assert (tmp_path / "out" / "convergence.json").read_bytes() == first  # a second study is kept beside it
    assert json.loads((tmp_path / "out" / "convergence_2.json").read_text())["truth"]["draws"] == 20


def test_the_map_figure_hatches_undecided_blocks():
    from importlib import resources

    from matplotlib.patches import Rectangle

    from cem_fast.plotting import cem_figure, plt
    image = str(resources.files("cem_fast") / "data" / "demo.png")
    res = cem_fast.causal_effect_map("bicubic", image, task="SR", scale=4, roi=(48, 56, 16), mode="exhaustive",
                                     samples=4, progress=False)
    undecided = int(((res.decided() == UNDECIDED) & ~res.roi_mask).sum())
    assert undecided > 0
    fig = cem_figure(res)
    hatched = [p for p in fig.axes[0].patches if isinstance(p, Rectangle) and p.get_hatch()]
    assert len(hatched) == undecided
    assert any(f"{undecided} undecided" in t.get_text() for t in fig.legends[0].get_texts())
    plt.close(fig)


def test_the_study_gives_each_seed_the_budget_of_the_paper_plan_with_that_seed():
    from cem_fast import convergence
    g = np.random.RandomState(5)
    image = g.randint(0, 256, (32, 32, 3)).astype(np.uint8)
    bank = PatchBank(torch.from_numpy(g.randint(0, 256, (32, 3, 8, 8)).astype(np.uint8)))
    plans = {"paper": dict(mode="coarse-to-fine", coarse=3, fine=6, estimator="mean"),
             "same forwards": dict(mode="adaptive", coarse=3, fine=6, budget="paper")}
    result = convergence.study(ConvStack(2), image, "DN", (12, 12, 8), truth_draws=20, seeds=range(3), plans=plans,
                               patches=bank, tol=2.0, sigma=25)
    forwards = {(r["plan"], r["seed"]): r["forwards"] for r in result["rows"]}
    assert len({forwards["paper", s] for s in range(3)}) > 1  # the gate lets a different number through per seed
    assert all(forwards["same forwards", s] == forwards["paper", s] for s in range(3))
