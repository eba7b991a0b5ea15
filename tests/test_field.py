"""cem_fast.field: a causal field's maps are the single runs', it resumes after a kill, refuses what it must."""
import numpy as np
import pytest

import cem_fast
from cem_fast.metrics import map_metrics
from helpers import random_bank, random_image
from model_factories import ConvStack

KW = dict(task="DN", coarse=2, fine=5, seed=3)


@pytest.fixture
def img(rng):
    """72x80: 16-px tiles leave ragged ones at the bottom edge (72 = 4 x 16 + 8)."""
    return random_image(rng, 72, 80)


@pytest.fixture
def bank64(rng):
    return random_bank(rng, 64)


def _single(model, img, bank, roi, **kw):
    return cem_fast.causal_effect_map(model, img, roi=roi.as_tuple(), patches=bank, **{**KW, **kw})


def _same_map(a, b):
    assert a.roi == b.roi
    np.testing.assert_allclose(a.effect, b.effect, atol=1e-3, rtol=0)
    np.testing.assert_array_equal(a.gated, b.gated)
    np.testing.assert_array_equal(a.reachable, b.reachable)
    assert a.psnr_origin == pytest.approx(b.psnr_origin, abs=1e-6)
    np.testing.assert_allclose(a.samples_coarse, b.samples_coarse, atol=1e-6, rtol=0)
    np.testing.assert_allclose(a.samples_fine, b.samples_fine, atol=1e-6, rtol=0)
    np.testing.assert_allclose(a.effect_se, b.effect_se, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(a.effect_draws, b.effect_draws)


@pytest.mark.parametrize("out", [None, "folder"])
def test_every_tile_map_equals_its_single_run(img, bank64, tmp_path, out):
    model = ConvStack(3)
    field = cem_fast.causal_field(model, img, tile=16, patches=bank64, out=out and tmp_path / "f", **KW)
    assert field.shape == (5, 5) and len(field.tiles) == 25
    assert field.tiles[-1].as_tuple() == (64, 64, 8, 16)  # the ragged bottom row is there
    for y, x in [(0, 0), (40, 33), (71, 79)]:
        got = field.map(y, x)
        assert got.roi.y <= y < got.roi.y + got.roi.height and got.roi.x <= x < got.roi.x + got.roi.width
        _same_map(got, _single(model, img, bank64, got.roi))
    assert field.info["num_forwards"] > 0 and field.info["chunks"]["computed"] == field.info["chunks"]["count"]


def test_exhaustive_field_equals_single_runs(img, bank64):
    model = ConvStack(2)
    field = cem_fast.causal_field(model, img, tile=32, patches=bank64, mode="exhaustive", samples=3,
                                  **{**KW, "coarse": 0, "fine": 3})
    for j in (0, len(field.tiles) - 1):
        res = field.tile_result(j)
        _same_map(res, _single(model, img, bank64, res.roi, mode="exhaustive", samples=3, coarse=0, fine=3))


def test_each_intervention_runs_once_for_every_tile(img, bank64):
    """The field's forwards are one per (reachable block, draw) and per gated block's fine draw, far fewer than
    the tiles' single runs together."""
    model = ConvStack(3)
    field = cem_fast.causal_field(model, img, tile=16, patches=bank64, **KW)
    loop = sum(_single(model, img, bank64, t).num_forwards for t in field.tiles[:5])
    assert field.info["num_forwards"] * 5 < loop * len(field.tiles)


class Interrupting(ConvStack):
    """Raises KeyboardInterrupt at its ``after``-th batch of interventions (a kill mid-field)."""

    def __init__(self, after):
        super().__init__(3)
        self.after, self.calls = after, 0

    def forward(self, x):
        self.calls += 1
        if self.after is not None and self.calls == self.after:
            raise KeyboardInterrupt
        return super().forward(x)


def test_a_killed_field_resumes_from_its_chunks(img, bank64, tmp_path):
    out = tmp_path / "f"
    small = dict(tile=16, patches=bank64, out=out, max_memory=60_000, batch_size=4, locality="off",
                 incremental="off", windows="crop", **KW)
    whole = cem_fast.causal_field(ConvStack(3), img, **{**small, "out": tmp_path / "whole"})
    assert whole.info["chunks"]["count"] >= 4
    with pytest.raises(KeyboardInterrupt):
        cem_fast.causal_field(Interrupting(after=60), img, **small)
    saved = sorted((out / "chunks").glob("*.npz"))
    assert 0 < len(saved) < whole.info["chunks"]["count"]
    again = Interrupting(after=None)
    resumed = cem_fast.causal_field(again, img, **small)
    assert resumed.info["chunks"]["reused"] == len(saved)
    assert resumed.info["num_forwards"] < whole.info["num_forwards"]
    for j in range(len(whole.tiles)):
        np.testing.assert_array_equal(resumed.tile_result(j).effect, whole.tile_result(j).effect)


def test_a_corrupt_chunk_is_recomputed(img, bank64, tmp_path):
    kw = dict(tile=16, patches=bank64, out=tmp_path / "f", max_memory=60_000, **KW)
    first = cem_fast.causal_field(ConvStack(3), img, **kw)
    chunk = sorted((tmp_path / "f" / "chunks").glob("*.npz"))[1]
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    again = cem_fast.causal_field(ConvStack(3), img, **kw)
    assert again.info["chunks"]["dropped"] == 1 and again.info["chunks"]["computed"] == 1
    for j in range(len(first.tiles)):
        np.testing.assert_array_equal(again.tile_result(j).effect, first.tile_result(j).effect)


def test_a_folder_holding_another_field_is_refused(img, bank64, tmp_path):
    kw = dict(tile=16, patches=bank64, out=tmp_path / "f", **KW)
    cem_fast.causal_field(ConvStack(3), img, **kw)
    with pytest.raises(ValueError, match=r"holds another field \(its inputs differ in: seed\)"):
        cem_fast.causal_field(ConvStack(3), img, **{**kw, "seed": 4})
    other = cem_fast.causal_field(ConvStack(3), img, **{**kw, "seed": 4}, fresh=True)
    assert other.info["seed"] == 4 and other.info["chunks"]["reused"] == 0
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty and holds no field"):
        cem_fast.causal_field(ConvStack(3), img, **{**kw, "out": tmp_path / "g"})


@pytest.mark.parametrize("kw, message", [
    (dict(tile=0), "tile"), (dict(tile=16.5), "tile"), (dict(max_memory=-1), "max_memory"),
    (dict(rois=[(0, 0, 8)]), "does not take rois"), (dict(roi_grid=16), "does not take roi_grid"),
    (dict(cache="x"), "does not take cache"), (dict(mode="adaptive"), "coarse-to-fine or exhaustive"),
    (dict(sigmaa=3), "unknown task option 'sigmaa'"),
])
def test_bad_arguments_say_which_in_one_line(img, bank64, kw, message):
    with pytest.raises(ValueError, match=message) as e:
        cem_fast.causal_field(ConvStack(2), img, patches=bank64, **{**dict(tile=16), **KW, **kw})
    assert "\n" not in str(e.value)


def test_map_refuses_pixels_outside_the_output(img, bank64):
    field = cem_fast.causal_field(ConvStack(2), img, tile=32, patches=bank64, **KW)
    for y, x in [(72, 0), (0, -1), (1.5, 0)]:
        with pytest.raises(ValueError, match="output pixel"):
            field.map(y, x)


def test_metrics_are_each_tile_maps_metrics(img, bank64, tmp_path):
    field = cem_fast.causal_field(ConvStack(3), img, tile=16, patches=bank64, **KW)
    radius = field.metric("radius90_px")
    assert radius.shape == field.shape
    for j in (0, 12, 24):
        m = map_metrics(field.tile_result(j), n_boot=0)
        r, c = divmod(j, field.shape[1])
        assert radius[r, c] == pytest.approx(m["radius90_px"]["value"])
        assert field.metric("positive_share")[r, c] == pytest.approx(m["positive_share"])
    assert np.isfinite(radius).sum() >= 20 and np.nanmin(radius) > 0  # NaN: a tile whose map has no mass
    with pytest.raises(ValueError, match="metric must be one of"):
        field.metric("radius")


def test_save_draws_the_metrics_and_links_every_tile(img, bank64, tmp_path):
    field = cem_fast.causal_field(ConvStack(3), img, tile=16, patches=bank64, **KW)
    report = field.save(tmp_path / "s")
    names = {p.name for p in (tmp_path / "s").iterdir()}
    assert {"radius90.png", "far_mass.png", "positive_share.png", "negative_share.png", "effect_range.png",
            "metrics.npz", "overview.png", "report.html"} <= names
    with np.load(tmp_path / "s" / "metrics.npz") as z:
        np.testing.assert_array_equal(z["radius90_px"], field.metric("radius90_px"))
    page = report.read_text()
    for j in range(len(field.tiles)):
        assert f'href="tiles/{j:05d}.png"' in page
        assert (tmp_path / "s" / "tiles" / f"{j:05d}.png").is_file()


def test_a_finished_field_loads_from_its_folder(img, bank64, tmp_path):
    field = cem_fast.causal_field(ConvStack(3), img, tile=16, patches=bank64, out=tmp_path / "f", **KW)
    again = cem_fast.load_field(tmp_path / "f")
    assert again.shape == field.shape and again.info["num_forwards"] == field.info["num_forwards"]
    for j in (0, 7, 24):
        a, b = again.tile_result(j), field.tile_result(j)
        np.testing.assert_array_equal(a.effect, b.effect)
        np.testing.assert_array_equal(a.samples_fine, b.samples_fine)
    np.testing.assert_array_equal(again.metric("far_mass_share"), field.metric("far_mass_share"))
    with pytest.raises(ValueError, match="holds no finished field"):
        (tmp_path / "f" / "field.npz").unlink()
        cem_fast.load_field(tmp_path / "f")
