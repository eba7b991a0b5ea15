// The kernels behind the cem_fast::* operator schemas (csrc/bindings.cpp registers them per device).
#pragma once
#include <torch/extension.h>

#include <optional>

namespace cem {

at::Tensor& intervene_out_cpu(const at::Tensor& base, const at::Tensor& patches, const at::Tensor& patch_idx,
                              const at::Tensor& origins, const at::Tensor& sizes, const std::optional<at::Tensor>& ids,
                              int64_t seed, double noise_sigma, const std::optional<at::Tensor>& rain,
                              const std::optional<at::Tensor>& window_origins, at::OptionalIntArrayRef window_size,
                              at::Tensor& out);
at::Tensor roi_sq_err_cpu(const at::Tensor& outputs, const at::Tensor& target, int64_t y, int64_t x);
at::Tensor roi_sq_err_multi_cpu(const at::Tensor& outputs, const at::Tensor& target, const at::Tensor& rois);

#ifdef WITH_CUDA
at::Tensor& intervene_out_cuda(const at::Tensor& base, const at::Tensor& patches, const at::Tensor& patch_idx,
                               const at::Tensor& origins, const at::Tensor& sizes,
                               const std::optional<at::Tensor>& ids, int64_t seed, double noise_sigma,
                               const std::optional<at::Tensor>& rain, const std::optional<at::Tensor>& window_origins,
                               at::OptionalIntArrayRef window_size, at::Tensor& out);
at::Tensor roi_sq_err_cuda(const at::Tensor& outputs, const at::Tensor& target, int64_t y, int64_t x);
at::Tensor roi_sq_err_multi_cuda(const at::Tensor& outputs, const at::Tensor& target, const at::Tensor& rois);
#endif

}  // namespace cem
