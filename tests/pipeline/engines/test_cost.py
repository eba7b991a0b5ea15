"""What a forward costs, counted (cem_fast/pipeline/engines/cost.py), and the windows' choice it steers: a net too
small to pay for the windows' extra forwards keeps the crop, says why, and "on" still runs the windows."""
import numpy as np
import pytest
import torch

import cem_fast
from cem_fast.patches import PatchBank
from cem_fast.pipeline.engines import cost
from cem_fast.pipeline.engines.cost import count_forward


def two_convs() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(16, 4, 5, padding=2, groups=2)).eval()


@pytest.mark.parametrize("inference", [True, False], ids=["inference-mode", "grad-mode"])
def test_count_forward_gives_the_operators_and_the_work_per_pixel(inference):
    """By hand: 3x3 conv 3->16 (432 MACs per px), ReLU (16 outputs per px), 5x5 conv 16->4 in two groups (8 x 4 x
    25 = 800). The views a module may make are not operators."""
    x = torch.rand(1, 3, 10, 12)
    with torch.inference_mode(inference), torch.set_grad_enabled(not inference):
        count = count_forward(two_convs(), x)
    assert count.ops == 3, count
    assert count.macs_per_px == pytest.approx(432 + 16 + 800), count


def test_strided_and_transposed_convolutions_count_their_own_output():
    """Work per input pixel follows each convolution's output size: stride 2 quarters it, a x2 transposed
    convolution (8 -> 3 channels, 4x4) makes 4 output px per input px of 8 x 3 x 16 / 4 MACs each."""
    down = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
    up = torch.nn.ConvTranspose2d(3, 3, 4, stride=2, padding=1)
    x = torch.rand(1, 3, 16, 16)
    with torch.inference_mode():
        assert count_forward(down, x).macs_per_px == pytest.approx(3 * 8 * 9 / 4)
        assert count_forward(up, x).macs_per_px == pytest.approx(3 * 3 * 16)


def thin() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 3, 3, padding=1)).eval()


@pytest.fixture
def bank(rng):
    return PatchBank(torch.from_numpy(rng.randint(0, 256, (32, 3, 8, 8)).astype(np.uint8)))


ARGS = dict(task="DN", sigma=30, roi=(24, 24, 16), coarse=3, fine=2, tol=0.0, seed=1, progress=False,
            incremental="off")


def test_a_net_too_small_to_pay_for_the_windows_keeps_the_crop(rng, bank, monkeypatch):
    """Two thin convolutions on 64x64: the windows save pixels (gain > 1.1) but less work than their ~14 extra forwards
    cost; auto keeps the crop and gives both sides; "on" and free forwards run the windows, on the same samples."""
    img = rng.randint(0, 256, (64, 64, 3)).astype(np.uint8)
    res = cem_fast.causal_effect_map(thin(), img, patches=bank, **ARGS)
    info = res.extra["locality"]["windows"]
    assert not info["used"] and info["reason"].startswith("saves less than its fixed cost"), info
    assert info["gain"] > 1.1 and info["saved_macs"] < info["fixed_macs"] and info["forward_ops"] >= 3, info
    assert res.extra["plan"]["windows"] == "crop"
    on = cem_fast.causal_effect_map(thin(), img, patches=bank, windows="on", **ARGS)
    assert on.extra["locality"]["windows"]["used"]
    monkeypatch.setattr(cost, "BATCH_COST_MACS", 0)
    monkeypatch.setattr(cost, "OP_COST_MACS", 0)
    free = cem_fast.causal_effect_map(thin(), img, patches=bank, **ARGS)
    assert free.extra["locality"]["windows"]["used"], free.extra["locality"]["windows"]
    np.testing.assert_allclose(on.samples_coarse, res.samples_coarse, atol=1e-9)
    np.testing.assert_allclose(free.cem, res.cem, atol=1e-9)


def test_exhaustive_mode_counts_its_draws_as_what_every_block_gets(rng, bank):
    """Exhaustive mode has no coarse stage: the engines' savings are counted over its samples (they were counted
    over zero draws, and the layer-by-layer engine was refused for its fixed cost on every model)."""
    img = rng.randint(0, 256, (48, 48, 3)).astype(np.uint8)
    res = cem_fast.causal_effect_map("default:dn", img, task="DN", sigma=50, roi=(16, 16, 16), mode="exhaustive",
                                     samples=2, patches=bank, progress=False)
    info = res.extra["locality"]["incremental"]
    assert info["used"], info


@pytest.mark.parametrize("inference", [True, False], ids=["inference-mode", "grad-mode"])
def test_matrix_products_count_their_inner_dimension(inference):
    """A linear layer over the last axis (12 -> 5) of a (1, 3, 10, 12) input: 150 outputs x 12 products, over 120
    pixels, whether the mode sees linear or its matmul / mm / addmm."""
    torch.manual_seed(0)
    with torch.inference_mode(inference), torch.set_grad_enabled(not inference):
        count = count_forward(torch.nn.Linear(12, 5), torch.rand(1, 3, 10, 12))
    assert count.macs_per_px == pytest.approx(150 * 12 / 120, rel=0.05), count  # + the bias add, if apart


def test_a_net_too_small_for_the_graph_is_refused_before_it_is_traced(rng, bank, monkeypatch):
    """The windows' count bounds what the layer-by-layer engine could save (all of the crop's work) against the
    least its fixed cost can be: on two thin convolutions the graph is never traced; "on" still runs it."""
    from cem_fast.layerwise import LayerwiseGraph
    traced = []
    real = LayerwiseGraph.__init__
    monkeypatch.setattr(LayerwiseGraph, "__init__", lambda self, model: traced.append(model) or real(self, model))
    img = rng.randint(0, 256, (64, 64, 3)).astype(np.uint8)
    kw = dict(ARGS, incremental="auto")
    res = cem_fast.causal_effect_map(thin(), img, patches=bank, **kw)
    info = res.extra["locality"]["incremental"]
    assert not info["used"] and info["reason"].startswith("saves less than its fixed cost (at most"), info
    assert "not traced" in info["reason"] and traced == []
    on = cem_fast.causal_effect_map(thin(), img, patches=bank, **dict(kw, incremental="on"))
    assert on.extra["locality"]["incremental"]["used"] and len(traced) == 1
    np.testing.assert_allclose(on.cem, res.cem, atol=1e-6)
