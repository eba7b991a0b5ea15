// intervene, CUDA. Semantics: cem_fast/reference.py::intervene_ref; bit-identical (integer noise, IEEE division by
// 255).
//
// Layout: a 2-D grid. blockIdx.y walks the output rows (grid-stride: any K); a row is out[k, c, i, :] for planar
// outputs (NCHW) or out[k, :, i, :] in memory order (t = j * C + c) for channels-last outputs, which convolutional
// models get: the stores of a warp are then contiguous (coalesced) instead of C elements apart. blockIdx.x and the
// threads walk the row. The row's indices are divided once per row in 32 bits (K * C * wh < 2^31 is checked), an
// element's only by C; the intervention's window, block and patch are read once per row.
// Prediction (H200, K=1024 DN interventions into 256x256x3 fp32, channels-last): 805 MB written, the base
// (0.8 MB) read from L2: about 0.2 ms at 4 TB/s, against 0.4 ms for a copy of the same bytes (read + write).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "checks.h"
#include "ops.h"
#include "rng.h"

namespace {

template <typename scalar_t, bool kChannelsLast>
__global__ void intervene_kernel(scalar_t* __restrict__ out, const float* __restrict__ base,
                                 const uint8_t* __restrict__ patches, const int64_t* __restrict__ idx,
                                 const int64_t* __restrict__ org, const int64_t* __restrict__ size,
                                 const int64_t* __restrict__ win, const int64_t* __restrict__ ids,
                                 const float* __restrict__ rain, int64_t seed, int64_t sigma_q, int rows, int C,
                                 int h, int w, int wh, int ww, int pb, int64_t s_k, int64_t s_c, int64_t s_h,
                                 int64_t s_w, bool noisy, bool rainy) {
  const int row_len = kChannelsLast ? ww * C : ww;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {  // 64-bit: row + gridDim.y may pass 2^31
    // the row's intervention k, output row i (and channel c, planar): uniform across the block
    const int i = static_cast<int>(row % wh);
    const int kc = static_cast<int>(row / wh);
    const int k = kChannelsLast ? kc : kc / C;
    const int c_row = kChannelsLast ? 0 : kc % C;
    const int64_t gy = __ldg(win + 2 * k) + i;  // input row of this output row
    const int64_t wx = __ldg(win + 2 * k + 1);
    const int64_t dy = gy - __ldg(org + 2 * k);
    const bool row_in_block = dy >= 0 && dy < __ldg(size + 2 * k);
    const int64_t ox = __ldg(org + 2 * k + 1), sx = __ldg(size + 2 * k + 1);
    const int64_t p = __ldg(idx + k);
    const uint32_t key = noisy ? cem::stream_key(seed, __ldg(ids + k)) : 0u;
    scalar_t* out_row = out + k * s_k + i * s_h + (kChannelsLast ? 0 : c_row * s_c);
    for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < row_len; t += gridDim.x * blockDim.x) {
      const int j = kChannelsLast ? t / C : t;
      const int c = kChannelsLast ? t - j * C : c_row;
      const int64_t gx = wx + j;
      const int64_t dx = gx - ox;
      float v = __ldg(base + (int64_t(c) * h + gy) * w + gx);
      if (row_in_block && dx >= 0 && dx < sx) {
        int64_t pv = patches[((p * C + c) * pb + dy) * pb + dx];
        if (noisy) {
          const int64_t counter = (int64_t(c) * pb + dy) * pb + dx;  // the pixel within the intervention's patch
          const int64_t tot = pv * (int64_t(1) << 24) + cem::gaussian12(key, counter) * sigma_q;
          pv = min(int64_t(255), max(int64_t(0), tot >> 24));  // arithmetic shift: floor
        }
        float fv = static_cast<float>(pv);
        if (rainy) fv = floorf(fminf(__fadd_rn(fv, rain[(int64_t(c) * h + gy) * w + gx]), 255.0f));
        v = __fdiv_rn(fv, 255.0f);
      }
      out_row[kChannelsLast ? int64_t(j) * s_w + c * s_c : int64_t(j) * s_w] = static_cast<scalar_t>(v);
    }
  }
}

}  // namespace

namespace cem {

at::Tensor& intervene_out_cuda(const at::Tensor& base_in, const at::Tensor& patches_in, const at::Tensor& patch_idx_in,
                               const at::Tensor& origins_in, const at::Tensor& sizes_in,
                               const std::optional<at::Tensor>& ids_in, int64_t seed, double noise_sigma,
                               const std::optional<at::Tensor>& rain_in,
                               const std::optional<at::Tensor>& window_origins,
                               at::OptionalIntArrayRef window_size, at::Tensor& out) {
  const InterveneArgs a = intervene_args(base_in, patches_in, patch_idx_in, origins_in, sizes_in, ids_in, noise_sigma,
                                         rain_in, window_origins, window_size);
  check_intervene_out(out, a);
  CEM_CHECK_CUDA(out);
  // ids and rain are read only when used, but a host pointer read on the device is an illegal memory access
  for (const at::Tensor* t : {&base_in, &patches_in, &patch_idx_in, &origins_in, &sizes_in, &a.windows})
    CEM_CHECK_SAME_DEVICE(*t, out);
  if (a.noisy()) CEM_CHECK_SAME_DEVICE(a.ids, out);
  if (a.rainy()) CEM_CHECK_SAME_DEVICE(a.rain, out);
  // the index values, checked on host copies (one synchronisation): the operator is public, and a bad index
  // would be an illegal memory access
  if (!trusted_indices()) {  // the pipeline's own indices: checked in its tests, not here (no synchronisation)
    check_intervene_indices(patches_in.size(0), patch_idx_in.cpu(), origins_in.cpu(), sizes_in.cpu(),
                            a.windows.cpu(), a);
    if (a.rainy()) check_rain_values(a.rain);
  }
  // the kernel indexes its inputs as dense arrays; out keeps its layout (strides are passed)
  const at::Tensor base = base_in.contiguous(), patches = patches_in.contiguous();
  const at::Tensor patch_idx = patch_idx_in.contiguous(), origins = origins_in.contiguous();
  const at::Tensor sizes = sizes_in.contiguous(), windows = a.windows.contiguous();
  const at::Tensor ids = a.noisy() ? a.ids.contiguous() : at::Tensor();
  const at::Tensor rain = a.rainy() ? a.rain.contiguous() : at::Tensor();
  const bool noisy = a.noisy(), rainy = a.rainy();
  const int64_t sigma_q = a.sigma_q;
  const at::cuda::CUDAGuard guard(out.device());
  const int64_t K = out.size(0), C = out.size(1), wh = out.size(2), ww = out.size(3);
  if (out.numel() == 0) return out;
  // channels-last outputs are written in memory order (coalesced); planar ones row by row
  const bool cl = C > 1 && !out.is_contiguous() && out.is_contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t rows = cl ? K * wh : K * C * wh, row_len = cl ? ww * C : ww;
  TORCH_CHECK(rows < (int64_t(1) << 31) && row_len < (int64_t(1) << 31) && base.numel() < (int64_t(1) << 31),
              "intervene_cuda: too many interventions for one launch (", rows, " output rows); split the batch");
  const int threads = row_len >= 256 ? 256 : 128;
  // about four elements per thread along a row; rows on grid.y (at most 65,535 at once, the kernel strides)
  const int64_t per_block = int64_t(threads) * 4;
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(1, (row_len + per_block - 1) / per_block)),
                  static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "intervene_cuda", [&] {
    const auto launch = [&](auto kernel) {
      kernel<<<grid, threads, 0, stream>>>(
          out.data_ptr<scalar_t>(), base.data_ptr<float>(), patches.data_ptr<uint8_t>(),
          patch_idx.data_ptr<int64_t>(), origins.data_ptr<int64_t>(), sizes.data_ptr<int64_t>(),
          windows.data_ptr<int64_t>(), noisy ? ids.data_ptr<int64_t>() : nullptr,
          rainy ? rain.data_ptr<float>() : nullptr, seed, sigma_q, static_cast<int>(rows), static_cast<int>(C),
          static_cast<int>(base.size(1)), static_cast<int>(base.size(2)), static_cast<int>(wh),
          static_cast<int>(ww), static_cast<int>(patches.size(3)), out.stride(0), out.stride(1), out.stride(2),
          out.stride(3), noisy, rainy);
    };
    if (cl) launch(intervene_kernel<scalar_t, true>);
    else launch(intervene_kernel<scalar_t, false>);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace cem
