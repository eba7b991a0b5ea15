// Argument checks shared by the cem_fast ops; messages echo the bad value (validation of meaning lives in Python).
#pragma once
#include <torch/extension.h>

#define CEM_CHECK_DIM(t, d) \
  TORCH_CHECK((t).dim() == (d), #t " must have " #d " dimensions, got ", (t).dim(), " (shape ", (t).sizes(), ")")
#define CEM_CHECK_DTYPE(t, dt) \
  TORCH_CHECK((t).scalar_type() == (dt), #t " must be " #dt ", got ", (t).scalar_type())
#define CEM_CHECK_CPU(t) TORCH_CHECK((t).device().is_cpu(), #t " must be a CPU tensor, got ", (t).device())
