// Argument checks shared by every device's implementation of the loss ops, with torch's messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include "losses/loss_math.h"

namespace fusedmtl::losses {

// torch's reduction enum (torch.nn._reduction.get_enum).
enum class Reduction : int64_t { None = 0, Mean = 1, Sum = 2 };

struct LossConfig {
  LossKind kind;
  double param;  // beta or delta
  Reduction reduction;
  bool heteroscedastic = false;  // the heteroscedastic loss of `kind` (heteroscedastic_math.h)
};

// Validates the arguments of a loss op and returns them parsed. smooth_l1 with beta == 0 becomes
// l1, as torch.nn.functional routes it.
LossConfig check_loss_args(const char* op, const at::Tensor& input, const at::Tensor& target,
                           c10::string_view kind, double param, int64_t reduction);

// The same for the heteroscedastic losses: kind 'l2' | 'l1' | 'smooth_l1', and a log_var of the
// input's shape, dtype and device.
LossConfig check_heteroscedastic_args(const char* op, const at::Tensor& input,
                                      const at::Tensor& target, const at::Tensor& log_var,
                                      c10::string_view kind, double beta, int64_t reduction);

// The operands of one loss call: its parsed arguments and its tensors, checked and contiguous
// (log_var is undefined for the regression losses). Every device's host code starts from this.
struct LossOperands {
  LossConfig config;
  at::Tensor input, target, log_var;
};

LossOperands regression_operands(const char* op, const at::Tensor& input, const at::Tensor& target,
                                 c10::string_view kind, double param, int64_t reduction);
LossOperands heteroscedastic_operands(const char* op, const at::Tensor& input,
                                      const at::Tensor& target, const at::Tensor& log_var,
                                      c10::string_view kind, double beta, int64_t reduction);

// A backward op's grad_output: the loss's shape (input's for reduction none, one element else).
void check_grad_output(const char* op, const LossConfig& config, const at::Tensor& grad_output,
                       const at::Tensor& input);
// The ops that compute the gradients in forward take reduction mean or sum only.
void check_reduced(const char* op, const LossConfig& config);

// ATen's "norm" of the backward kernels and the grad_output scale, see LossParams.
double loss_norm(const LossConfig& config, int64_t numel);
// grad_output as the kernels take it: for L1 with reduction='mean' divided by N in `dtype`, the
// way autograd's mean backward divides it before sign(d) multiplies it.
double loss_grad_scale(const LossConfig& config, int64_t numel, double grad_output,
                       at::ScalarType dtype);

}  // namespace fusedmtl::losses
