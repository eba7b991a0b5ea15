"""Wrappers for what some models need around them (cem_fast/models/wrappers.py): a noise map, padding to a
multiple, upsampling before the model, one channel at a time, and the model options that apply them."""
import pytest
import torch

from cem_fast.models import DnCNN, FDnCNN, PadToMultiple, PerChannel, PreUpsample, WithNoiseMap, apply_model_options


def test_model_need_wrappers():
    fd = FDnCNN(3, 8, 3)
    x = torch.rand(2, 3, 7, 9)
    y = WithNoiseMap(fd, 25)(x)
    assert torch.equal(y, fd(torch.cat([x, torch.full_like(x[:, :1], 25 / 255)], 1)))

    class NeedsMultipleOf8(torch.nn.Module):
        def forward(self, t):
            assert t.shape[-1] % 8 == 0 and t.shape[-2] % 8 == 0, t.shape
            return torch.nn.functional.interpolate(t, scale_factor=2.0)

    out = PadToMultiple(NeedsMultipleOf8(), 8, scale=2)(x)
    assert out.shape == (2, 3, 14, 18)
    assert torch.allclose(out, torch.nn.functional.interpolate(x, scale_factor=2.0))  # pad only adds a border
    same = PreUpsample(torch.nn.Identity(), 4)(x)
    assert same.shape == (2, 3, 28, 36)
    grey = PerChannel(DnCNN(1, 4, 2))
    assert grey(x).shape == x.shape
    assert torch.allclose(grey(x)[:, 1:2], grey.model(x[:, 1:2]))
    m = apply_model_options(fd, {"noise_level": 50, "pad_multiple": 4})
    assert isinstance(m, PadToMultiple) and isinstance(m.model, WithNoiseMap)
    with pytest.raises(ValueError, match="unknown key"):
        apply_model_options(fd, {"noise": 50})
