// The cem_fast::* operators: schemas (TORCH_LIBRARY), their CPU and CUDA kernels (TORCH_LIBRARY_IMPL), and the
// Python module cem_fast._C, whose import loads them and which says what it was built against (build_info).
// Fake (shape) kernels are registered in Python: cem_fast/_extension.py.
#include <torch/extension.h>
#include <torch/library.h>

#include "checks.h"
#include "ops.h"

// CEM_FAST_BUILD_TORCH / CEM_FAST_BUILD_TORCH_CUDA: written by setup.py for the torch it builds against
#if __has_include("cem_fast_build_info.h")
#include "cem_fast_build_info.h"
#else
#define CEM_FAST_BUILD_TORCH "unknown (built without setup.py)"
#define CEM_FAST_BUILD_TORCH_CUDA ""
#endif

namespace {

// The functional intervene on any device: a new (K, C, wh, ww) float32 tensor written by that device's out kernel.
template <auto IntoOut>
at::Tensor intervene_new(const at::Tensor& base, const at::Tensor& patches, const at::Tensor& patch_idx,
                         const at::Tensor& origins, const at::Tensor& sizes, const std::optional<at::Tensor>& ids,
                         int64_t seed, double noise_sigma, const std::optional<at::Tensor>& rain,
                         const std::optional<at::Tensor>& window_origins, at::OptionalIntArrayRef window_size) {
  const cem::InterveneArgs a = cem::intervene_args(base, patches, patch_idx, origins, sizes, ids, noise_sigma, rain,
                                                   window_origins, window_size);
  at::Tensor out = at::empty({a.K, a.C, a.wh, a.ww}, base.options());
  return IntoOut(base, patches, patch_idx, origins, sizes, ids, seed, noise_sigma, rain, window_origins, window_size,
                 out);
}

// intervene_into: the buffer comes sixth in its schema and nothing is returned
template <auto IntoOut>
void intervene_into(const at::Tensor& base, const at::Tensor& patches, const at::Tensor& patch_idx,
                    const at::Tensor& origins, const at::Tensor& sizes, at::Tensor& buffer,
                    const std::optional<at::Tensor>& ids, int64_t seed, double noise_sigma,
                    const std::optional<at::Tensor>& rain, const std::optional<at::Tensor>& window_origins,
                    at::OptionalIntArrayRef window_size) {
  IntoOut(base, patches, patch_idx, origins, sizes, ids, seed, noise_sigma, rain, window_origins, window_size, buffer);
}

}  // namespace

#define CEM_INTERVENE_INPUTS "Tensor base, Tensor patches, Tensor patch_idx, Tensor origins, Tensor sizes, "
#define CEM_INTERVENE_OPTIONS                                                      \
  "Tensor? ids=None, int seed=0, float noise_sigma=0., Tensor? rain=None, " \
  "Tensor? window_origins=None, int[]? window_size=None"
#define CEM_INTERVENE_ARGS CEM_INTERVENE_INPUTS CEM_INTERVENE_OPTIONS
// the buffer sixth, as in the Triton operator (Python-defined operators cannot take keyword-only tensors)
#define CEM_INTO_ARGS CEM_INTERVENE_INPUTS "Tensor(a!) buffer, " CEM_INTERVENE_OPTIONS

TORCH_LIBRARY(cem_fast, m) {
  // where torch looks for the fake kernels when an op is traced before cem_fast.ops was imported
  m.set_python_module("cem_fast._extension");
  const std::vector<at::Tag> compliant{at::Tag::pt2_compliant_tag};
  m.def("intervene(" CEM_INTERVENE_ARGS ") -> Tensor", compliant);
  // intervene_into: the estimator's reused (channels-last) batch buffer, written in place (every element). Not an
  // "out" overload: torch.compile refuses an op argument named out that is not contiguous, and with Tag.out inductor
  // lowers intervene to it passing its defaulted arguments twice (torch 2.13).
  m.def("intervene_into(" CEM_INTO_ARGS ") -> ()", compliant);
  m.def("roi_sq_err(Tensor outputs, Tensor target, int y, int x) -> Tensor", compliant);
  m.def("roi_sq_err_multi(Tensor outputs, Tensor target, Tensor rois) -> Tensor", compliant);
}

TORCH_LIBRARY_IMPL(cem_fast, CPU, m) {
  m.impl("intervene", &intervene_new<&cem::intervene_out_cpu>);
  m.impl("intervene_into", &intervene_into<&cem::intervene_out_cpu>);
  m.impl("roi_sq_err", &cem::roi_sq_err_cpu);
  m.impl("roi_sq_err_multi", &cem::roi_sq_err_multi_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(cem_fast, CUDA, m) {
  m.impl("intervene", &intervene_new<&cem::intervene_out_cuda>);
  m.impl("intervene_into", &intervene_into<&cem::intervene_out_cuda>);
  m.impl("roi_sq_err", &cem::roi_sq_err_cuda);
  m.impl("roi_sq_err_multi", &cem::roi_sq_err_multi_cuda);
}
#endif

namespace cem {
void register_folder_stat(pybind11::module_& m);  // folder_stat.cpp
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  cem::register_folder_stat(m);
  m.def(
      "set_trusted_indices",
      [](bool on) {
        const bool was = cem::trusted_indices();
        cem::trusted_indices() = on;
        return was;
      },
      "while true (this thread), the CUDA operators skip their host-side value checks; returns the previous value");
  m.def(
      "build_info",
      [] {
        pybind11::dict info;
        info["torch"] = CEM_FAST_BUILD_TORCH;
        info["torch_cuda"] = std::string(CEM_FAST_BUILD_TORCH_CUDA);  // "" for a CPU torch
#ifdef WITH_CUDA
        info["cuda_kernels"] = true;
#else
        info["cuda_kernels"] = false;
#endif
        return info;
      },
      "the torch version (and its CUDA version) this extension was built against, and whether it has CUDA kernels");
}
