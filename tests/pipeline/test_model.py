"""The model step (cem_fast/pipeline/model.py): a model that writes into its input cannot change what later
forwards see, submodules in training mode run in eval mode for the run only (and the summary says so), a model's
sys.exit is an error and not the end of the caller's program, its output must be floating point, the automatic
batch size is remembered per model and shape, a compiled model gives the eager model's samples, and the backend
flags a run changes around its forwards are the user's again afterwards."""
import sys

import numpy as np
import pytest
import torch

import cem_fast
from helpers import random_bank, random_image, small_run
from model_factories import ConvStack, ExitsOnBatches, InPlace, OutOfPlace


@pytest.fixture
def image(rng):
    return random_image(rng, 48, 64)


@pytest.fixture
def image24(rng):
    return random_image(rng, 24, 24)


@pytest.fixture
def bank8(rng):
    return random_bank(rng, 8)


@pytest.fixture
def bank16(rng):
    return random_bank(rng, 16)


# ---- a model that writes into its input cannot change what later forwards see ----------------------------------------

class InPlaceConv(torch.nn.Module):
    def __init__(self, inplace):
        super().__init__()
        self.inplace = inplace
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        torch.nn.init.constant_(self.conv.weight, 0.05)
        torch.nn.init.zeros_(self.conv.bias)

    def forward(self, x):
        x = x.mul_(0.9) if self.inplace else x * 0.9
        return x + self.conv(x)


@pytest.mark.parametrize("make", [
    lambda inplace: InPlace() if inplace else OutOfPlace(),
    lambda inplace: torch.jit.script(InPlace() if inplace else OutOfPlace()),
    lambda inplace: InPlaceConv(inplace),
], ids=["plain", "scripted", "conv"])
@pytest.mark.parametrize("locality", ["auto", "off"])
def test_in_place_models_get_the_map_of_their_out_of_place_twin(make, locality, image24, bank16):
    args = dict(task="DN", sigma=25, roi=(8, 8, 8), coarse=2, fine=2, patches=bank16, locality=locality)
    clean = image24.copy()
    got = cem_fast.causal_effect_map(make(True), image24, **args)
    want = cem_fast.causal_effect_map(make(False), image24, **args)
    assert np.array_equal(image24, clean)  # the caller's array is untouched
    assert got.psnr_origin == want.psnr_origin
    np.testing.assert_allclose(got.effect, want.effect, atol=1e-9)
    assert torch.equal(got.gt, want.gt)


# ---- submodules in training mode: eval for the run, their own modes restored, the summary says so --------------------

class WithBatchNorm(torch.nn.Module):
    """Conv, BatchNorm, Dropout: in training mode the output depends on the batch and on chance."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(3)
        self.drop = torch.nn.Dropout(0.5)
        self.frozen = torch.nn.BatchNorm2d(3).eval()  # a submodule the user put in eval mode on purpose
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, x):
        return x + 0.2 * self.drop(self.frozen(self.bn(self.conv(x))))


def modes(model):
    return {name: m.training for name, m in model.named_modules()}


def test_training_mode_submodules_run_in_eval_for_the_run_only(image32, bank256):
    model = WithBatchNorm().train()
    model.frozen.eval()
    before = modes(model)
    one = small_run(model, image32, bank256, batch_size=1)
    assert modes(model) == before  # each submodule's own mode, the frozen one's too
    many = small_run(model, image32, bank256, batch_size=7)
    assert np.array_equal(one.effect, many.effect) and one.psnr_origin == many.psnr_origin  # no batch statistics
    assert one.extra["switched_to_eval"] == {"submodules_in_training": 4, "names": ["WithBatchNorm", "conv", "bn",
                                                                                    "drop"],
                                             "restored_after_the_run": True}
    assert "switched_to_eval" not in small_run(model.eval(), image32, bank256).extra  # nothing was switched


def test_modes_are_restored_when_the_run_fails(image32, bank256):
    class FailsOnBatches(WithBatchNorm):
        def forward(self, x):
            if x.shape[0] > 1:
                raise RuntimeError("no batches here")
            return super().forward(x)

    model = FailsOnBatches().train()
    with pytest.raises(RuntimeError, match="no batches here"):
        small_run(model, image32, bank256, batch_size=4, locality="off")
    assert all(modes(model).values())


def test_the_wrappers_of_model_options_are_not_reported_as_switched(image32, bank256):
    from cem_fast.models.wrappers import apply_model_options
    model = apply_model_options(WithBatchNorm().eval(), {"pad_multiple": 8, "per_channel": False})
    assert "switched_to_eval" not in small_run(model, image32, bank256).extra


# ---- a model's sys.exit is said as such ------------------------------------------------------------------------------

def test_sys_exit_in_a_forward_does_not_end_the_callers_program(image32, bank256):
    class Exits(torch.nn.Module):
        def forward(self, x):
            sys.exit(3)

    with pytest.raises(RuntimeError, match=r"^model Exits called sys\.exit\(3\) during its forward pass$"):
        small_run(Exits(), image32, bank256)
    with pytest.raises(RuntimeError, match=r"^the model called sys\.exit\('usage: model\.py \[-h\]'\) during"):
        small_run(ExitsOnBatches(), image32, bank256, locality="off", batch_size=4)


# ---- what the model returns ------------------------------------------------------------------------------------------

def test_a_model_with_integer_output_is_named(bank8, rng):
    """A uint8 output would be scored as if 0..255 were 0..1: refused with the model's name and dtype."""
    class ToUint8(torch.nn.Module):
        def forward(self, x):
            return (x * 255).to(torch.uint8)

    img = (rng.rand(16, 16, 3) * 255).astype(np.uint8)
    with pytest.raises(ValueError, match="model ToUint8 output must be a floating-point tensor .* got torch.uint8"):
        cem_fast.causal_effect_map(ToUint8(), img, task="DN", sigma=10, roi=(0, 0, 8), block=8, coarse=1, fine=1,
                                   patches=bank8)


# ---- batch size and compilation --------------------------------------------------------------------------------------

def test_auto_batch_size_is_remembered_per_model_and_shape(image, bank):
    from cem_fast.pipeline import model as placement
    model = ConvStack(2)
    args = dict(task="DN", roi=(16, 24, 16), coarse=1, fine=0, patches=bank, locality="off")
    first = cem_fast.causal_effect_map(model, image, **args)
    assert first.extra["batch_size"] == "auto"
    assert first.extra["final_batch_size"] == min(256, placement.CPU_BATCH_PIXELS // (48 * 64))
    key = ((3, 48, 64), "fp32", "cpu", None)  # crop shape, precision, device, engine input px (None: the crop)
    placement.remember_batch_size(model, key, 7)
    again = cem_fast.causal_effect_map(model, image, **args)
    assert again.extra["final_batch_size"] == 7
    other = cem_fast.causal_effect_map(ConvStack(2), image, **args)  # another model: not remembered
    assert other.extra["final_batch_size"] == first.extra["final_batch_size"]


def test_compiled_model_gives_the_same_samples(image, bank):
    args = dict(task="DN", sigma=30, roi=(16, 24, 16), coarse=2, fine=2, patches=bank, seed=3)
    eager = cem_fast.causal_effect_map(ConvStack(2), image, **args)
    compiled = cem_fast.causal_effect_map(ConvStack(2), image, compile=True, **args)
    assert compiled.extra["compile"] is True
    np.testing.assert_allclose(compiled.samples_coarse, eager.samples_coarse, atol=1e-3)
    np.testing.assert_allclose(compiled.cem, eager.cem, atol=1e-3)


# ---- precision and cuDNN around the forwards -------------------------------------------------------------------------

def test_the_flags_are_restored_after_an_error():
    from cem_fast.locality import nan_probes
    from cem_fast.pipeline.model import no_cudnn_autotune, precision_mode
    before = (torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark)
    for ctx in (nan_probes(), no_cudnn_autotune(), precision_mode("fp32", torch.device("cpu"))):
        with pytest.raises(RuntimeError, match="boom"):
            with ctx:
                raise RuntimeError("boom")
        assert (torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark) == before
