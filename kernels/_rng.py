"""The counter-based RNG of cem_fast/rng.py as Triton device functions (uint32 arithmetic wraps like the masked
int64 arithmetic of the torch twin, so the numbers are bit-identical)."""
import triton
import triton.language as tl


@triton.jit
def _hash32(x):
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    x = x ^ (x >> 15)
    return x


@triton.jit
def _stream_key(seed, id):
    """seed, id: int64 scalars -> uint32 key of the intervention."""
    seed = seed.to(tl.int64)
    id = id.to(tl.int64)
    s_lo = seed.to(tl.uint32)  # int64 -> uint32 truncates: the low 32 bits
    s_hi = (seed >> 32).to(tl.uint32)
    s = _hash32(_hash32(s_lo ^ 0x9E3779B9) ^ s_hi)
    i_lo = id.to(tl.uint32)
    i_hi = (id >> 32).to(tl.uint32)
    return _hash32(_hash32(s ^ i_lo) ^ i_hi)


@triton.jit
def _gaussian12(key, counter):
    """key: uint32, counter: uint32 tensor -> int64 centred sum of twelve 16-bit uniforms (std 65536)."""
    total = tl.zeros(counter.shape, dtype=tl.int64)
    for j in tl.static_range(6):
        h = _hash32(key ^ _hash32(counter * 6 + (j + 0x9E3779B9)))
        total += (h & 0xFFFF).to(tl.int64) + (h >> 16).to(tl.int64)
    return total - 393210
