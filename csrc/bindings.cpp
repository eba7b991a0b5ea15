// Python bindings of cem_fast._C (CPU ops; CUDA ops join when the build has CUDA).
#include <torch/extension.h>

at::Tensor intervene_cpu(const at::Tensor& base, const at::Tensor& patches, const at::Tensor& patch_idx,
                         const at::Tensor& origins, const at::Tensor& sizes, const at::Tensor& ids, int64_t seed,
                         int64_t sigma_q, const at::Tensor& rain, const at::Tensor& windows, at::Tensor out);
at::Tensor roi_sq_err_cpu(const at::Tensor& outputs, const at::Tensor& target, int64_t y, int64_t x);
at::Tensor roi_sq_err_multi_cpu(const at::Tensor& outputs, const at::Tensor& target, const at::Tensor& rois);

#ifdef WITH_CUDA
at::Tensor intervene_cuda(const at::Tensor& base, const at::Tensor& patches, const at::Tensor& patch_idx,
                          const at::Tensor& origins, const at::Tensor& sizes, const at::Tensor& ids, int64_t seed,
                          int64_t sigma_q, const at::Tensor& rain, const at::Tensor& windows, at::Tensor out);
at::Tensor roi_sq_err_cuda(const at::Tensor& outputs, const at::Tensor& target, int64_t y, int64_t x);
at::Tensor roi_sq_err_multi_cuda(const at::Tensor& outputs, const at::Tensor& target, const at::Tensor& rois);
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("intervene_cpu", &intervene_cpu, "intervened inputs (CPU, OpenMP)");
  m.def("roi_sq_err_cpu", &roi_sq_err_cpu, "ROI sum of squared uint8-convention errors (CPU, OpenMP)");
  m.def("roi_sq_err_multi_cpu", &roi_sq_err_multi_cpu, "(K, n) squared errors of n ROIs (CPU, OpenMP)");
#ifdef WITH_CUDA
  m.def("intervene_cuda", &intervene_cuda, "intervened inputs (CUDA)");
  m.def("roi_sq_err_cuda", &roi_sq_err_cuda, "ROI sum of squared uint8-convention errors (CUDA)");
  m.def("roi_sq_err_multi_cuda", &roi_sq_err_multi_cuda, "(K, n) squared errors of n ROIs (CUDA)");
#endif
}
