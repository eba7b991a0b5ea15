"""Super-resolution architectures written for cem_fast that load the public checkpoint layouts.

Parameter names follow BasicSR (MSRResNet / SRResNet, EDSR, RCAN), so their released state dicts load as they
are. Inputs and outputs are (N, C, H, W) float in [0, 1].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DIV2K_MEAN = (0.4488, 0.4371, 0.4040)


class ResidualBlockNoBN(nn.Module):
    """conv -> ReLU -> conv, scaled and added to the input (keys ``conv1``, ``conv2``)."""

    def __init__(self, num_feat: int = 64, res_scale: float = 1.0):
        super().__init__()
        self.res_scale = res_scale
        self.conv1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(x))) * self.res_scale


def pixel_shuffle_upsampler(scale: int, num_feat: int) -> nn.Sequential:
    """``[conv(4 C), PixelShuffle(2)] * log2(scale)`` or ``[conv(9 C), PixelShuffle(3)]`` (keys upsample.0, .2)."""
    layers: list[nn.Module] = []
    if scale & (scale - 1) == 0:
        for _ in range(int(math.log2(scale))):
            layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
    elif scale == 3:
        layers += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
    else:
        raise ValueError(f"upscale must be a power of 2 or 3, got {scale}")
    return nn.Sequential(*layers)


class MSRResNet(nn.Module):
    """SRResNet without BN (BasicSR ``MSRResNet``): residual blocks, pixel-shuffle upsampling, plus a bilinear
    upsampling of the input."""

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, num_feat: int = 64, num_block: int = 16,
                 upscale: int = 4):
        super().__init__()
        if upscale not in (2, 3, 4):
            raise ValueError(f"MSRResNet upscale must be 2, 3 or 4, got {upscale}")
        self.upscale = upscale
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[ResidualBlockNoBN(num_feat) for _ in range(num_block)])
        if upscale in (2, 3):
            self.upconv1 = nn.Conv2d(num_feat, num_feat * upscale * upscale, 3, 1, 1)
        else:
            self.upconv1 = nn.Conv2d(num_feat, num_feat * 4, 3, 1, 1)
            self.upconv2 = nn.Conv2d(num_feat, num_feat * 4, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        self.config = {"num_in_ch": num_in_ch, "num_out_ch": num_out_ch, "num_feat": num_feat,
                       "num_block": num_block, "upscale": upscale}

    def forward(self, x):
        lrelu = lambda t: F.leaky_relu(t, 0.1)  # noqa: E731
        out = self.body(lrelu(self.conv_first(x)))
        if self.upscale == 4:
            out = lrelu(F.pixel_shuffle(self.upconv1(out), 2))
            out = lrelu(F.pixel_shuffle(self.upconv2(out), 2))
        else:
            out = lrelu(F.pixel_shuffle(self.upconv1(out), self.upscale))
        out = self.conv_last(lrelu(self.conv_hr(out)))
        return out + F.interpolate(x, scale_factor=float(self.upscale), mode="bilinear", align_corners=False)


class _MeanShift(nn.Module):
    """Shared by EDSR and RCAN: work on ``(x - mean) * img_range`` and map back."""

    img_range = 255.0

    def _init_mean(self, num_in_ch: int):
        mean = torch.tensor(DIV2K_MEAN if num_in_ch == 3 else (0.0,) * num_in_ch).view(1, num_in_ch, 1, 1)
        self.register_buffer("mean", mean, persistent=False)  # not in the public state dicts


class EDSR(_MeanShift):
    """EDSR (BasicSR layout): conv_first, body (residual blocks), conv_after_body, upsample, conv_last."""

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, num_feat: int = 64, num_block: int = 16,
                 upscale: int = 4, res_scale: float = 1.0):
        super().__init__()
        self._init_mean(num_in_ch)
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[ResidualBlockNoBN(num_feat, res_scale) for _ in range(num_block)])
        self.conv_after_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.upsample = pixel_shuffle_upsampler(upscale, num_feat)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        self.config = {"num_in_ch": num_in_ch, "num_out_ch": num_out_ch, "num_feat": num_feat,
                       "num_block": num_block, "upscale": upscale, "res_scale": res_scale}

    def forward(self, x):
        x = (x - self.mean) * self.img_range
        x = self.conv_first(x)
        res = self.conv_after_body(self.body(x)) + x
        return self.conv_last(self.upsample(res)) / self.img_range + self.mean


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation (key ``attention.1`` / ``attention.3``): a global path, so RCAN is not local."""

    def __init__(self, num_feat: int, squeeze_factor: int = 16):
        super().__init__()
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(num_feat, num_feat // squeeze_factor, 1), nn.ReLU(inplace=True),
            nn.Conv2d(num_feat // squeeze_factor, num_feat, 1), nn.Sigmoid())

    def forward(self, x):
        return x * self.attention(x)


class RCAB(nn.Module):
    def __init__(self, num_feat: int, squeeze_factor: int, res_scale: float):
        super().__init__()
        self.res_scale = res_scale
        self.rcab = nn.Sequential(nn.Conv2d(num_feat, num_feat, 3, 1, 1), nn.ReLU(True),
                                  nn.Conv2d(num_feat, num_feat, 3, 1, 1), ChannelAttention(num_feat, squeeze_factor))

    def forward(self, x):
        return x + self.rcab(x) * self.res_scale


class ResidualGroup(nn.Module):
    def __init__(self, num_feat: int, num_block: int, squeeze_factor: int, res_scale: float):
        super().__init__()
        self.residual_group = nn.Sequential(*[RCAB(num_feat, squeeze_factor, res_scale) for _ in range(num_block)])
        self.conv = nn.Conv2d(num_feat, num_feat, 3, 1, 1)

    def forward(self, x):
        return x + self.conv(self.residual_group(x))


class RCAN(_MeanShift):
    """RCAN (BasicSR layout): residual groups of channel-attention blocks."""

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, num_feat: int = 64, num_group: int = 10,
                 num_block: int = 20, squeeze_factor: int = 16, upscale: int = 4, res_scale: float = 1.0):
        super().__init__()
        self._init_mean(num_in_ch)
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[ResidualGroup(num_feat, num_block, squeeze_factor, res_scale)
                                    for _ in range(num_group)])
        self.conv_after_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.upsample = pixel_shuffle_upsampler(upscale, num_feat)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        self.config = {"num_in_ch": num_in_ch, "num_out_ch": num_out_ch, "num_feat": num_feat,
                       "num_group": num_group, "num_block": num_block, "squeeze_factor": squeeze_factor,
                       "upscale": upscale, "res_scale": res_scale}

    def forward(self, x):
        x = (x - self.mean) * self.img_range
        x = self.conv_first(x)
        res = self.conv_after_body(self.body(x)) + x
        return self.conv_last(self.upsample(res)) / self.img_range + self.mean
