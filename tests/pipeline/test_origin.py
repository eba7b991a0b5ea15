"""Y(I), the ROI score of the unintervened input (cem_fast/pipeline/origin.py): a non-finite Y(I) is an error,
never a map, and a model whose output changes from call to call is refused at the end of the run."""
import hashlib

import pytest
import torch

from helpers import random_bank, random_image, small_run
from model_factories import Drifts, box_blur


@pytest.fixture
def image(rng):
    return random_image(rng, 32, 32)


@pytest.fixture
def bank(rng):
    # 256 patches: two draws of a block rarely paste the same patch (NaNOnRepeat must see the interventions once)
    return random_bank(rng, 256)


class NaNOnRepeat(torch.nn.Module):
    """A box blur that gives NaN in a patch for a single input it has seen before: here, the unintervened crop,
    which locality verifies and the run then scores as Y(I) (the interventions are new inputs each)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def forward(self, x):
        y = box_blur(x)
        if x.shape[0] == 1:
            key = hashlib.sha256(x.contiguous().cpu().numpy().tobytes()).hexdigest()
            if key in self.seen:
                y[..., 2:5, 2:5] = float("nan")
            self.seen.add(key)
        return y


@pytest.mark.parametrize("windows", ["crop", "auto"])
def test_nan_in_the_unintervened_roi_is_an_error_not_an_all_zero_map(image, bank, windows):
    """Before: Y(I) = NaN made every effect NaN, the display threshold turned them into 0 and the run passed
    (windows="crop"), or the NaN base was blamed on the interventions (windows="auto")."""
    with pytest.raises(ValueError, match=r"^model NaNOnRepeat output has NaN/Inf values in ROI \(y=8, x=8, 8x8\) "
                                         r"on the unintervened input: Y\(I\).* is undefined$"):
        small_run(NaNOnRepeat(), image, bank, windows=windows)


@pytest.mark.parametrize("locality", ["auto", "off"])
def test_a_model_whose_output_changes_between_calls_is_refused(image, bank, locality):
    with pytest.raises(RuntimeError, match=r"^model Drifts is not deterministic: run again on the unintervened "
                                           r"input at the end of the run, its outputs in the ROIs differ by "):
        small_run(Drifts(), image, bank, locality=locality)


def test_a_deterministic_model_reproduces_y_of_i_exactly(image, bank):
    res = small_run(Drifts(step=0.0), image, bank)
    assert res.extra["origin_check"] == {"max_abs_diff": 0.0, "tolerance": 1e-4}
