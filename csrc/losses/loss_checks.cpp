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

bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

}  // namespace

LossConfig check_loss_args(const char* op, const at::Tensor& input, const at::Tensor& target,
                           c10::string_view kind, double param, int64_t reduction) {
  LossConfig config{parse_kind(kind), param, static_cast<Reduction>(reduction)};
  TORCH_CHECK(reduction >= 0 && reduction <= 2, op, ": ", reduction,
              " is not a valid value for reduction (0 = none, 1 = mean, 2 = sum)");
  TORCH_CHECK(input.device() == target.device(), op,
              ": expected input and target on the same device, but got input on ",
              input.device(), " and target on ", target.device());
  TORCH_CHECK_NOT_IMPLEMENTED(is_supported_dtype(input.scalar_type()), "\"", op,
                              "\" not implemented for '", input.scalar_type(), "'");
  TORCH_CHECK(input.scalar_type() == target.scalar_type(), op,
              ": expected input and target of the same dtype, but got ", input.scalar_type(),
              " and ", target.scalar_type());
  TORCH_CHECK(input.sizes() == target.sizes(), op,
              ": expected input and target of the same shape (broadcast them first), but got ",
              input.sizes(), " and ", target.sizes());
  if (config.kind == LossKind::SmoothL1) {
    TORCH_CHECK(param >= 0, "smooth_l1_loss does not support negative values for beta.");
    if (param == 0) config.kind = LossKind::L1;
  }
  if (config.kind == LossKind::Huber) {
    TORCH_CHECK(param > 0, "huber_loss does not support non-positive values for delta.");
  }
  return config;
}

double loss_norm(const LossConfig& config, int64_t numel) {
  const double factor = config.kind == LossKind::MSE ? 2.0 : 1.0;
  return config.reduction == Reduction::Mean ? factor / static_cast<double>(numel) : factor;
}

double loss_grad_scale(const LossConfig& config, int64_t numel, double grad_output,
                       at::ScalarType dtype) {
  if (config.kind != LossKind::L1 || config.reduction != Reduction::Mean) return grad_output;
  if (dtype == at::kDouble) return grad_output / static_cast<double>(numel);
  const float divided = static_cast<float>(grad_output) / static_cast<float>(numel);
  if (dtype == at::kHalf) return static_cast<float>(c10::Half(divided));
  if (dtype == at::kBFloat16) return static_cast<float>(c10::BFloat16(divided));
  return divided;
}

}  // namespace fusedmtl::losses
