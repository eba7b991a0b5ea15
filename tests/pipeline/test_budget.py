"""What a run will cost (cem_fast/pipeline/budget.py). Many ROIs: the cheaper of one shared pass and one run per
ROI, chosen by counted input pixels and said in the summary; either way each map is its single-ROI run's. An
honest plan line, and a progress bar that only moves forward."""
import re

import numpy as np
import pytest
import torch

import cem_fast
from cem_fast.patches import PatchBank


class BoxBlur(torch.nn.Module):
    """A local denoiser: a 9x9 box blur (receptive-field radius 4 px)."""

    def forward(self, x):
        return torch.nn.functional.avg_pool2d(x, 9, stride=1, padding=4, count_include_pad=False)


@pytest.fixture
def image(rng):
    return rng.randint(0, 256, (128, 128, 3)).astype(np.uint8)


@pytest.fixture
def bank(rng):
    return PatchBank(torch.from_numpy(rng.randint(0, 256, (16, 3, 8, 8)).astype(np.uint8)))


ARGS = dict(task="DN", sigma=30, coarse=2, fine=2, seed=3, batch_size=16)


def test_a_grid_whose_union_is_the_image_runs_one_run_per_roi_with_the_single_maps(image, bank):
    """Every intervention on the union's crop (the whole image): one run per ROI is cheaper."""
    maps = cem_fast.causal_effect_maps(BoxBlur(), image, roi_grid=32, patches=bank, windows="crop", **ARGS)
    plan = maps[0].extra["plan"]["rois"]
    assert plan["chosen"] == "per-roi", plan
    assert plan["per_roi_px_per_draw"] * 1.25 < plan["shared_px_per_draw"]
    for j in (0, 5, 15):  # a corner, an inner and the last tile: each is exactly its own single run
        roi = maps[j].roi
        single = cem_fast.causal_effect_map(BoxBlur(), image, roi=roi.as_tuple(), patches=bank, windows="crop",
                                            **ARGS)
        np.testing.assert_array_equal(maps[j].effect, single.effect)
        np.testing.assert_array_equal(maps[j].samples_coarse, single.samples_coarse)
        assert maps[j].num_forwards == single.num_forwards


def test_with_windows_of_their_own_one_shared_pass_serves_the_grid(image, bank):
    """Each intervention on its own window serves every ROI it can change: the shared pass is the cheaper plan,
    and every map still equals its single run."""
    maps = cem_fast.causal_effect_maps(BoxBlur(), image, roi_grid=32, patches=bank, windows="on", **ARGS)
    plan = maps[0].extra["plan"]["rois"]
    assert plan["chosen"] == "shared" and plan["shared_px_per_draw"] < plan["per_roi_px_per_draw"], plan
    assert maps[0].extra["locality"]["windows"]["used"]
    for j in (0, 6, 15):
        single = cem_fast.causal_effect_map(BoxBlur(), image, roi=maps[j].roi.as_tuple(), patches=bank,
                                            windows="on", **ARGS)
        np.testing.assert_array_equal(maps[j].samples_coarse, single.samples_coarse)
        np.testing.assert_array_equal(maps[j].effect, single.effect)


def test_the_shared_pass_gives_the_same_maps_and_is_kept_where_it_is_cheaper(image, bank):
    per_roi = cem_fast.causal_effect_maps(BoxBlur(), image, rois=[(40, 40, 16), (48, 56, 16)], patches=bank,
                                          **ARGS)
    assert per_roi[0].extra["plan"]["rois"]["chosen"] == "shared"  # overlapping ROIs: one pass is cheaper
    forced = cem_fast.causal_effect_maps(BoxBlur(), image, rois=[(40, 40, 16), (48, 56, 16)], patches=bank,
                                         roi_plan="per-roi", **ARGS)
    assert forced[0].extra["plan"]["rois"]["why"] == "asked (roi_plan)"
    for a, b in zip(per_roi, forced):
        np.testing.assert_array_equal(a.effect, b.effect)


class RecordingBar:
    """Stands in for tqdm: records the fraction done after every change."""
    seen: list = []

    def __init__(self, total=0, **kwargs):
        self.total, self.n = total, 0
        RecordingBar.seen = []

    def _record(self):
        RecordingBar.seen.append((self.n, self.total))

    def update(self, k):
        self.n += k
        self._record()

    def refresh(self):
        self._record()

    def close(self):
        pass


def test_the_plan_is_said_and_the_progress_bar_only_moves_forward(image, bank, capsys, monkeypatch):
    import tqdm.auto
    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    res = cem_fast.causal_effect_map(BoxBlur(), image, roi=(40, 40, 16), patches=bank, progress=True,
                                     **{**ARGS, "fine": 6, "batch_size": 4})
    err = capsys.readouterr().err
    assert "locality probe" in err
    line = re.search(r"plan: (\d+) of 256 blocks can reach the 1 ROI: (\d+) coarse \+ at most (\d+) fine", err)
    assert line, err[-2000:]
    blocks = int(line.group(1))
    assert blocks == int(res.reachable.sum()) and int(line.group(2)) == 2 * blocks
    assert int(line.group(3)) == 6 * blocks
    fractions = [n / total for n, total in RecordingBar.seen if total]
    assert len(fractions) >= 5 and fractions[-1] == 1.0, RecordingBar.seen
    assert fractions == sorted(fractions), RecordingBar.seen  # the fine stage is in the total from the start
    n_done, total = RecordingBar.seen[-1]
    assert n_done == total == 2 * blocks + 6 * int(res.gated.sum())  # every intervention, counted once
    assert res.extra["plan"]["blocks"] == blocks and res.extra["plan"]["fine_forwards_at_most"] == 6 * blocks


def test_a_grid_too_large_for_one_pass_runs_one_roi_at_a_time(image, bank, monkeypatch):
    """The shared pass holds (blocks x ROIs) samples: where that would not fit in memory the ROIs run one at a time
    (each bounded by its own reach), said in the plan, instead of failing or swapping."""
    import cem_fast.pipeline.plan as plan_module
    monkeypatch.setattr(plan_module, "available_memory", lambda: 1 << 16)  # 64 KiB
    maps = cem_fast.causal_effect_maps(BoxBlur(), image, roi_grid=64, patches=bank, **ARGS)
    plan = maps[0].extra["plan"]["rois"]
    assert plan["chosen"] == "per-roi" and "more than half of the 0.0 GiB available" in plan["why"], plan
    monkeypatch.undo()
    for j in (0, 3):
        single = cem_fast.causal_effect_map(BoxBlur(), image, roi=maps[j].roi.as_tuple(), patches=bank, **ARGS)
        np.testing.assert_array_equal(maps[j].effect, single.effect)


@pytest.mark.parametrize("engine", ["windows", "incremental"])
def test_a_blocks_fine_draws_score_only_the_rois_that_gated_it(image, bank, monkeypatch, engine):
    """Many ROIs, coarse-to-fine: the fine stage's tables are cut to the gated (ROI, block) pairs (a block near a
    tile's edge is gated by one tile and not by its neighbour); every map, gate and fine sample equals its single
    run's all the same."""
    from cem_fast.pipeline.runner import Runner
    from model_factories import ConvStack
    narrowed = []
    real = Runner.narrow_to
    monkeypatch.setattr(Runner, "narrow_to", lambda self, pairs: narrowed.append(pairs.copy()) or real(self, pairs))
    model = ConvStack(4) if engine == "incremental" else BoxBlur()
    kw = dict(ARGS, patches=bank, tol=0.005, windows="on", incremental="on" if engine == "incremental" else "off")
    maps = cem_fast.causal_effect_maps(model, image[:64, :64], roi_grid=32, roi_plan="shared", **kw)
    assert maps[0].extra["locality"][engine]["used"], maps[0].extra["locality"]
    assert len(narrowed) == 1
    gated = np.stack([m.gated.reshape(-1) for m in maps])
    np.testing.assert_array_equal(narrowed[0], gated)
    assert (gated.any(0) & ~gated).any(), "some block gated by one tile and not by another"
    for j, m in enumerate(maps):
        single = cem_fast.causal_effect_map(model, image[:64, :64], roi=m.roi.as_tuple(), **kw)
        np.testing.assert_array_equal(m.gated, single.gated)
        np.testing.assert_allclose(m.effect, single.effect, atol=1e-9)
        np.testing.assert_allclose(m.samples_fine, single.samples_fine, atol=1e-9, equal_nan=True)


def test_a_resumed_run_whose_gates_moved_never_reads_an_unchanged_score_as_a_sample(tmp_path, monkeypatch):
    """The narrowed fine stage scores the pairs that did not gate as unchanged (Y(I)). A resumed run whose gates
    moved (its Y(I) recomputed on another device, a recomputed coarse chunk) must not read those rows as samples of
    a pair that gates now: the fine stage's cache rows belong to the gates they were computed for. Found by review:
    nested ROIs, an inner ROI's effect just below tol, then just above."""
    import cem_fast.pipeline.stages as stages
    rng = np.random.RandomState(0)  # an image and bank with such a pair
    img = rng.randint(0, 256, (64, 64, 3)).astype(np.uint8)
    bank = PatchBank(torch.from_numpy(rng.randint(0, 256, (16, 3, 8, 8)).astype(np.uint8)))
    kw = dict(ARGS, patches=bank, windows="on", incremental="off", rois=[(8, 8, 48), (24, 24, 16)],
              roi_plan="shared", tol=0.01)
    cem_fast.causal_effect_maps(BoxBlur(), img, cache=tmp_path / "cache", **kw)
    real, flipped = stages.effects, []

    def inner_gates_one_more(origin, got):  # of the blocks the outer ROI gates, the one whose inner effect is
        e = real(origin, got).copy()        # largest below tol: now just above it (the fine blocks stay the same)
        if e.ndim == 3 and e.shape[0] == 2:  # the coarse stage's gate (ROIs, blocks, draws)
            inner, outer = np.abs(e[1]).max(1), np.abs(e[0]).max(1) >= 0.01
            candidates = np.where((inner < 0.01) & (inner > 0) & outer, inner, -1)
            k = int(np.argmax(candidates))
            flipped.append(candidates[k] > 0)
            e[1, k] = np.sign(e[1, k]) * np.maximum(np.abs(e[1, k]), 0.0101)
        return e
    monkeypatch.setattr(stages, "effects", inner_gates_one_more)
    resumed = cem_fast.causal_effect_maps(BoxBlur(), img, cache=tmp_path / "cache", **kw)
    fresh = cem_fast.causal_effect_maps(BoxBlur(), img, **kw)
    assert flipped and all(flipped), "a pair just below tol in the first run"
    np.testing.assert_array_equal(resumed[1].gated, fresh[1].gated)
    np.testing.assert_allclose(resumed[1].samples_fine, fresh[1].samples_fine, atol=1e-9, equal_nan=True)
    np.testing.assert_allclose(resumed[1].effect, fresh[1].effect, atol=1e-9)
