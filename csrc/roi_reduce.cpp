// roi_sq_err, CPU: per-intervention sum of squared uint8-convention errors over the ROI, reading only the ROI.
// Semantics: cem_fast/reference.py::roi_sq_err_ref.
#include <ATen/Parallel.h>
#include <cmath>

#include "checks.h"

namespace {
// Round half to even for 0 <= v < 2^22 without a libm call: adding 1.5 * 2^23 leaves no fraction bits, so the
// FPU's default rounding (to nearest, ties to even) does the rounding. Needs IEEE semantics (no -ffast-math).
inline float round_half_even(float v) {
  const float t = v + 12582912.0f;  // IEEE: not folded without -ffast-math
  return t - 12582912.0f;
}

template <typename scalar_t>
void roi_sq_err_kernel(const at::Tensor& outputs, const at::Tensor& target, int64_t y, int64_t x, at::Tensor& res) {
  const scalar_t* O = outputs.data_ptr<scalar_t>();
  const float* T = target.data_ptr<float>();  // contiguous (C, rh, rw)
  const int64_t sk = outputs.stride(0), sc = outputs.stride(1), sy = outputs.stride(2), sx = outputs.stride(3);
  double* R = res.data_ptr<double>();
  const int64_t C = target.size(0), rh = target.size(1), rw = target.size(2);
  at::parallel_for(0, outputs.size(0), 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      double acc = 0.0;
      for (int64_t c = 0; c < C; ++c)
        for (int64_t i = 0; i < rh; ++i) {
          const scalar_t* row = O + k * sk + c * sc + (y + i) * sy + x * sx;
          const float* trow = T + (c * rh + i) * rw;
          float row_acc = 0.0f;  // exact: at most rw * 255^2 < 2^24 for rw <= 258
          double row_acc_d = 0.0;
          const bool exact_in_float = rw <= 258;
          for (int64_t j = 0; j < rw; ++j) {
            // clamp to [0, 1], x255 and round half to even, in float32 like the reference; NaN stays NaN
            float v = static_cast<float>(row[j * sx]);
            v = v > 1.0f ? 1.0f : (v < 0.0f ? 0.0f : v);
            const float d = round_half_even(v * 255.0f) - trow[j];
            if (exact_in_float) row_acc += d * d; else row_acc_d += static_cast<double>(d) * d;
          }
          acc += exact_in_float ? static_cast<double>(row_acc) : row_acc_d;
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
  const at::Tensor t = target.to(at::kFloat).contiguous();
  at::Tensor res = at::empty({outputs.size(0)}, outputs.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, outputs.scalar_type(), "roi_sq_err_cpu", [&] {
    roi_sq_err_kernel<scalar_t>(outputs, t, y, x, res);
  });
  return res;
}
