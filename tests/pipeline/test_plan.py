"""Planning a run (cem_fast/pipeline/plan.py): the image as the task needs it."""
import numpy as np
import pytest

from helpers import dim_run, random_bank


@pytest.fixture
def bank8(rng):
    return random_bank(rng, 8)


def test_sr_image_is_cropped_to_a_multiple_of_the_scale_and_says_so(bank8, rng):
    img = rng.randint(0, 256, (18, 17, 3)).astype(np.uint8)
    res = dim_run(img, bank8, model="bicubic", task="SR", scale=4)
    assert tuple(res.gt.shape) == (3, 16, 16)
    assert res.extra["cropped_from"] == [18, 17]
