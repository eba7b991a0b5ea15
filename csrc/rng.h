// Counter-based RNG, bit-identical to cem_fast/rng.py (uint32 arithmetic wraps exactly like the masked int64
// arithmetic there).
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define CEM_HD __host__ __device__ __forceinline__
#else
#define CEM_HD inline
#endif

namespace cem {

constexpr uint32_t kMul1 = 0x21F0AAADu, kMul2 = 0x735A2D97u, kGolden = 0x9E3779B9u;
constexpr int64_t kGauss12Mean = 12 * 65535 / 2;

CEM_HD uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= kMul1;
  x ^= x >> 15;
  x *= kMul2;
  x ^= x >> 15;
  return x;
}

// Key of an intervention from the run seed and the intervention id.
CEM_HD uint32_t stream_key(int64_t seed, int64_t id) {
  const uint64_t s64 = static_cast<uint64_t>(seed), i64 = static_cast<uint64_t>(id);
  const uint32_t s = hash32(hash32(static_cast<uint32_t>(s64) ^ kGolden) ^ static_cast<uint32_t>(s64 >> 32));
  return hash32(hash32(s ^ static_cast<uint32_t>(i64)) ^ static_cast<uint32_t>(i64 >> 32));
}

// Centred sum of twelve 16-bit uniforms (std 65536): noise that every backend computes exactly.
CEM_HD int64_t gaussian12(uint32_t key, int64_t counter) {
  int64_t total = 0;
  for (int64_t j = 0; j < 6; ++j) {
    const uint32_t c = static_cast<uint32_t>(static_cast<uint64_t>(6 * counter + j + kGolden));
    const uint32_t h = hash32(key ^ hash32(c));
    total += (h & 0xFFFFu) + (h >> 16);
  }
  return total - kGauss12Mean;
}

}  // namespace cem
