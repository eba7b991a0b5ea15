// roi_sq_err, CUDA: one block per intervention reduces its ROI, reading only the ROI.
// Semantics: cem_fast/reference.py::roi_sq_err_ref; exact (integer accumulation, x * 255 rounded before rint).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

namespace {

template <typename scalar_t>
__global__ void roi_sq_err_kernel(double* __restrict__ res, const scalar_t* __restrict__ x,
                                  const int32_t* __restrict__ target, int64_t y0, int64_t x0, int64_t rh, int64_t rw,
                                  int64_t C, int64_t s_k, int64_t s_c, int64_t s_h, int64_t s_w) {
  const int64_t k = blockIdx.x, n = C * rh * rw;
  long long acc = 0;
  int has_nan = 0;
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
    const int64_t c = e / (rh * rw), i = (e / rw) % rh, j = e % rw;
    float v = static_cast<float>(x[k * s_k + c * s_c + (y0 + i) * s_h + (x0 + j) * s_w]);
    if (v != v) { has_nan = 1; continue; }
    v = fminf(fmaxf(v, 0.0f), 1.0f);
    const int q = __float2int_rn(__fmul_rn(v, 255.0f));  // no FMA: round x * 255 first, then half to even
    const long long d = q - target[e];
    acc += d * d;
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
  if (threadIdx.x == 0) res[k] = s_nan[0] ? nan("") : static_cast<double>(s_acc[0]);
}

}  // namespace

at::Tensor roi_sq_err_cuda(const at::Tensor& outputs, const at::Tensor& target, int64_t y, int64_t x) {
  TORCH_CHECK(outputs.is_cuda() && target.is_cuda(), "roi_sq_err_cuda: tensors must be on a CUDA device");
  TORCH_CHECK(outputs.dim() == 4 && target.dim() == 3, "outputs must be (K, C, H, W) and target (C, h, w)");
  TORCH_CHECK(y >= 0 && x >= 0 && y + target.size(1) <= outputs.size(2) && x + target.size(2) <= outputs.size(3),
              "roi (", y, ", ", x, ", ", target.size(1), "x", target.size(2), ") must lie inside the ",
              outputs.size(2), "x", outputs.size(3), " outputs");
  const at::cuda::CUDAGuard guard(outputs.device());
  const at::Tensor t = target.to(at::kInt).contiguous();
  at::Tensor res = at::empty({outputs.size(0)}, outputs.options().dtype(at::kDouble));
  if (outputs.size(0) == 0) return res;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, outputs.scalar_type(), "roi_sq_err_cuda", [&] {
    roi_sq_err_kernel<scalar_t><<<outputs.size(0), 256, 0, stream>>>(
        res.data_ptr<double>(), outputs.data_ptr<scalar_t>(), t.data_ptr<int32_t>(), y, x, target.size(1),
        target.size(2), target.size(0), outputs.stride(0), outputs.stride(1), outputs.stride(2), outputs.stride(3));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return res;
}
