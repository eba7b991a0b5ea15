"""Adapters for what some models need around them, so that every model looks like
``(N, 3, h, w) in [0, 1] -> (N, 3, H, W)`` to the estimator."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks


class WithNoiseMap(nn.Module):
    """FFDNet / FDnCNN / DRUNet style: append a constant noise-level map ``sigma / 255`` as an extra channel."""

    def __init__(self, model: nn.Module, sigma: float):
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"noise level sigma must be positive (0..255 units), got {sigma}")
        self.model, self.sigma = model, float(sigma)

    def forward(self, x):
        level = torch.full_like(x[:, :1], self.sigma / 255.0)
        return self.model(torch.cat([x, level], dim=1))


class PadToMultiple(nn.Module):
    """Reflect-pad the input to a multiple of ``multiple`` (a window size) and crop the output back
    (``scale`` times the input size)."""

    def __init__(self, model: nn.Module, multiple: int, scale: int = 1):
        super().__init__()
        if multiple < 1:
            raise ValueError(f"pad multiple must be a positive integer, got {multiple}")
        self.model, self.multiple, self.scale = model, int(multiple), int(scale)

    def forward(self, x):
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.multiple, (-w) % self.multiple
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        return self.model(x)[..., : h * self.scale, : w * self.scale]


class PreUpsample(nn.Module):
    """Same-size networks used for SR (SRCNN / VDSR style): bicubic-upsample the LR input by ``scale`` first."""

    def __init__(self, model: nn.Module, scale: int):
        super().__init__()
        self.model, self.scale = model, int(scale)

    def forward(self, x):
        up = F.interpolate(x, scale_factor=float(self.scale), mode="bicubic", align_corners=False)
        return self.model(up.clamp(0, 1))


class PerChannel(nn.Module):
    """A greyscale (1-channel) model applied to each colour channel separately."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        n, c, h, w = x.shape
        y = self.model(x.reshape(n * c, 1, h, w))
        return y.reshape(n, c, y.shape[-2], y.shape[-1])


def apply_model_options(model: nn.Module, options: dict | None, scale: int = 1) -> nn.Module:
    """Wrap ``model`` per ``options``: ``noise_level`` (sigma), ``per_channel`` (bool), ``pre_upsample`` (scale),
    ``pad_multiple`` (window). Applied innermost first in that order."""
    options = check_model_options(options)
    if options.get("noise_level") is not None:
        model = _around(WithNoiseMap(model, options["noise_level"]))
    if options.get("per_channel"):
        model = _around(PerChannel(model))
    if options.get("pre_upsample"):
        model = _around(PreUpsample(model, int(options["pre_upsample"])))
    if options.get("pad_multiple"):
        s = 1 if options.get("pre_upsample") else scale
        model = _around(PadToMultiple(model, int(options["pad_multiple"]), s))
    return model


def _around(wrapper: nn.Module) -> nn.Module:
    """A wrapper in its model's mode (a new module is in training mode: a run would report it as switched to
    eval, though nothing in it depends on the mode)."""
    wrapper.training = wrapper.model.training
    return wrapper


def check_model_options(options) -> dict:
    """The options as a dict, or a one-line ValueError naming the key and the value that is wrong."""
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"model_options must be a mapping such as {{noise_level: 50}}, got {options!r}")
    options = dict(options or {})
    unknown = set(options) - {"noise_level", "per_channel", "pre_upsample", "pad_multiple"}
    if unknown:
        raise ValueError(f"model_options: unknown key(s) {sorted(unknown)}; expected noise_level, per_channel, "
                         "pre_upsample, pad_multiple")
    if options.get("noise_level") is not None:
        checks.number("model_options.noise_level", options["noise_level"], 0, 255)
    for key in ("pre_upsample", "pad_multiple"):
        if options.get(key) is not None:
            checks.integer(f"model_options.{key}", options[key], 1)
    if options.get("per_channel") is not None:
        checks.boolean("model_options.per_channel", options["per_channel"])
    return options
