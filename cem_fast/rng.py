"""Counter-based random numbers: the same value for the same (seed, intervention id, pixel) on every backend.

A 32-bit integer hash (two multiply-xorshift rounds, constants from Wellons' hash prospector) is applied to
``seed``, the intervention id and the pixel counter. Multiplier constants are below 2**31, so the products of
32-bit values fit in int64 and torch, C++ and Triton compute bit-identical hashes.

The intervention noise is integer all the way (:func:`gaussian12`): a sum of twelve 16-bit uniforms
(Irwin-Hall, standard deviation 65536 to 1e-10, tails to +-6 sigma), so that noise, clipping and uint8
truncation give bit-identical pixels on every backend, with no transcendental functions or rounding modes to
disagree on.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MUL1 = 0x21F0AAAD
MUL2 = 0x735A2D97
GOLDEN = 0x9E3779B9


def hash32(x: torch.Tensor) -> torch.Tensor:
    """Mix int64 tensor values in [0, 2**32) into [0, 2**32)."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = (x * MUL1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MUL2) & MASK32
    x = x ^ (x >> 15)
    return x


def stream_key(seed: int, ids: torch.Tensor) -> torch.Tensor:
    """Key of each intervention: int64 ``ids`` (any value >= 0) folded with ``seed`` into 32 bits."""
    seed_lo = torch.tensor((seed & MASK32) ^ GOLDEN, dtype=torch.int64)
    s = hash32(hash32(seed_lo) ^ ((seed >> 32) & MASK32))
    lo = ids & MASK32
    hi = (ids >> 32) & MASK32
    return hash32(hash32(s ^ lo) ^ hi)


def uniform_from_counter(key: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in (0, 1): 24-bit mantissa of hash(key ^ hash(counter)), shifted off zero."""
    h = hash32(key ^ hash32(counter + GOLDEN))
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)


GAUSS12_MEAN = 12 * 65535 // 2  # 393210; the centred sum has standard deviation 65536 * (1 - 1e-10)
GAUSS12_SHIFT = 16


def gaussian12(key: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """int64 approximately N(0, 65536^2): the centred sum of the twelve 16-bit halves of six hashes."""
    total = torch.zeros(torch.broadcast_shapes(key.shape, counter.shape), dtype=torch.int64, device=counter.device)
    for j in range(6):
        h = hash32(key ^ hash32(6 * counter + j + GOLDEN))
        total = total + (h & 0xFFFF) + (h >> 16)
    return total - GAUSS12_MEAN


PATCH_SALT = 0x2545F491  # separates the patch-index stream from the noise stream of the same intervention


def patch_draws(seed: int, ids: torch.Tensor, num_patches: int) -> torch.Tensor:
    """int64 patch index in [0, num_patches) of each intervention id: ``hash * P >> 32`` (bias below P / 2^32).

    Keyed only by (seed, id), with ``id = block * DRAW_STRIDE + draw``, so a block's draws do not depend on the
    image size, on which other blocks run (locality skipping) or on the batch size."""
    if num_patches < 1:
        raise ValueError(f"num_patches must be positive, got {num_patches}")
    h = hash32(stream_key(seed, ids) ^ PATCH_SALT)
    return (h * int(num_patches)) >> 32
