"""Synthetic rain streaks (cem_fast/rain.py): presets, seeding, small images, the motion kernel."""
import numpy as np

from cem_fast.rain import PRESETS, motion_kernel, rain_layer, seed_from_name


def test_rain_layer_presets_and_seeding():
    a, beta = rain_layer(64, 48, seed=2, preset="medium")
    assert a.shape == (64, 48) and abs(a.min()) < 1e-9 and abs(a.max() - 255) < 1e-9
    assert 0.6 <= beta <= 1.0
    b, _ = rain_layer(64, 48, seed=2, preset="medium")
    c, _ = rain_layer(64, 48, seed=3, preset="medium")
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # more streaks in "large" than in "small": mean intensity after normalisation is higher
    means = {p: np.mean([rain_layer(96, 96, s, p)[0].mean() for s in range(3)]) for p in ("small", "large")}
    assert means["large"] > means["small"]
    assert seed_from_name("rain-12_x3.png") == 12 and seed_from_name("clean.png") == 0
    assert set(PRESETS) == {"small", "medium", "large", "random"}


def test_rain_on_an_image_smaller_than_the_streaks():
    layer, _ = rain_layer(12, 10, seed=1, preset="large")  # streaks 45-55 px long
    assert layer.shape == (12, 10) and np.isfinite(layer).all()


def test_motion_kernel_is_a_rotated_line():
    k = motion_kernel(9, 45, 1)  # angle - 45 = 0: the diagonal itself
    assert np.allclose(k, np.eye(9))
    k = motion_kernel(9, 90, 1)  # rotated by 45 degrees: mass leaves the diagonal
    assert k.sum() > 5 and np.trace(k) < k.sum() - 1
