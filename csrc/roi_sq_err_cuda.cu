// roi_sq_err, CUDA: one block per (intervention, ROI) reduces that ROI, reading only the ROI, a row per warp.
// Semantics: cem_fast/reference.py::roi_sq_err_ref and roi_sq_err_multi_ref; exact (integer accumulation,
// x * 255 rounded before rint); NaN only where a ROI holds NaN.
// A row is read in memory order: out[k, :, y0 + i, x0:x0 + rw] with lanes t = j * C + c for channels-last outputs
// (contiguous), out[k, c, y0 + i, x0:x0 + rw] otherwise; a row's indices are divided once per row, an element's
// only by C (no 64-bit division per element).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <limits>

#include "checks.h"
#include "ops.h"

namespace {

struct Roi {
  int64_t y, x, h, w;
};

// res (K, n). ROI r is rois[r] (device, (n, 4) = (y, x, h, w)) or, with rois == nullptr (one ROI), ``one``.
// The target (C, TH, TW) is the ROI itself (one ROI) or the whole output (target_full), indexed at the ROI.
template <typename scalar_t>
__global__ void roi_sq_err_kernel(double* __restrict__ res, const scalar_t* __restrict__ x,
                                  const int32_t* __restrict__ target, const int64_t* __restrict__ rois, Roi one,
                                  int64_t n_rois, bool target_full, int64_t C, int64_t TH, int64_t TW, int64_t s_k,
                                  int64_t s_c, int64_t s_h, int64_t s_w, bool channels_last) {
  const int64_t k = blockIdx.x, r = blockIdx.y;
  const int64_t y0 = rois ? rois[4 * r] : one.y, x0 = rois ? rois[4 * r + 1] : one.x;
  const int64_t rh = rois ? rois[4 * r + 2] : one.h, rw = rois ? rois[4 * r + 3] : one.w;
  const int64_t ty = target_full ? y0 : 0, tx = target_full ? x0 : 0;
  const bool cl = channels_last;
  const int rows = static_cast<int>(cl ? rh : C * rh), row_len = static_cast<int>(cl ? rw * C : rw);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  long long acc = 0;
  int has_nan = 0;
  for (int row = warp; row < rows; row += warps) {
    const int i = cl ? row : row % static_cast<int>(rh);
    const int c_row = cl ? 0 : row / static_cast<int>(rh);
    const scalar_t* x_row = x + k * s_k + (y0 + i) * s_h + x0 * s_w + (cl ? 0 : c_row * s_c);
    for (int t = lane; t < row_len; t += 32) {
      const int j = cl ? t / static_cast<int>(C) : t;
      const int c = cl ? t - j * static_cast<int>(C) : c_row;
      float v = static_cast<float>(x_row[int64_t(j) * s_w + (cl ? c * s_c : 0)]);
      if (v != v) { has_nan = 1; continue; }
      v = fminf(fmaxf(v, 0.0f), 1.0f);
      const int q = __float2int_rn(__fmul_rn(v, 255.0f));  // no FMA: round x * 255 first, then half to even
      const long long d = q - target[(c * TH + ty + i) * TW + tx + j];
      acc += d * d;
    }
  }
  __shared__ long long s_acc[256];
  __shared__ int s_nan[256];
  s_acc[threadIdx.x] = acc;
  s_nan[threadIdx.x] = has_nan;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      s_acc[threadIdx.x] += s_acc[threadIdx.x + stride];
      s_nan[threadIdx.x] |= s_nan[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) res[k * n_rois + r] = s_nan[0] ? nan("") : static_cast<double>(s_acc[0]);
}

constexpr int64_t kMaxRoisPerLaunch = 65535;  // grid.y

// rois: (n, 4) int64 on the outputs' device, or undefined for the single ROI ``one``. res: (K,) or (K, n), made here
// (not a view: the ops return it as it is). More than 65,535 ROIs take one launch per 65,535: launch j reads the
// table from ROI r0 on and writes res[k, r0 + r] (the kernel's row stride stays n).
at::Tensor launch(const at::Tensor& outputs, const at::Tensor& target, const at::Tensor& rois, Roi one,
                  bool target_full) {
  const at::cuda::CUDAGuard guard(outputs.device());
  const at::Tensor t = target.to(at::kInt).contiguous();
  const int64_t K = outputs.size(0), n = rois.defined() ? rois.size(0) : 1;
  at::Tensor res = rois.defined() ? at::empty({K, n}, outputs.options().dtype(at::kDouble))
                                  : at::empty({K}, outputs.options().dtype(at::kDouble));
  if (K == 0 || n == 0) return res;
  TORCH_CHECK(K <= std::numeric_limits<int32_t>::max(), "at most 2^31 - 1 outputs per launch (grid.x), got ", K);
  // channels-last outputs (not also planar, as one channel is) are read in that memory order
  const bool channels_last = outputs.size(1) > 1 && !outputs.is_contiguous() &&
                             outputs.is_contiguous(at::MemoryFormat::ChannelsLast);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, outputs.scalar_type(), "roi_sq_err_cuda", [&] {
    for (int64_t r0 = 0; r0 < n; r0 += kMaxRoisPerLaunch) {
      const dim3 grid(static_cast<unsigned>(K), static_cast<unsigned>(std::min(kMaxRoisPerLaunch, n - r0)));
      roi_sq_err_kernel<scalar_t><<<grid, 256, 0, stream>>>(
          res.data_ptr<double>() + r0, outputs.data_ptr<scalar_t>(), t.data_ptr<int32_t>(),
          rois.defined() ? rois.data_ptr<int64_t>() + 4 * r0 : nullptr, one, n, target_full, t.size(0), t.size(1),
          t.size(2), outputs.stride(0), outputs.stride(1), outputs.stride(2), outputs.stride(3), channels_last);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return res;
}

}  // namespace

namespace cem {

at::Tensor roi_sq_err_cuda(const at::Tensor& outputs, const at::Tensor& target, int64_t y, int64_t x) {
  check_one_roi(outputs, target, y, x);
  CEM_CHECK_CUDA(outputs);
  CEM_CHECK_SAME_DEVICE(target, outputs);
  return launch(outputs, target, at::Tensor(), Roi{y, x, target.size(1), target.size(2)}, false);
}

// The ROIs' bounds are checked on a host copy of the table (one synchronisation): the operator is public (the
// pipeline's own tables skip it: trusted_indices).
at::Tensor roi_sq_err_multi_cuda(const at::Tensor& outputs, const at::Tensor& target, const at::Tensor& rois) {
  check_many_rois(outputs, target, rois);
  CEM_CHECK_CUDA(outputs);
  CEM_CHECK_SAME_DEVICE(target, outputs);
  CEM_CHECK_SAME_DEVICE(rois, outputs);
  if (!trusted_indices()) check_rois_table(rois.cpu(), outputs.size(2), outputs.size(3));
  return launch(outputs, target, rois.contiguous(), Roi{0, 0, 0, 0}, true);
}

}  // namespace cem
