"""The precision check (cem_fast/pipeline/precision.py): a reduced-precision run is re-checked against fp32 on a
sample of blocks."""
import pytest
import torch

import cem_fast
from helpers import random_image
from model_factories import ConvStack


@pytest.fixture
def image(rng):
    return random_image(rng, 48, 64)


def test_reduced_precision_is_checked_against_fp32(image, bank):
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    res = cem_fast.causal_effect_map(ConvStack(2), image, task="DN", sigma=30, roi=(16, 24, 16), coarse=2,
                                     fine=3, patches=bank, precision="bf16")
    chk = res.extra["precision_check"]
    assert res.extra["precision"] == "bf16" and chk["blocks_checked"] > 0
    assert 0 < chk["max_abs_delta_ce_db"] < 1.0  # bf16 moves the map a little, not a lot
    assert abs(chk["psnr_origin_fp32"][0] - res.psnr_origin) == pytest.approx(chk["psnr_origin_delta_db"],
                                                                                abs=1e-5)
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == flags
    fp32 = cem_fast.causal_effect_map(ConvStack(2), image, task="DN", sigma=30, roi=(16, 24, 16), coarse=2,
                                      fine=3, patches=bank)
    assert "precision_check" not in fp32.extra
