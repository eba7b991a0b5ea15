"""Per-map metrics with intervals (cem_fast.metrics, CEMResult.metrics): each metric on maps of known values, the
intervals' coverage on many maps drawn around a known truth, and the radii of conv stacks of known reach."""
import json

import numpy as np
import pytest
import torch

import cem_fast
from cem_fast.geometry import ROI
from cem_fast.intervals import decide, t975
from cem_fast.metrics import INTERVAL_METRICS, block_distances, compute_metrics
from cem_fast.patches import PatchBank
from cem_fast.result import CEMResult
from model_factories import Blur


def made_result(effect, se=None, df=None, roi=(8, 8, 8), block=4, reachable=None, gated=None, mode="exhaustive",
                tol=0.01):
    """A CEMResult built from arrays (no model run): ``effect`` (rows, cols) dB with its ``se``."""
    rows, cols = effect.shape
    draws = np.full(effect.shape, 50)
    if reachable is not None:
        draws = np.where(reachable, draws, 0)
    gt = torch.zeros(3, rows * block, cols * block, dtype=torch.uint8)
    return CEMResult(
        cem=np.where(np.abs(effect) >= tol, effect, 0.0), effect=effect, samples_coarse=np.zeros(effect.shape + (3,)),
        samples_fine=np.zeros(effect.shape + (50 if mode == "coarse-to-fine" else 0,)),
        gated=np.ones(effect.shape, bool) if gated is None else gated, psnr_origin=30.0, roi=ROI.parse(roi),
        block=block, scale=1, tol=tol, task={"task": "DN"}, seed=0, mode=mode, model_name="m", image_name="i",
        num_forwards=0, wall_time=0.0, backend="torch", device="cpu", patch_bank={}, gt=gt, degraded=gt, output=gt,
        reachable=reachable, effect_se=se, effect_draws=draws, effect_df=df)


def test_distances_are_from_block_centres_to_the_roi_rectangle():
    d = block_distances((4, 5), 4, (16, 18), (4, 4, 8, 4))  # ROI rows 4..12, cols 4..8; last column 2 px wide
    assert d[1, 1] == 0 and d[2, 1] == 0  # inside
    assert d[0, 1] == 2.0  # centre row 2, the ROI starts at 4
    assert d[1, 2] == 2.0  # centre col 10, the ROI ends at 8
    assert d[1, 4] == pytest.approx(17 - 8)  # partial edge block: centre of cols 16..18
    assert d[0, 0] == pytest.approx(np.hypot(2, 2))


def test_each_metric_on_a_map_of_known_values():
    """A 6x6 map of 4-px blocks, ROI the 2x2 blocks in the middle: exact values (se 0) give every metric by hand."""
    eff = np.zeros((6, 6))
    eff[2:4, 1] = 1.0          # ring 0 (distance 2), left of the ROI: +2 dB in all
    eff[1, 2] = -0.5           # ring 0, above
    eff[0, 3] = 0.25           # ring 1 (distance 6)
    eff[5, 5] = -0.25          # ring 1, diagonal: distance hypot(6, 6) = 8.49 -> ring 2
    eff[2:4, 2:4] = 9.0        # the ROI's own blocks: never rated
    reach = np.ones((6, 6), bool)
    reach[:, 0] = False        # the first column cannot reach the ROI: skipped
    res = made_result(eff, se=np.where(reach, 0.0, 0.0), reachable=reach)
    m = res.metrics()
    assert m["blocks_outside_roi"] == 32 and m["skipped_blocks"] == 6 and m["screened_blocks"] == 0
    assert m["positive_share"] == 3 / 32 and m["negative_share"] == 2 / 32
    assert m["no_effect_share"] == (32 - 6 - 5) / 32 and m["undecided_share"] == 0 and m["skipped_share"] == 6 / 32
    assert sum(m[k] for k in ("positive_share", "negative_share", "no_effect_share", "undecided_share",
                              "screened_share", "skipped_share")) == pytest.approx(1)
    assert m["positive_mass_db"]["value"] == 2.25 and m["negative_mass_db"]["value"] == -0.75
    assert m["negative_mass_share"]["value"] == pytest.approx(0.75 / 3)
    assert (m["effect_min_db"]["value"], m["effect_max_db"]["value"], m["effect_range_db"]["value"]) == (-0.5, 1, 1.5)
    # |CE| mass 3: 2.5 at distance 2 (83 %), 0.25 at 6 (92 %), 0.25 at 8.49 -> 50 % within 2 px, 90 % within 6
    assert m["radius50_px"]["value"] == 2.0 and m["radius90_px"]["value"] == 6.0
    assert m["far_px"] == 8 and m["far_mass_share"]["value"] == pytest.approx(0.25 / 3)
    p = m["profile"]
    assert p["ring_px"] == [0, 4, 8]
    ring = np.floor(block_distances((6, 6), 4, (24, 24), (8, 8, 8, 8)) / 4)
    outside = ~res.roi_mask
    for k in range(3):
        sel = outside & (ring == k)
        assert p["blocks"][k] == sel.sum()
        assert p["mean_db"][k] == pytest.approx(eff[sel].sum() / sel.sum())
        assert p["mean_abs_db"][k] == pytest.approx(np.abs(eff[sel]).sum() / sel.sum())
    # no uncertainty: every interval is the value
    assert all(m[k]["low"] == m[k]["value"] == m[k]["high"] for k in INTERVAL_METRICS)
    assert res.metrics(far_px=1)["far_mass_share"]["value"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="far_px"):
        res.metrics(far_px=-1)


def test_radius90_moves_out_with_the_mass():
    eff = np.zeros((9, 9))
    eff[4, 3] = 1.0   # distance 2
    eff[4, 1] = 1.0   # distance 10
    res = made_result(eff, se=np.zeros((9, 9)), roi=(16, 16, 4))
    m = res.metrics()
    assert m["radius50_px"]["value"] == 2.0 and m["radius90_px"]["value"] == 10.0
    assert m["far_mass_share"]["value"] == pytest.approx(0.5)  # far_px = the ROI's size, 4 px


def test_screened_blocks_count_apart_and_as_zero():
    eff = np.full((6, 6), 0.005)
    eff[1, 1] = 0.5
    se = np.full((6, 6), np.nan)   # screened: no interval
    se[1, 1] = 0.01
    gated = np.zeros((6, 6), bool)
    gated[1, 1] = True
    res = made_result(eff, se=se, gated=gated, mode="coarse-to-fine", roi=(8, 8, 8))
    m = res.metrics()
    assert m["screened_blocks"] == 31 and m["rated_blocks"] == 1
    assert m["screened_share"] == 31 / 32 and m["positive_share"] == 1 / 32
    assert m["positive_mass_db"]["value"] == pytest.approx(0.5, abs=2e-4)  # the screened add 0, not 31 x 0.005


def test_noise_adds_no_mass_to_blocks_without_an_effect():
    """Blocks of effect 0 estimated with noise: the plain |CE| sum grows with their number, the noise-corrected
    mass does not (on average), and its interval covers the truth."""
    rng = np.random.default_rng(3)
    eff = np.zeros((12, 12))
    eff[5, 3] = 1.0
    se = np.full((12, 12), 0.05)
    est = eff + se * rng.standard_normal(eff.shape)
    m = made_result(est, se=se, roi=(16, 16, 16)).metrics()
    plain = np.abs(est[~made_result(est, se=se, roi=(16, 16, 16)).roi_mask]).sum()
    assert plain > 4  # 139 null blocks x 0.04 dB
    pos, neg = m["positive_mass_db"], m["negative_mass_db"]
    assert 0.8 < pos["value"] - neg["value"] < 1.5  # the truth: 1 dB
    assert pos["low"] <= 1.0 <= pos["high"] and neg["high"] == 0.0
    assert m["radius90_px"]["low"] == 2.0  # within the noise, the mass may all lie next to the ROI


def _truth():
    """A 16x16 map of 8-px blocks around a 16-px ROI: effects decaying with distance, a hurting ring at 16-24 px,
    one strongest helping and one strongest hurting block, nothing beyond 30 px, blocks beyond 40 px skipped."""
    dist = block_distances((16, 16), 8, (128, 128), (56, 56, 16, 16))
    outside = np.ones((16, 16), bool)
    outside[7:9, 7:9] = False
    skipped = outside & (dist > 40)
    near = dist < 30
    truth = np.where(near, 0.8 * np.exp(-dist / 10) - 0.25 * ((dist >= 16) & (dist < 24)), 0.0)
    truth[6, 8], truth[5, 10] = 1.2, -0.5
    se = np.where(skipped, 0.0, np.where(near, np.abs(truth) * 0.1 + 0.01, 0.003))
    return dist, outside, skipped, truth, se


def test_intervals_cover_the_truth_at_their_nominal_rate():
    """300 maps drawn around a known truth with the given standard errors (Student t, 46 df, as 50 fine draws
    with the control variate give): each 95 % interval covers the truth's metric in 90-99 % of them (the radii,
    which take a few values only and here the same in every map, in at least 90 %). Standard errors of 10 % of
    each effect + 0.01 dB; with twice those, where many blocks' effects are a few standard errors, the masses'
    and extremes' intervals cover only 78-94 % (the limit the module docstring states)."""
    dist, outside, skipped, truth, se = _truth()
    df = np.full(truth.shape, 46.0)
    none = np.zeros(truth.shape, bool)
    want = compute_metrics(truth, np.zeros_like(se), df, np.zeros(truth.shape, np.int8), outside, none, skipped,
                           dist, 8, 16.0)
    rng = np.random.default_rng(11)
    n = 300
    hits = {k: 0 for k in INTERVAL_METRICS}
    ring_hits = {"mean_db": [], "mean_abs_db": []}
    for i in range(n):
        est = truth + se * rng.standard_t(46, truth.shape)
        half = t975(df) * se
        got = compute_metrics(est, se, df, decide(est - half, est + half, 0.01), outside, none, skipped, dist, 8,
                              16.0, n_boot=400, boot_seed=i)
        for k in INTERVAL_METRICS:
            hits[k] += got[k]["low"] - 1e-9 <= want[k]["value"] <= got[k]["high"] + 1e-9
        for k in ring_hits:
            t, lo, hi = (np.array(x) for x in (want["profile"][k], got["profile"][f"{k}_low"],
                                              got["profile"][f"{k}_high"]))
            ring_hits[k].append(((lo - 1e-9 <= t) & (t <= hi + 1e-9)).mean())
    rate = {k: v / n for k, v in hits.items()}
    for k, r in rate.items():
        if k.startswith("radius"):
            assert r >= 0.9, (k, rate)
        else:
            assert 0.9 <= r <= 0.99, (k, rate)
    for k, r in ring_hits.items():
        assert 0.9 <= np.mean(r) <= 0.99, (k, np.mean(r))


def test_radius_intervals_cover_when_the_radius_is_uncertain():
    """|CE| mass 0.85 / 0.1 / 0.05 dB at 4 / 12 / 20 px: the 90 % radius is 12 px, and 50 % is 4; with standard
    errors of 0.025 dB the estimated 90 % radius is 4, 12 or 20 px from map to map, and its interval covers 12 in
    at least 93 % of 200 maps (more than 95 % is expected of a quantity with three values)."""
    dist = block_distances((9, 9), 8, (72, 72), (32, 32, 8, 8))
    outside = dist > 0
    truth = np.zeros((9, 9))
    truth[4, 3], truth[4, 6], truth[4, 7] = 0.85, 0.1, 0.05
    se = np.where(truth != 0, 0.025, 0.0)
    df = np.full(truth.shape, 46.0)
    none = np.zeros(truth.shape, bool)
    want = compute_metrics(truth, np.zeros_like(se), df, np.zeros(truth.shape, np.int8), outside, none, none, dist,
                           8, 8.0)
    assert want["radius90_px"]["value"] == 12 and want["radius50_px"]["value"] == 4
    rng = np.random.default_rng(5)
    hits, values = 0, set()
    for i in range(200):
        est = truth + se * rng.standard_t(46, truth.shape)
        got = compute_metrics(est, se, df, np.zeros(truth.shape, np.int8), outside, none, none, dist, 8, 8.0,
                              n_boot=400, boot_seed=i)["radius90_px"]
        hits += got["low"] <= 12 <= got["high"]
        values.add(got["value"])
    assert hits / 200 >= 0.93, hits
    assert len(values) > 1


def test_metrics_are_in_summary_npz_and_report(tmp_path):
    eff = np.zeros((6, 6))
    eff[1, 1], eff[4, 4] = 0.5, -0.2
    res = made_result(eff, se=np.full((6, 6), 0.01))
    m = res.metrics()
    assert res.metrics() == m  # deterministic
    res.save(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["metrics"] == json.loads(json.dumps(m))
    with np.load(tmp_path / "result.npz") as z:
        assert json.loads(str(z["metrics"])) == summary["metrics"]
        np.testing.assert_allclose(z["profile_mean_abs_db"], m["profile"]["mean_abs_db"])
    assert "|CE| mass within" in (tmp_path / "report.html").read_text()


def smooth_image(seed: int, size: int = 40) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    ph = np.random.RandomState(seed).rand(3) * 6
    return (127 + 100 * np.stack([np.sin(2 * yy + ph[c]) * np.cos(1.5 * xx + ph[c]) for c in range(3)], -1)
            ).astype(np.uint8)


def test_a_deeper_stack_draws_on_farther_context():
    """1 layer of 3x3 (reach 1 px) against 6 layers of 5x5 (reach 12 px), on two smooth images, 4-px blocks: the
    shallow net's |CE| mass all lies next to the ROI, the deep one's 90 % radius is farther, with 95 % intervals
    that do not overlap."""
    bank = PatchBank(torch.from_numpy(np.random.RandomState(0).randint(0, 256, (32, 3, 4, 4)).astype(np.uint8)))
    for seed in (1, 2):
        r90 = {}
        for name, net in (("shallow", Blur(1, 3)), ("deep", Blur(6, 5))):
            res = cem_fast.causal_effect_map(net, smooth_image(seed), task="identity", roi=(16, 16, 8), block=4,
                                             coarse=3, fine=8, patches=bank, seed=0, progress=False)
            r90[name] = res.metrics()["radius90_px"]
        assert r90["shallow"]["high"] < r90["deep"]["low"], r90
        assert r90["shallow"]["high"] <= np.hypot(2, 2)  # ring 0: next to the ROI
