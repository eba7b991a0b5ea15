// Argument checks shared by the cem_fast ops (C++ and CUDA); every message echoes the value it refuses.
// The ops are public (torch.ops.cem_fast.*), so shapes and dtypes are checked here, not only in Python.
#pragma once
#include <torch/extension.h>

#include <cmath>
#include <optional>

// Refusals of an argument are ValueErrors in Python (TORCH_CHECK_VALUE), like those of the fake kernels.
#define CEM_CHECK_DIM(t, d) \
  TORCH_CHECK_VALUE((t).dim() == (d), #t " must have " #d " dimensions, got ", (t).dim(), " (shape ", (t).sizes(), ")")
#define CEM_CHECK_DTYPE(t, dt) \
  TORCH_CHECK_VALUE((t).scalar_type() == (dt), #t " must be " #dt ", got ", (t).scalar_type())
#define CEM_CHECK_CPU(t) TORCH_CHECK_VALUE((t).device().is_cpu(), #t " must be a CPU tensor, got ", (t).device())
#define CEM_CHECK_CUDA(t) TORCH_CHECK_VALUE((t).is_cuda(), #t " must be a CUDA tensor, got ", (t).device())
// a host pointer read on the device is an illegal memory access: every tensor on the anchor's device
#define CEM_CHECK_SAME_DEVICE(t, anchor)                                                                 \
  TORCH_CHECK_VALUE((t).device() == (anchor).device(), #t " must be on ", (anchor).device(), " like " #anchor \
                    ", got ", (t).device())
#define CEM_CHECK_SHAPE(t, ...)                                                                \
  TORCH_CHECK_VALUE((t).sizes() == at::IntArrayRef({__VA_ARGS__}), #t " must have shape ", \
                    at::IntArrayRef({__VA_ARGS__}), ", got ", (t).sizes())

namespace cem {

// The intervene arguments after their checks: absent tensors are undefined, the window defaults to the input.
struct InterveneArgs {
  at::Tensor ids, rain, windows;  // windows: (K, 2) int64, zeros when no crop was asked for
  int64_t sigma_q = 0;            // noise sigma in 1/256 grey levels; 0: no noise
  int64_t K = 0, C = 0, h = 0, w = 0, pb = 0, wh = 0, ww = 0;
  bool noisy() const { return sigma_q > 0; }
  bool rainy() const { return rain.defined(); }
};

// Set (per thread) while the pipeline, which builds its indices itself, calls the operators through
// cem_fast/ops.py's *_unchecked paths (cem_fast._C.set_trusted_indices): the CUDA operators then skip the host-side
// checks of index and target values, each of which would be a host synchronisation. CPU checks always run.
inline bool& trusted_indices() {
  static thread_local bool trusted = false;
  return trusted;
}

constexpr double kMaxNoiseSigma = 4096.0;  // cem_fast/op_checks.py: MAX_NOISE_SIGMA

// lo <= v and v + size <= extent without computing v + size (no signed overflow for any int64 v): size and extent
// are known non-negative, so extent - size cannot overflow
inline bool span_inside(int64_t v, int64_t size, int64_t extent) {
  return size >= 0 && size <= extent && v >= 0 && v <= extent - size;
}

// sigma in 1/256 steps, rounded half to even like Python's round(sigma * 256) (the product is exact in double)
inline int64_t noise_sigma_units(double sigma) { return static_cast<int64_t>(std::nearbyint(sigma * 256.0)); }

// Shapes and dtypes of intervene's arguments (see cem_fast/reference.py::intervene_ref); devices and index
// values are checked by each backend (the CPU one can read indices, the CUDA one would have to wait for them).
inline InterveneArgs intervene_args(const at::Tensor& base, const at::Tensor& patches, const at::Tensor& patch_idx,
                                    const at::Tensor& origins, const at::Tensor& sizes,
                                    const std::optional<at::Tensor>& ids, double noise_sigma,
                                    const std::optional<at::Tensor>& rain,
                                    const std::optional<at::Tensor>& window_origins,
                                    at::OptionalIntArrayRef window_size) {
  InterveneArgs a;
  CEM_CHECK_DIM(base, 3);
  CEM_CHECK_DTYPE(base, at::kFloat);
  CEM_CHECK_DIM(patches, 4);
  CEM_CHECK_DTYPE(patches, at::kByte);
  CEM_CHECK_DIM(patch_idx, 1);
  CEM_CHECK_DTYPE(patch_idx, at::kLong);
  a.K = patch_idx.size(0), a.C = base.size(0), a.h = base.size(1), a.w = base.size(2), a.pb = patches.size(3);
  TORCH_CHECK_VALUE(patches.size(1) == a.C && patches.size(2) == a.pb, "patches must be (P, ", a.C, ", pb, pb) for a ",
                    a.C, "-channel base, got ", patches.sizes());
  CEM_CHECK_SHAPE(origins, a.K, 2);
  CEM_CHECK_DTYPE(origins, at::kLong);
  CEM_CHECK_SHAPE(sizes, a.K, 2);
  CEM_CHECK_DTYPE(sizes, at::kLong);
  // finite and bounded: sigma in 1/256 steps times the noise's range must stay inside int64 (an infinite sigma
  // would be an undefined cast)
  TORCH_CHECK_VALUE(std::isfinite(noise_sigma) && noise_sigma >= 0.0 && noise_sigma <= kMaxNoiseSigma,
                    "noise_sigma must be a finite number in [0, ", kMaxNoiseSigma, "], got ", noise_sigma);
  TORCH_CHECK_VALUE(noise_sigma <= 0 || ids.has_value(), "ids are required when noise_sigma > 0 (they key the noise "
                    "RNG), got noise_sigma ", noise_sigma, " and no ids");
  a.sigma_q = noise_sigma > 0 ? noise_sigma_units(noise_sigma) : 0;
  if (a.noisy()) {
    a.ids = *ids;
    TORCH_CHECK_VALUE(a.ids.dim() == 1 && a.ids.size(0) == a.K, "ids must give one id per intervention: shape (", a.K,
                      "), got ", a.ids.sizes());
    CEM_CHECK_DTYPE(a.ids, at::kLong);
  }
  if (rain.has_value()) {
    a.rain = *rain;
    CEM_CHECK_SHAPE(a.rain, a.C, a.h, a.w);
    CEM_CHECK_DTYPE(a.rain, at::kFloat);
  }
  a.wh = a.h, a.ww = a.w;
  if (window_size.has_value()) {
    TORCH_CHECK_VALUE(window_size->size() == 2, "window_size must be (wh, ww), got ", *window_size);
    a.wh = (*window_size)[0], a.ww = (*window_size)[1];
    TORCH_CHECK_VALUE(a.wh >= 0 && a.ww >= 0 && a.wh <= a.h && a.ww <= a.w, "window_size ", *window_size,
                      " must fit in the ", a.h, "x", a.w, " base");
  }
  if (window_origins.has_value()) {
    a.windows = *window_origins;
    CEM_CHECK_SHAPE(a.windows, a.K, 2);
    CEM_CHECK_DTYPE(a.windows, at::kLong);
  } else {
    a.windows = at::zeros({a.K, 2}, patch_idx.options());
  }
  return a;
}

inline void check_intervene_out(const at::Tensor& out, const InterveneArgs& a) {
  CEM_CHECK_SHAPE(out, a.K, a.C, a.wh, a.ww);
  TORCH_CHECK_VALUE(at::isFloatingType(out.scalar_type()), "out must be a floating-point tensor, got ",
                    out.scalar_type());
}

// ROI arguments shared by the CPU and CUDA reductions: (K, C, H, W) outputs, a (C, h, w) target.
inline void check_roi_inputs(const at::Tensor& outputs, const at::Tensor& target) {
  CEM_CHECK_DIM(outputs, 4);
  CEM_CHECK_DIM(target, 3);
  TORCH_CHECK_VALUE(at::isFloatingType(outputs.scalar_type()), "outputs must be floating point, got ",
                    outputs.scalar_type());
  TORCH_CHECK_VALUE(target.size(0) == outputs.size(1), "target must have the outputs' ", outputs.size(1),
                    " channels, got ", target.sizes());
}

// Target values on the uint8 grid, as every backend's arithmetic assumes (one host read of three numbers).
inline void check_target_values(const at::Tensor& target) {
  if (target.numel() == 0 || (target.is_cuda() && trusted_indices())) return;
  const at::Tensor t = target.to(at::kDouble);
  const at::Tensor stats = at::stack({t.min(), t.max(), (t != t.floor()).any().to(at::kDouble)}).cpu();
  const double lo = stats[0].item<double>(), hi = stats[1].item<double>();
  const bool fractional = stats[2].item<double>() != 0.0;
  TORCH_CHECK_VALUE(lo >= 0.0 && hi <= 255.0 && !fractional, "target must hold integers 0..255, got values in [", lo,
                    ", ", hi, "]", fractional ? " with fractions" : "");
}

inline void check_one_roi(const at::Tensor& outputs, const at::Tensor& target, int64_t y, int64_t x) {
  check_roi_inputs(outputs, target);
  TORCH_CHECK_VALUE(target.size(1) > 0 && target.size(2) > 0 && span_inside(y, target.size(1), outputs.size(2)) &&
                        span_inside(x, target.size(2), outputs.size(3)),
                    "roi (", y, ", ", x, ", ", target.size(1), "x", target.size(2), ") must lie inside the ",
                    outputs.size(2), "x", outputs.size(3), " outputs");
  check_target_values(target);
}

inline void check_many_rois(const at::Tensor& outputs, const at::Tensor& target, const at::Tensor& rois) {
  check_roi_inputs(outputs, target);
  TORCH_CHECK_VALUE(rois.dim() == 2 && rois.size(1) == 4, "rois must be (n, 4) (y, x, h, w), got ", rois.sizes());
  CEM_CHECK_DTYPE(rois, at::kLong);
  TORCH_CHECK_VALUE(target.size(1) == outputs.size(2) && target.size(2) == outputs.size(3),
                    "target must be (C, H, W) of the outputs' size, got ", target.sizes(), " for ", outputs.sizes());
  check_target_values(target);
}

// Index values the kernels trust, read on the host (CPU tensors: the CUDA operator passes host copies): the patch of
// each intervention, block sizes within a patch, blocks and windows inside the base. Overflow-proof (span_inside),
// so an origin near 2^63 is refused instead of wrapping past the check.
inline void check_intervene_indices(int64_t P, const at::Tensor& patch_idx, const at::Tensor& origins,
                                    const at::Tensor& sizes, const at::Tensor& windows, const InterveneArgs& a) {
  const auto idx = patch_idx.accessor<int64_t, 1>();
  const auto org = origins.accessor<int64_t, 2>();
  const auto sz = sizes.accessor<int64_t, 2>();
  const auto win = windows.accessor<int64_t, 2>();
  for (int64_t k = 0; k < a.K; ++k) {
    TORCH_CHECK_VALUE(idx[k] >= 0 && idx[k] < P, "patch_idx[", k, "] = ", idx[k], " is not a patch of the ", P,
                      "-patch bank");
    TORCH_CHECK_VALUE(sz[k][0] >= 0 && sz[k][0] <= a.pb && sz[k][1] >= 0 && sz[k][1] <= a.pb, "sizes[", k, "] = (",
                      sz[k][0], ", ", sz[k][1], ") must lie within the ", a.pb, "x", a.pb, " patches");
    TORCH_CHECK_VALUE(span_inside(org[k][0], sz[k][0], a.h) && span_inside(org[k][1], sz[k][1], a.w), "origins[", k,
                      "] = (", org[k][0], ", ", org[k][1], ") with size (", sz[k][0], ", ", sz[k][1],
                      "): the block must lie inside the ", a.h, "x", a.w, " base");
    TORCH_CHECK_VALUE(span_inside(win[k][0], a.wh, a.h) && span_inside(win[k][1], a.ww, a.w), "window_origins[", k,
                      "] = (", win[k][0], ", ", win[k][1], ") with window ", a.wh, "x", a.ww, " must lie inside the ",
                      a.h, "x", a.w, " base");
  }
}

// Rain values the kernels add to patch values and look up as grey levels: finite and non-negative.
inline void check_rain_values(const at::Tensor& rain) {
  if (rain.numel() == 0) return;
  const bool finite = at::isfinite(rain).all().item<bool>();
  const double lo = rain.min().item<double>();
  TORCH_CHECK_VALUE(finite && lo >= 0.0, "rain must be finite and non-negative (0..255 units), got a minimum of ", lo,
                    finite ? "" : " and non-finite values");
}

// An (n, 4) ROI table (host copy) inside the outputs, overflow-proof.
inline void check_rois_table(const at::Tensor& rois, int64_t H, int64_t W) {
  const auto r = rois.accessor<int64_t, 2>();
  for (int64_t i = 0; i < rois.size(0); ++i)
    TORCH_CHECK_VALUE(r[i][2] > 0 && r[i][3] > 0 && span_inside(r[i][0], r[i][2], H) && span_inside(r[i][1], r[i][3], W),
                      "roi ", i, " (", r[i][0], ", ", r[i][1], ", ", r[i][2], "x", r[i][3], ") must lie inside the ", H,
                      "x", W, " outputs");
}

}  // namespace cem
