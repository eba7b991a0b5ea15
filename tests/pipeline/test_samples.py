"""The samples of a run and what they give (cem_fast/pipeline/samples.py): non-finite samples are errors,
never averaged, and so is an infinite effect (a ROI the model restores exactly)."""
import numpy as np
import pytest
import torch

import cem_fast
from helpers import exact_cem, random_bank, random_image


@pytest.fixture
def img(rng):
    return random_image(rng, 24, 32)


@pytest.fixture
def bank(rng):
    return random_bank(rng, 16)


class BadWhenCornerChanges(torch.nn.Module):
    """Outputs ``value`` everywhere for inputs whose top-left pixel differs from the clean image's."""

    def __init__(self, corner, value):
        super().__init__()
        self.corner, self.value = corner, value

    def forward(self, x):
        out = x.clone()
        out[x[:, 0, 0, 0] != self.corner] = self.value
        return out


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_inf_outputs_are_reported_not_averaged(img, bank, value):
    corner = torch.tensor(float(img[0, 0, 0])) / 255
    with pytest.raises(ValueError, match=r"NaN/Inf outputs in the ROI for \d+ coarse interventions \(first: "
                                         r"block \(0, 0\), draw 0\)"):
        exact_cem(BadWhenCornerChanges(corner, value), img, bank, task="identity")


def test_a_roi_the_model_restores_exactly_is_one_clear_error(bank):
    flat = np.full((16, 16, 3), 77, np.uint8)
    with pytest.raises(ValueError, match="reproduces the ground truth exactly there.*Y\\(I\\) is infinite") as e:
        cem_fast.causal_effect_map(torch.nn.Identity(), flat, task="identity", roi=(0, 0, 8), patches=bank,
                                   coarse=1, fine=1)
    assert "\n" not in str(e.value)
