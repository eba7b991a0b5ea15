// roi_sq_err, CPU: per-intervention sum of squared uint8-convention errors over the ROI, reading only the ROI.
// Semantics: cem_fast/reference.py::roi_sq_err_ref.
#include <ATen/Parallel.h>
#include <cmath>

#include "checks.h"

namespace {
template <typename scalar_t>
void roi_sq_err_kernel(const at::Tensor& outputs, const at::Tensor& target, int64_t y, int64_t x, at::Tensor& res) {
  const auto O = outputs.accessor<scalar_t, 4>();
  const auto T = target.accessor<float, 3>();
  auto R = res.accessor<double, 1>();
  const int64_t C = target.size(0), rh = target.size(1), rw = target.size(2);
  at::parallel_for(0, outputs.size(0), 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      double acc = 0.0;
      for (int64_t c = 0; c < C; ++c)
        for (int64_t i = 0; i < rh; ++i)
          for (int64_t j = 0; j < rw; ++j) {
            // clamp to [0, 1], x255 and round half to even, in float32 like the reference
            const float v = static_cast<float>(O[k][c][y + i][x + j]);
            const float q = std::nearbyint(std::min(std::max(v, 0.0f), 1.0f) * 255.0f);
            const double d = static_cast<double>(q) - static_cast<double>(T[c][i][j]);
            acc += d * d;
          }
      R[k] = acc;
    }
  });
}
}  // namespace

at::Tensor roi_sq_err_cpu(const at::Tensor& outputs, const at::Tensor& target, int64_t y, int64_t x) {
  CEM_CHECK_CPU(outputs);
  CEM_CHECK_DIM(outputs, 4);
  CEM_CHECK_DIM(target, 3);
  TORCH_CHECK(y >= 0 && x >= 0 && y + target.size(1) <= outputs.size(2) && x + target.size(2) <= outputs.size(3),
              "roi (", y, ", ", x, ", ", target.size(1), "x", target.size(2), ") must lie inside the ",
              outputs.size(2), "x", outputs.size(3), " outputs");
  const at::Tensor t = target.to(at::kFloat);
  at::Tensor res = at::empty({outputs.size(0)}, outputs.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, outputs.scalar_type(), "roi_sq_err_cpu", [&] {
    roi_sq_err_kernel<scalar_t>(outputs, t, y, x, res);
  });
  return res;
}
