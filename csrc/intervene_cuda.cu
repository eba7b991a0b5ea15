// intervene, CUDA: one thread per output element (k, c, i, j) of out (K, C, wh, ww), any strides and float dtype.
// Semantics: cem_fast/reference.py::intervene_ref; bit-identical (integer noise, IEEE division by 255).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "rng.h"

namespace {

template <typename scalar_t>
__global__ void intervene_kernel(scalar_t* __restrict__ out, const float* __restrict__ base,
                                 const uint8_t* __restrict__ patches, const int64_t* __restrict__ idx,
                                 const int64_t* __restrict__ org, const int64_t* __restrict__ size,
                                 const int64_t* __restrict__ win, const int64_t* __restrict__ ids,
                                 const float* __restrict__ rain, int64_t seed, int64_t sigma_q, int64_t K, int64_t C,
                                 int64_t h, int64_t w, int64_t wh, int64_t ww, int64_t pb, int64_t s_k, int64_t s_c,
                                 int64_t s_h, int64_t s_w, bool noisy, bool rainy) {
  const int64_t total = K * C * wh * ww;
  // grid-stride loop: any K, also beyond 2^31 elements
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = e % ww, i = (e / ww) % wh, c = (e / (ww * wh)) % C, k = e / (ww * wh * C);
    const int64_t gy = win[2 * k] + i, gx = win[2 * k + 1] + j;  // input pixel of this output pixel
    const int64_t dy = gy - org[2 * k], dx = gx - org[2 * k + 1];
    float v = base[(c * h + gy) * w + gx];
    if (dy >= 0 && dy < size[2 * k] && dx >= 0 && dx < size[2 * k + 1]) {
      int64_t p = patches[((idx[k] * C + c) * pb + dy) * pb + dx];
      if (noisy) {
        const uint32_t key = cem::stream_key(seed, ids[k]);
        const int64_t t = p * (int64_t(1) << 24) + cem::gaussian12(key, (c * pb + dy) * pb + dx) * sigma_q;
        p = min(int64_t(255), max(int64_t(0), t >> 24));  // arithmetic shift: floor
      }
      float pv = static_cast<float>(p);
      if (rainy) pv = floorf(fminf(__fadd_rn(pv, rain[(c * h + gy) * w + gx]), 255.0f));
      v = __fdiv_rn(pv, 255.0f);
    }
    out[k * s_k + c * s_c + i * s_h + j * s_w] = static_cast<scalar_t>(v);
  }
}

}  // namespace

at::Tensor intervene_cuda(const at::Tensor& base, const at::Tensor& patches, const at::Tensor& patch_idx,
                          const at::Tensor& origins, const at::Tensor& sizes, const at::Tensor& ids, int64_t seed,
                          int64_t sigma_q, const at::Tensor& rain, const at::Tensor& windows, at::Tensor out) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&base, &patches, &patch_idx, &origins,
                                                                      &sizes, &windows, &out})
    TORCH_CHECK(t->is_cuda(), "intervene_cuda: every tensor must be on a CUDA device, got ", t->device());
  TORCH_CHECK(base.scalar_type() == at::kFloat && base.is_contiguous(), "base must be contiguous float32");
  TORCH_CHECK(patches.scalar_type() == at::kByte && patches.is_contiguous(), "patches must be contiguous uint8");
  const bool noisy = sigma_q > 0, rainy = rain.defined() && rain.numel() > 0;
  TORCH_CHECK(!noisy || ids.numel() == patch_idx.numel(), "ids must give one id per intervention, got ",
              ids.numel(), " for ", patch_idx.numel());
  // ids and rain are read only when used, but a host pointer read on the device is an illegal memory access
  TORCH_CHECK(!noisy || ids.device() == out.device(), "intervene_cuda: ids must be on ", out.device(), ", got ",
              ids.device());
  TORCH_CHECK(!rainy || rain.device() == out.device(), "intervene_cuda: rain must be on ", out.device(), ", got ",
              rain.device());
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&base, &patches, &patch_idx, &origins,
                                                                      &sizes, &windows})
    TORCH_CHECK(t->device() == out.device(), "intervene_cuda: every tensor must be on ", out.device(), ", got ",
                t->device());
  const at::cuda::CUDAGuard guard(out.device());
  const int64_t total = out.numel();
  if (total == 0) return out;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, int64_t(1) << 20);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "intervene_cuda", [&] {
    intervene_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        out.data_ptr<scalar_t>(), base.data_ptr<float>(), patches.data_ptr<uint8_t>(),
        patch_idx.data_ptr<int64_t>(), origins.data_ptr<int64_t>(), sizes.data_ptr<int64_t>(),
        windows.data_ptr<int64_t>(), noisy ? ids.data_ptr<int64_t>() : nullptr,
        rainy ? rain.data_ptr<float>() : nullptr, seed, sigma_q, out.size(0), out.size(1), base.size(1),
        base.size(2), out.size(2), out.size(3), patches.size(3), out.stride(0), out.stride(1), out.stride(2),
        out.stride(3), noisy, rainy);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
