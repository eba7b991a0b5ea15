"""SwinIR written for cem_fast, with the parameter and buffer names of the official release, so its
checkpoints load as they are. Upsamplers: "pixelshuffle" (classical SR), "pixelshuffledirect" (lightweight SR)
and "" (denoising / JPEG, same size). Window attention is global within each window and the shifted windows chain
them: the receptive field covers the whole image.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .sr_archs import DIV2K_MEAN, pixel_shuffle_upsampler


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/ws * W/ws, ws, ws, C)."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, C)


def window_reverse(windows: torch.Tensor, ws: int, H: int, W: int) -> torch.Tensor:
    B = windows.shape[0] // ((H // ws) * (W // ws))
    x = windows.view(B, H // ws, W // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, -1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads, self.ws = num_heads, window_size
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
        flat = coords.flatten(1)
        rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0) + (window_size - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window_size - 1) + rel[..., 1])
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(B_ // nw, nw, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        x = (attn.softmax(-1) @ v).transpose(1, 2).reshape(B_, N, C)
        return self.proj(x)


def shifted_window_mask(H: int, W: int, ws: int, shift: int, device=None) -> torch.Tensor:
    """(nW, ws*ws, ws*ws) additive mask: -100 between tokens that came from different regions after the roll."""
    img = torch.zeros(1, H, W, 1, device=device)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    mw = window_partition(img, ws).view(-1, ws * ws)
    mask = mw.unsqueeze(1) - mw.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim, input_resolution, num_heads, window_size, shift_size, mlp_ratio):
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        if min(self.input_resolution) <= window_size:
            shift_size, window_size = 0, min(self.input_resolution)
        self.ws, self.shift = window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        mask = shifted_window_mask(*self.input_resolution, window_size, shift_size) if shift_size else None
        self.register_buffer("attn_mask", mask)

    def forward(self, x, x_size):
        H, W = x_size
        B, L, C = x.shape
        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        if self.shift:
            x = torch.roll(x, (-self.shift, -self.shift), dims=(1, 2))
        if not self.shift:
            mask = None
        elif tuple(x_size) == self.input_resolution:
            mask = self.attn_mask
        else:
            mask = shifted_window_mask(H, W, self.ws, self.shift, x.device)
        win = self.attn(window_partition(x, self.ws).view(-1, self.ws * self.ws, C), mask)
        x = window_reverse(win.view(-1, self.ws, self.ws, C), self.ws, H, W)
        if self.shift:
            x = torch.roll(x, (self.shift, self.shift), dims=(1, 2))
        x = shortcut + x.reshape(B, H * W, C)
        return x + self.mlp(self.norm2(x))


class BasicLayer(nn.Module):
    def __init__(self, dim, input_resolution, depth, num_heads, window_size, mlp_ratio):
        super().__init__()
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(dim, input_resolution, num_heads, window_size,
                                 0 if i % 2 == 0 else window_size // 2, mlp_ratio) for i in range(depth)])

    def forward(self, x, x_size):
        for blk in self.blocks:
            x = blk(x, x_size)
        return x


def tokens_to_image(x, x_size):
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *x_size)


class RSTB(nn.Module):
    """Residual Swin Transformer block: a BasicLayer and a 3x3 conv, with a skip connection."""

    def __init__(self, dim, input_resolution, depth, num_heads, window_size, mlp_ratio):
        super().__init__()
        self.residual_group = BasicLayer(dim, input_resolution, depth, num_heads, window_size, mlp_ratio)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x, x_size):
        y = self.conv(tokens_to_image(self.residual_group(x, x_size), x_size))
        return y.flatten(2).transpose(1, 2) + x


class _PatchEmbedNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(x.flatten(2).transpose(1, 2))


class SwinIR(nn.Module):
    """SwinIR (official layout). Input (N, C, h, w) in [0, 1]; any size (padded to the window internally)."""

    def __init__(self, img_size=64, in_chans=3, embed_dim=96, depths=(6, 6, 6, 6), num_heads=(6, 6, 6, 6),
                 window_size=7, mlp_ratio=4.0, upscale=2, img_range=1.0, upsampler="", num_feat=64,
                 num_out_ch=None):
        super().__init__()
        if upsampler not in ("pixelshuffle", "pixelshuffledirect", ""):
            raise ValueError(f"SwinIR upsampler must be pixelshuffle, pixelshuffledirect or '', got {upsampler!r}")
        num_out_ch = num_out_ch or in_chans
        self.upscale = upscale if upsampler else 1
        self.upsampler, self.window_size, self.img_range = upsampler, window_size, img_range
        mean = torch.tensor(DIV2K_MEAN if in_chans == 3 else (0.0,) * in_chans).view(1, in_chans, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        self.patch_embed = _PatchEmbedNorm(embed_dim)
        res = (img_size, img_size)
        self.layers = nn.ModuleList([RSTB(embed_dim, res, d, h, window_size, mlp_ratio)
                                     for d, h in zip(depths, num_heads)])
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1)
        if upsampler == "pixelshuffle":
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1),
                                                      nn.LeakyReLU(inplace=True))
            self.upsample = pixel_shuffle_upsampler(upscale, num_feat)
            self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        elif upsampler == "pixelshuffledirect":
            self.upsample = nn.Sequential(nn.Conv2d(embed_dim, upscale * upscale * num_out_ch, 3, 1, 1),
                                          nn.PixelShuffle(upscale))
        else:
            self.conv_last = nn.Conv2d(embed_dim, num_out_ch, 3, 1, 1)
        self.config = {"img_size": img_size, "in_chans": in_chans, "embed_dim": embed_dim, "depths": list(depths),
                       "num_heads": list(num_heads), "window_size": window_size, "mlp_ratio": mlp_ratio,
                       "upscale": self.upscale, "upsampler": upsampler}

    def forward_features(self, x):
        x_size = tuple(x.shape[-2:])
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x, x_size)
        return tokens_to_image(self.norm(x), x_size)

    def forward(self, x):
        H, W = x.shape[-2:]
        ws = self.window_size
        x = F.pad(x, (0, (-W) % ws, 0, (-H) % ws), mode="reflect") if (H % ws or W % ws) else x
        x = (x - self.mean) * self.img_range
        if self.upsampler == "pixelshuffle":
            x = self.conv_first(x)
            x = self.conv_after_body(self.forward_features(x)) + x
            x = self.conv_last(self.upsample(self.conv_before_upsample(x)))
        elif self.upsampler == "pixelshuffledirect":
            x = self.conv_first(x)
            x = self.upsample(self.conv_after_body(self.forward_features(x)) + x)
        else:
            first = self.conv_first(x)
            x = x + self.conv_last(self.conv_after_body(self.forward_features(first)) + first)
        x = x / self.img_range + self.mean
        return x[..., : H * self.upscale, : W * self.upscale]

    @classmethod
    def from_state_dict(cls, sd: dict) -> "SwinIR":
        import re
        embed_dim, in_chans = sd["conv_first.weight"].shape[:2]
        n_layers = 1 + max(int(m.group(1)) for k in sd for m in [re.match(r"^layers\.(\d+)\.", k)] if m)
        depths, heads = [], []
        for i in range(n_layers):
            blocks = {int(m.group(1)) for k in sd
                      for m in [re.match(rf"^layers\.{i}\.residual_group\.blocks\.(\d+)\.", k)] if m}
            depths.append(len(blocks))
            heads.append(sd[f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"].shape[1])
        table = sd["layers.0.residual_group.blocks.0.attn.relative_position_bias_table"].shape[0]
        ws = (int(round(math.sqrt(table))) + 1) // 2
        masks = [v for k, v in sd.items() if k.endswith("attn_mask")]
        img_size = ws * int(round(math.sqrt(masks[0].shape[0]))) if masks else 64
        mlp_ratio = sd["layers.0.residual_group.blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
        if "conv_before_upsample.0.weight" in sd:
            upsampler, num_feat = "pixelshuffle", sd["conv_before_upsample.0.weight"].shape[0]
            out_ch = sd["conv_last.weight"].shape[0]
            ups = {int(m.group(1)) for k in sd for m in [re.match(r"^upsample\.(\d+)\.weight$", k)] if m}
            upscale = 3 if sd["upsample.0.weight"].shape[0] == 9 * num_feat else 2 ** len(ups)
        elif "upsample.0.weight" in sd:
            upsampler, num_feat = "pixelshuffledirect", 64
            out_ch = in_chans
            upscale = int(round(math.sqrt(sd["upsample.0.weight"].shape[0] / out_ch)))
        elif "conv_up1.weight" in sd:
            raise ValueError("SwinIR with the 'nearest+conv' upsampler (real-world SR) is not supported yet")
        else:
            upsampler, num_feat, upscale, out_ch = "", 64, 1, sd["conv_last.weight"].shape[0]
        net = cls(img_size, in_chans, embed_dim, depths, heads, ws, mlp_ratio, upscale, 1.0, upsampler, num_feat,
                  out_ch)
        net.load_state_dict(sd)
        return net
