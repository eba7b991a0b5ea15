// roi_sq_err, CPU: per-intervention sum of squared uint8-convention errors over one ROI or many, reading only the
// ROIs. Semantics: cem_fast/reference.py::roi_sq_err_ref and roi_sq_err_multi_ref (NaN only where a ROI holds NaN).
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

// res (K, n): for output k and ROI r = rois[r] = (y, x, h, w), the ROI's squared error against the target.
// The target is (C, TH, TW): the ROI itself (one ROI; target_full false) or the whole output (target_full true).
template <typename scalar_t>
void roi_sq_err_kernel(const at::Tensor& outputs, const at::Tensor& target, const int64_t* rois, int64_t n,
                       bool target_full, at::Tensor& res) {
  const scalar_t* O = outputs.data_ptr<scalar_t>();
  const float* T = target.data_ptr<float>();  // contiguous
  const int64_t sk = outputs.stride(0), sc = outputs.stride(1), sy = outputs.stride(2), sx = outputs.stride(3);
  double* R = res.data_ptr<double>();
  const int64_t C = target.size(0), TH = target.size(1), TW = target.size(2);
  at::parallel_for(0, outputs.size(0) * n, 1, [&](int64_t a, int64_t b) {
    for (int64_t kr = a; kr < b; ++kr) {
      const int64_t k = kr / n, r = kr % n;
      const int64_t y = rois[4 * r], x = rois[4 * r + 1], rh = rois[4 * r + 2], rw = rois[4 * r + 3];
      const int64_t ty = target_full ? y : 0, tx = target_full ? x : 0;
      const bool exact_in_float = rw <= 258;  // a row's sum is at most rw * 255^2 < 2^24: exact in float
      double acc = 0.0;
      for (int64_t c = 0; c < C; ++c)
        for (int64_t i = 0; i < rh; ++i) {
          const scalar_t* row = O + k * sk + c * sc + (y + i) * sy + x * sx;
          const float* trow = T + (c * TH + ty + i) * TW + tx;
          float row_acc = 0.0f;
          double row_acc_d = 0.0;
          for (int64_t j = 0; j < rw; ++j) {
            // clamp to [0, 1], x255 and round half to even, in float32 like the reference; NaN stays NaN
            float v = static_cast<float>(row[j * sx]);
            v = v > 1.0f ? 1.0f : (v < 0.0f ? 0.0f : v);
            const float d = round_half_even(v * 255.0f) - trow[j];
            if (exact_in_float) row_acc += d * d; else row_acc_d += static_cast<double>(d) * d;
          }
          acc += exact_in_float ? static_cast<double>(row_acc) : row_acc_d;
        }
      R[kr] = acc;
    }
  });
}

// res: (K,) for one ROI or (K, n) for n ROIs, allocated here (not a view: the ops return it as it is).
at::Tensor run(const at::Tensor& outputs, const at::Tensor& target, const at::Tensor& rois, bool target_full) {
  const at::Tensor t = target.to(at::kFloat).contiguous();
  const at::Tensor r = rois.contiguous();
  const int64_t n = r.size(0);
  at::Tensor res = target_full ? at::empty({outputs.size(0), n}, outputs.options().dtype(at::kDouble))
                               : at::empty({outputs.size(0)}, outputs.options().dtype(at::kDouble));
  if (n == 0 || outputs.size(0) == 0) return res;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, outputs.scalar_type(), "roi_sq_err_cpu", [&] {
    roi_sq_err_kernel<scalar_t>(outputs, t, r.data_ptr<int64_t>(), n, target_full, res);
  });
  return res;
}
}  // namespace

namespace cem {

at::Tensor roi_sq_err_cpu(const at::Tensor& outputs, const at::Tensor& target, int64_t y, int64_t x) {
  check_one_roi(outputs, target, y, x);
  CEM_CHECK_CPU(outputs);
  CEM_CHECK_CPU(target);
  const at::Tensor rois = at::tensor({y, x, target.size(1), target.size(2)}, at::kLong).view({1, 4});
  return run(outputs, target, rois, false);
}

at::Tensor roi_sq_err_multi_cpu(const at::Tensor& outputs, const at::Tensor& target, const at::Tensor& rois) {
  check_many_rois(outputs, target, rois);
  for (const at::Tensor* t : {&outputs, &target, &rois}) CEM_CHECK_CPU(*t);
  check_rois_table(rois, outputs.size(2), outputs.size(3));
  return run(outputs, target, rois, true);
}

}  // namespace cem
