// intervene, CPU: K intervened inputs written into `out` (K, C, wh, ww), any float dtype and strides.
// Semantics: cem_fast/reference.py::intervene_ref (the oracle).
#include <ATen/Parallel.h>
#include <cmath>

#include "checks.h"
#include "rng.h"

namespace {
constexpr int64_t kNoiseOne = int64_t(1) << 24;  // one grey level in the integer noise arithmetic
inline int64_t K_of(const at::Tensor& t) { return t.size(0); }

template <typename scalar_t>
void intervene_kernel(const at::Tensor& base, const at::Tensor& patches, const at::Tensor& patch_idx,
                      const at::Tensor& origins, const at::Tensor& sizes, const at::Tensor& ids, int64_t seed,
                      int64_t sigma_q, const at::Tensor& rain, const at::Tensor& windows, at::Tensor& out) {
  const auto B = base.accessor<float, 3>();
  const auto Pt = patches.accessor<uint8_t, 4>();
  const auto idx = patch_idx.accessor<int64_t, 1>();
  const auto org = origins.accessor<int64_t, 2>();
  const auto sz = sizes.accessor<int64_t, 2>();
  const auto win = windows.accessor<int64_t, 2>();
  const bool noisy = sigma_q > 0, rainy = rain.defined() && rain.numel() > 0;
  const at::Tensor rain_or_dummy = rainy ? rain : at::zeros({1, 1, 1}, base.options());
  const at::Tensor ids_or_dummy = noisy ? ids : at::zeros({K_of(patch_idx)}, patch_idx.options());
  const auto Rn = rain_or_dummy.accessor<float, 3>();
  const auto Id = ids_or_dummy.accessor<int64_t, 1>();
  const int64_t K = out.size(0), C = out.size(1), wh = out.size(2), ww = out.size(3), pb = patches.size(3);
  auto O = out.accessor<scalar_t, 4>();
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t wy = win[k][0], wx = win[k][1];
      // base crop
      for (int64_t c = 0; c < C; ++c)
        for (int64_t i = 0; i < wh; ++i)
          for (int64_t j = 0; j < ww; ++j) O[k][c][i][j] = static_cast<scalar_t>(B[c][wy + i][wx + j]);
      const uint32_t key = noisy ? cem::stream_key(seed, Id[k]) : 0u;
      const int64_t p = idx[k], oy = org[k][0], ox = org[k][1];
      for (int64_t c = 0; c < C; ++c)
        for (int64_t dy = 0; dy < sz[k][0]; ++dy)
          for (int64_t dx = 0; dx < sz[k][1]; ++dx) {
            const int64_t ly = oy + dy - wy, lx = ox + dx - wx;  // position inside the window
            if (ly < 0 || ly >= wh || lx < 0 || lx >= ww) continue;
            float v = static_cast<float>(Pt[p][c][dy][dx]);
            if (noisy) {
              const int64_t counter = (c * pb + dy) * pb + dx;  // pixel index within the (C, pb, pb) patch
              int64_t total = static_cast<int64_t>(Pt[p][c][dy][dx]) * kNoiseOne +
                              cem::gaussian12(key, counter) * sigma_q;
              int64_t q = total >= 0 ? total / kNoiseOne : -((-total + kNoiseOne - 1) / kNoiseOne);  // floor
              v = static_cast<float>(std::min<int64_t>(255, std::max<int64_t>(0, q)));
            }
            if (rainy) v = std::floor(std::min(v + Rn[c][oy + dy][ox + dx], 255.0f));
            O[k][c][ly][lx] = static_cast<scalar_t>(v / 255.0f);
          }
    }
  });
}

}  // namespace

namespace cem {

at::Tensor& intervene_out_cpu(const at::Tensor& base, const at::Tensor& patches, const at::Tensor& patch_idx,
                              const at::Tensor& origins, const at::Tensor& sizes, const std::optional<at::Tensor>& ids,
                              int64_t seed, double noise_sigma, const std::optional<at::Tensor>& rain,
                              const std::optional<at::Tensor>& window_origins, at::OptionalIntArrayRef window_size,
                              at::Tensor& out) {
  const InterveneArgs a =
      intervene_args(base, patches, patch_idx, origins, sizes, ids, noise_sigma, rain, window_origins, window_size);
  check_intervene_out(out, a);
  for (const at::Tensor* t : {&base, &patches, &patch_idx, &origins, &sizes, &a.windows}) CEM_CHECK_CPU(*t);
  CEM_CHECK_CPU(out);
  if (a.noisy()) CEM_CHECK_CPU(a.ids);
  if (a.rainy()) CEM_CHECK_CPU(a.rain);
  check_intervene_indices(patches.size(0), patch_idx, origins, sizes, a.windows, a);
  if (a.rainy()) check_rain_values(a.rain);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "intervene_cpu", [&] {
    intervene_kernel<scalar_t>(base, patches, patch_idx, origins, sizes, a.ids, seed, a.sigma_q, a.rain, a.windows,
                               out);
  });
  return out;
}

}  // namespace cem
