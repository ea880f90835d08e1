// Interface of the per-instruction-set CPU loss kernels (no torch types, see cpu_capability.h).
#pragma once

#include <cstdint>

#include "common/cpu_capability.h"
#include "common/cpu_scalar.h"
#include "losses/heteroscedastic_math.h"
#include "losses/loss_math.h"

namespace fusedmtl::losses::cpu {

// What one call computes. Pointers are to contiguous arrays of `dtype` of the call's numel;
// a null pointer means "not wanted". A log_var makes it the heteroscedastic loss of `kind` (L1,
// MSE for 'l2', or SmoothL1), which writes its input gradient to grad_input only (grad_target
// stays null: the caller negates).
struct LossKernelArgs {
  LossKind kind;
  ScalarKind dtype;
  double param;       // beta or delta
  double norm;        // see LossParams::norm
  double grad_scale;  // see LossParams::grad_scale (1 when the gradient is computed in forward)
  bool reduce;        // return the sum of the losses of [begin, end)
  const void* input;
  const void* target;
  const void* log_var;  // heteroscedastic losses only
  void* loss;           // element-wise loss (reduction='none')
  void* grad_input;
  void* grad_target;
  void* grad_log_var;       // heteroscedastic losses only
  const void* grad_output;  // element-wise grad_output (reduction='none'); else grad_scale is used
};

// Processes elements [begin, end): writes what args asks for and returns the sum of the losses
// when args.reduce (accumulated in the compute type), else 0. The summation order depends only on
// begin and end, so equal block boundaries give bitwise equal results on any thread count.
using LossBlockFn = double(const LossKernelArgs& args, int64_t begin, int64_t end);

}  // namespace fusedmtl::losses::cpu
