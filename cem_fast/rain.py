"""Synthetic rain streaks (docs/method.md, "DR"), written with numpy and torch convolutions (no OpenCV).

``rain_layer(h, w, rng, preset)`` draws a streak amount, width, length and angle from the preset, makes sparse
uniform noise, blurs it into streaks with a rotated, Gaussian-smoothed line kernel and normalises it to 0..255.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .options import RAIN_PRESETS


@dataclass(frozen=True)
class RainPreset:
    amount: tuple[float, float]
    widths: tuple[int, ...]
    width_probs: tuple[float, ...]
    length: tuple[int, int]
    angle: tuple[int, int]


PRESETS = dict(zip(RAIN_PRESETS, (  # the names are the options' vocabulary; here what each means
    RainPreset((0.002, 0.004), (1, 3), (0.5, 0.5), (25, 35), (-10, 10)),
    RainPreset((0.005, 0.007), (3, 5, 7), (0.25, 0.5, 0.25), (35, 45), (-30, 30)),
    RainPreset((0.008, 0.010), (7, 9), (0.5, 0.5), (45, 55), (-60, 60)),
    RainPreset((0.002, 0.010), (1, 3, 5, 7, 9), (0.2,) * 5, (25, 55), (-60, 60)),
), strict=True))
BETA_RANGE = (0.6, 1.0)


def seed_from_name(name: str) -> int:
    """The reference seeds each image's rain with the first integer in its file name (0 when there is none)."""
    m = re.search(r"\d+", name or "")
    return int(m.group()) if m else 0


def _filter2d(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlation with reflect-101 borders (OpenCV's filter2D default), float64."""
    kh, kw = kernel.shape
    t = torch.from_numpy(img.astype(np.float64))[None, None]
    pads = (kw // 2, kw - 1 - kw // 2, kh // 2, kh - 1 - kh // 2)
    # reflect needs pads smaller than the image; a streak kernel longer than a small image replicates instead
    fits = max(pads[:2]) < img.shape[1] and max(pads[2:]) < img.shape[0]
    t = F.pad(t, pads, mode="reflect" if fits else "replicate")
    return F.conv2d(t, torch.from_numpy(kernel.astype(np.float64))[None, None])[0, 0].numpy()


def _gaussian_1d(size: int) -> np.ndarray:
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8  # OpenCV's sigma for a given window and sigma=0
    x = np.arange(size) - (size - 1) / 2
    g = np.exp(-x * x / (2 * sigma * sigma))
    return g / g.sum()


def _rotate(kernel: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate a square kernel about its centre (bilinear, zeros outside)."""
    n = kernel.shape[0]
    c = (n - 1) / 2
    a = math.radians(degrees)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    # inverse map: output pixel -> source pixel
    xs = math.cos(a) * (xx - c) - math.sin(a) * (yy - c) + c
    ys = math.sin(a) * (xx - c) + math.cos(a) * (yy - c) + c
    x0, y0 = np.floor(xs).astype(int), np.floor(ys).astype(int)
    fx, fy = xs - x0, ys - y0
    out = np.zeros_like(kernel, dtype=np.float64)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yi, xi = y0 + dy, x0 + dx
            ok = (yi >= 0) & (yi < n) & (xi >= 0) & (xi < n)
            out[ok] += (wy * wx)[ok] * kernel[yi[ok], xi[ok]]
    return out


def motion_kernel(length: int, angle: float, width: int) -> np.ndarray:
    """A ``length x length`` diagonal line rotated by ``angle - 45`` degrees, Gaussian-blurred over ``width``."""
    k = _rotate(np.diag(np.ones(length)), angle - 45)
    g = _gaussian_1d(width)
    k = _filter2d(k, np.outer(g, g))
    return k


def rain_layer(h: int, w: int, seed: int, preset: str = "medium") -> tuple[np.ndarray, float]:
    """Draw a rain layer (h, w) float64 in 0..255 and its blend factor beta, from ``np.random.RandomState(seed)``."""
    if preset not in PRESETS:
        raise ValueError(f"rain preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    p = PRESETS[preset]
    rs = np.random.RandomState(seed)
    amount = rs.uniform(*p.amount)
    width = int(rs.choice(p.widths, p=p.width_probs))
    length = int(rs.randint(p.length[0], p.length[1] + 1))
    angle = int(rs.randint(p.angle[0], p.angle[1] + 1))
    beta = float(rs.uniform(*BETA_RANGE))
    noise = rs.uniform(0, 256, size=(h, w))
    noise[noise <= 256 * (1 - amount)] = 0
    noise = _filter2d(noise, np.array([[0, 0.1, 0], [0.1, 8, 0.1], [0, 0.1, 0]]))
    streaks = _filter2d(noise, motion_kernel(length, angle, width))
    lo, hi = streaks.min(), streaks.max()
    streaks = (streaks - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(streaks)
    return streaks, beta
