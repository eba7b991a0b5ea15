"""A map as pixels: the colour scales that show ordinary effects (auto, the paper's, a number of dB), their readable
bounds, and the locality crop outlined on the overlay."""
import matplotlib
import numpy as np
import pytest

import cem_fast
from cem_fast import map_pictures
from helpers import make_result, random_bank, random_image
from model_factories import ConvStack

# ---- colour scales ---------------------------------------------------------------------------------------------------

WHITE = np.array([255, 255, 255])


def block_colour(picture, row, col):
    return picture[row * 8 + 4, col * 8 + 4].astype(int)


def seismic(v):
    return np.array(matplotlib.colormaps["seismic"](v)[:3])


def test_auto_scale_makes_a_tenth_of_a_db_visible_and_paper_keeps_the_fixed_bounds():
    res = make_result([[0.0, 0.1, 0.0], [0.0, 0.0, 0.0]])  # ROI = block (0, 0)
    auto = block_colour(map_pictures.overlay(res, "auto"), 0, 1)
    assert np.abs(auto - WHITE).max() > 150, auto  # a clearly red block, not near-white
    assert np.abs(block_colour(map_pictures.overlay(res, "auto"), 1, 1) - WHITE).max() <= 2  # 0 stays white
    # "paper": DN bound 1 dB, |c|^(1/1.2); on a white picture the colours themselves
    assert np.array_equal(block_colour(map_pictures.overlay(res, "paper"), 0, 1),
                          np.round(seismic((0.1 ** (1 / 1.2) + 1) / 2) * 255))
    # background="paper": blended 0.9 map + 0.1 degraded input (white), as the paper does
    expected = np.round((0.9 * seismic((0.1 ** (1 / 1.2) + 1) / 2) + 0.1) * 255)
    assert np.array_equal(block_colour(map_pictures.overlay(res, "paper", background="paper"), 0, 1), expected)
    for task, bound in (("DN", 1.0), ("SR", 2.5), ("DR", 2.0)):
        cs = make_result([[0.0, 0.1]], task=task).colour_scale("paper")
        assert (cs.bound, cs.gamma) == (bound, 1.2)


def test_auto_bound_is_readable_never_zero_and_ignores_the_roi():
    assert make_result([[9.0, 0.23, 0.0]]).colour_scale().bound == 0.25  # the ROI's 9 dB does not set it
    assert make_result([[0.0, -0.7, 0.04]]).colour_scale().bound == 0.8
    assert make_result([[0.0, 0.0, 0.0]]).colour_scale().bound == 0.01  # all zero: tol, not 0
    assert map_pictures.readable_bound(0.3) == 0.3 and map_pictures.readable_bound(0.31) == 0.4
    assert map_pictures.readable_bound(1.26) == 1.5 and map_pictures.readable_bound(12) == 15


def test_a_number_is_a_linear_bound_in_db():
    res = make_result([[0.0, 0.25, 1.0]])
    pic = map_pictures.overlay(res, 0.5)
    expected = np.round(seismic(0.75) * 255)  # 0.25 of 0.5 dB, linear; on a white ground truth the colour itself
    assert np.array_equal(block_colour(pic, 0, 1), expected)
    assert np.array_equal(block_colour(pic, 0, 2), np.round(seismic(1.0) * 255))  # clipped
    for bad in (0, -1, float("inf"), "big", True):
        with pytest.raises(ValueError, match="scale must be 'auto', 'paper' or a positive number of dB"):
            res.colour_scale(bad)


# ---- the overlay -----------------------------------------------------------------------------------------------------

@pytest.fixture
def image(rng):
    return random_image(rng, 48, 64)


@pytest.fixture
def bank(rng):
    return random_bank(rng, 32)


def test_overlay_outlines_the_crop_in_speed_mode(image, bank):
    res = cem_fast.causal_effect_map(ConvStack(2), image, task="DN", roi=(16, 24, 16), coarse=1, fine=0,
                                     patches=bank)
    y, x, h, w = res.extra["locality"]["crop"]
    pic = map_pictures.overlay(res)
    assert tuple(pic[y + h // 2, x]) == (96, 96, 96) and tuple(pic[y + h - 1, x + w // 2]) == (96, 96, 96)
    exact = cem_fast.causal_effect_map(ConvStack(2), image, task="DN", roi=(16, 24, 16), coarse=1, fine=0,
                                       patches=bank, locality="off")
    assert tuple(map_pictures.overlay(exact)[y + h // 2, x]) != (96, 96, 96)


@pytest.mark.parametrize("box", [(8, 16, 24, 32), (0, 0, 48, 64), (40, 48, 8, 16), (16, 8, 16, 8)])
def test_a_box_of_the_map_picture_is_that_part_of_the_whole_picture(image, bank, box):
    """What a field draws per tile: the crop alone, the same pixels as the whole picture's crop."""
    res = cem_fast.causal_effect_map(ConvStack(3), image, task="DN", roi=(16, 24, 16), coarse=2, fine=2,
                                     patches=bank, tol=0)
    y, x, h, w = box
    whole = map_pictures.map_picture(res)
    np.testing.assert_array_equal(map_pictures.map_picture(res, box=box), whole[y:y + h, x:x + w])
    assert (whole[y:y + h, x:x + w] != whole[y:y + h, x:x + w].mean()).any()  # not a blank part
    with pytest.raises(ValueError, match="paper"):
        map_pictures.map_picture(res, background="paper", box=box)
