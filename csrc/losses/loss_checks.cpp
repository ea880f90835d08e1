#include "losses/loss_checks.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace fusedmtl::losses {
namespace {

LossKind parse_kind(c10::string_view kind) {
  if (kind == "l1") return LossKind::L1;
  if (kind == "mse") return LossKind::MSE;
  if (kind == "smooth_l1") return LossKind::SmoothL1;
  if (kind == "huber") return LossKind::Huber;
  TORCH_CHECK(false, "fusedmtl: unknown loss kind '", kind,
              "'; expected one of 'l1', 'mse', 'smooth_l1', 'huber'");
}

// The heteroscedastic losses name their Gaussian form 'l2' (it is 0.5 exp(-s) d^2 + 0.5 s, not the
// mean squared error) and have no Huber form.
LossKind parse_heteroscedastic_kind(c10::string_view kind) {
  if (kind == "l2") return LossKind::MSE;
  if (kind == "l1") return LossKind::L1;
  if (kind == "smooth_l1") return LossKind::SmoothL1;
  TORCH_CHECK(false, "fusedmtl: unknown heteroscedastic loss kind '", kind,
              "'; expected one of 'l2', 'l1', 'smooth_l1'");
}

bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

void check_reduction(const char* op, int64_t reduction) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2, op, ": ", reduction,
              " is not a valid value for reduction (0 = none, 1 = mean, 2 = sum)");
}

// `other` (named `name`) must match input in device, dtype and shape; input's dtype is checked once.
void check_like_input(const char* op, const at::Tensor& input, const at::Tensor& other,
                      const char* name) {
  TORCH_CHECK(input.device() == other.device(), op, ": expected input and ", name,
              " on the same device, but got input on ", input.device(), " and ", name, " on ",
              other.device());
  TORCH_CHECK_NOT_IMPLEMENTED(is_supported_dtype(input.scalar_type()), "\"", op,
                              "\" not implemented for '", input.scalar_type(), "'");
  TORCH_CHECK(input.scalar_type() == other.scalar_type(), op, ": expected input and ", name,
              " of the same dtype, but got ", input.scalar_type(), " and ", other.scalar_type());
  TORCH_CHECK(input.sizes() == other.sizes(), op, ": expected input and ", name,
              " of the same shape (broadcast them first), but got ", input.sizes(), " and ",
              other.sizes());
}

// smooth_l1 with beta == 0 is l1, as torch.nn.functional routes it; a negative beta is an error.
void check_smooth_l1_beta(LossConfig& config, const char* loss_name) {
  if (config.kind != LossKind::SmoothL1) return;
  TORCH_CHECK(config.param >= 0, loss_name, " does not support negative values for beta.");
  if (config.param == 0) config.kind = LossKind::L1;
}

}  // namespace

LossConfig check_loss_args(const char* op, const at::Tensor& input, const at::Tensor& target,
                           c10::string_view kind, double param, int64_t reduction) {
  LossConfig config{parse_kind(kind), param, static_cast<Reduction>(reduction)};
  check_reduction(op, reduction);
  check_like_input(op, input, target, "target");
  check_smooth_l1_beta(config, "smooth_l1_loss");
  if (config.kind == LossKind::Huber) {
    TORCH_CHECK(param > 0, "huber_loss does not support non-positive values for delta.");
  }
  return config;
}

LossConfig check_heteroscedastic_args(const char* op, const at::Tensor& input,
                                      const at::Tensor& target, const at::Tensor& log_var,
                                      c10::string_view kind, double beta, int64_t reduction) {
  LossConfig config{parse_heteroscedastic_kind(kind), beta, static_cast<Reduction>(reduction),
                    /*heteroscedastic=*/true};
  check_reduction(op, reduction);
  check_like_input(op, input, target, "target");
  check_like_input(op, input, log_var, "log_var");
  check_smooth_l1_beta(config, "heteroscedastic_loss");
  return config;
}

double loss_norm(const LossConfig& config, int64_t numel) {
  // the heteroscedastic gradients carry their own factors (heteroscedastic_math.h)
  const double factor = config.kind == LossKind::MSE && !config.heteroscedastic ? 2.0 : 1.0;
  return config.reduction == Reduction::Mean ? factor / static_cast<double>(numel) : factor;
}

double loss_grad_scale(const LossConfig& config, int64_t numel, double grad_output,
                       at::ScalarType dtype) {
  if (config.kind != LossKind::L1 || config.reduction != Reduction::Mean || config.heteroscedastic) {
    return grad_output;
  }
  if (dtype == at::kDouble) return grad_output / static_cast<double>(numel);
  const float divided = static_cast<float>(grad_output) / static_cast<float>(numel);
  if (dtype == at::kHalf) return static_cast<float>(c10::Half(divided));
  if (dtype == at::kBFloat16) return static_cast<float>(c10::BFloat16(divided));
  return divided;
}

}  // namespace fusedmtl::losses
