// roi_sq_err, CUDA: one block per (intervention, ROI) reduces that ROI, reading only the ROI, a row per warp.
// Semantics: cem_fast/reference.py::roi_sq_err_ref and roi_sq_err_multi_ref; exact (integer accumulation,
// x * 255 rounded before rint); NaN only where a ROI holds NaN.
// A row is read in memory order: out[k, :, y0 + i, x0:x0 + rw] with lanes t = j * C + c for channels-last outputs
// (contiguous), out[k, c, y0 + i, x0:x0 + rw] otherwise; a row's indices are divided once per row, an element's
// only by C (no 64-bit division per element).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

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

// rois: (n, 4) int64 on the outputs' device, or undefined for the single ROI ``one``.
at::Tensor launch(const at::Tensor& outputs, const at::Tensor& target, const at::Tensor& rois, Roi one,
                  bool target_full) {
  const at::cuda::CUDAGuard guard(outputs.device());
  const at::Tensor t = target.to(at::kInt).contiguous();
  const int64_t n = rois.defined() ? rois.size(0) : 1;
  at::Tensor res = at::empty({outputs.size(0), n}, outputs.options().dtype(at::kDouble));
  if (outputs.size(0) == 0 || n == 0) return res;
  TORCH_CHECK(n <= 65535, "at most 65,535 ROIs per launch, got ", n);
  // channels-last outputs (not also planar, as one channel is) are read in that memory order
  const bool channels_last = outputs.size(1) > 1 && !outputs.is_contiguous() &&
                             outputs.is_contiguous(at::MemoryFormat::ChannelsLast);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(outputs.size(0)), static_cast<unsigned>(n));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, outputs.scalar_type(), "roi_sq_err_cuda", [&] {
    roi_sq_err_kernel<scalar_t><<<grid, 256, 0, stream>>>(
        res.data_ptr<double>(), outputs.data_ptr<scalar_t>(), t.data_ptr<int32_t>(),
        rois.defined() ? rois.data_ptr<int64_t>() : nullptr, one, n, target_full, t.size(0), t.size(1), t.size(2),
        outputs.stride(0), outputs.stride(1), outputs.stride(2), outputs.stride(3), channels_last);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return res;
}

}  // namespace

at::Tensor roi_sq_err_cuda(const at::Tensor& outputs, const at::Tensor& target, int64_t y, int64_t x) {
  TORCH_CHECK(outputs.is_cuda() && target.is_cuda(), "roi_sq_err_cuda: tensors must be on a CUDA device");
  TORCH_CHECK(outputs.dim() == 4 && target.dim() == 3, "outputs must be (K, C, H, W) and target (C, h, w)");
  TORCH_CHECK(y >= 0 && x >= 0 && y + target.size(1) <= outputs.size(2) && x + target.size(2) <= outputs.size(3),
              "roi (", y, ", ", x, ", ", target.size(1), "x", target.size(2), ") must lie inside the ",
              outputs.size(2), "x", outputs.size(3), " outputs");
  return launch(outputs, target, at::Tensor(), Roi{y, x, target.size(1), target.size(2)}, false)
      .view({outputs.size(0)});
}

at::Tensor roi_sq_err_multi_cuda(const at::Tensor& outputs, const at::Tensor& target, const at::Tensor& rois) {
  TORCH_CHECK(outputs.is_cuda() && target.is_cuda(), "roi_sq_err_multi_cuda: tensors must be on a CUDA device");
  TORCH_CHECK(outputs.dim() == 4 && target.dim() == 3, "outputs must be (K, C, H, W) and target (C, H, W)");
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 4, "rois must be (n, 4) (y, x, h, w), got ", rois.sizes());
  TORCH_CHECK(target.size(1) == outputs.size(2) && target.size(2) == outputs.size(3),
              "target must be (C, H, W) of the outputs' size, got ", target.sizes(), " for ", outputs.sizes());
  // The ROIs' bounds are checked by the caller (cem_fast/cuda_ops.py), which keeps them on the device.
  TORCH_CHECK(rois.is_cuda() && rois.scalar_type() == at::kLong && rois.is_contiguous(),
              "rois must be a contiguous int64 CUDA tensor");
  return launch(outputs, target, rois, Roi{0, 0, 0, 0}, true);
}
