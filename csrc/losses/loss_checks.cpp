#include "losses/loss_checks.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <string_view>

namespace fusedmtl::losses {
namespace {

// The kind names as torch would list them: 'l1', 'mse', ...
#define FUSEDMTL_KIND_NAME(name, str, ...) "'" str "', "
constexpr const char* kRegressionNames = FUSEDMTL_REGRESSION_KINDS(FUSEDMTL_KIND_NAME);
constexpr const char* kHeteroscedasticNames = FUSEDMTL_HETEROSCEDASTIC_KINDS(FUSEDMTL_KIND_NAME);
#undef FUSEDMTL_KIND_NAME

// The names end with ", ": the message drops it.
std::string_view listed(const char* names) {
  std::string_view view(names);
  return view.substr(0, view.size() - 2);
}

LossKind parse_kind(c10::string_view kind) {
#define FUSEDMTL_KIND_PARSE(name, str, ...) \
  if (kind == str) return LossKind::name;
  FUSEDMTL_REGRESSION_KINDS(FUSEDMTL_KIND_PARSE)
  TORCH_CHECK(false, "fusedmtl: unknown loss kind '", kind, "'; expected one of ",
              listed(kRegressionNames));
}

LossKind parse_heteroscedastic_kind(c10::string_view kind) {
  FUSEDMTL_HETEROSCEDASTIC_KINDS(FUSEDMTL_KIND_PARSE)
#undef FUSEDMTL_KIND_PARSE
  TORCH_CHECK(false, "fusedmtl: unknown heteroscedastic loss kind '", kind, "'; expected one of ",
              listed(kHeteroscedasticNames));
}

bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
         dtype == at::kBFloat16;
}

void check_reduction(const char* op, int64_t reduction) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2, op, ": ", reduction,
              " is not a valid value for reduction (0 = none, 1 = mean, 2 = sum)");
}

// `other` (named `name`) must match input in device, dtype and shape; input's dtype is checked
// once.
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

LossOperands regression_operands(const char* op, const at::Tensor& input, const at::Tensor& target,
                                 c10::string_view kind, double param, int64_t reduction) {
  const LossConfig config = check_loss_args(op, input, target, kind, param, reduction);
  return {config, input.contiguous(), target.contiguous(), at::Tensor()};
}

LossOperands heteroscedastic_operands(const char* op, const at::Tensor& input,
                                      const at::Tensor& target, const at::Tensor& log_var,
                                      c10::string_view kind, double beta, int64_t reduction) {
  const LossConfig config =
      check_heteroscedastic_args(op, input, target, log_var, kind, beta, reduction);
  return {config, input.contiguous(), target.contiguous(), log_var.contiguous()};
}

void check_grad_output(const char* op, const LossConfig& config, const at::Tensor& grad_output,
                       const at::Tensor& input) {
  if (config.reduction == Reduction::None) {
    TORCH_CHECK(grad_output.sizes() == input.sizes(), op,
                ": grad_output must have the input's shape ", input.sizes(),
                " for reduction='none', but got ", grad_output.sizes());
  } else {
    TORCH_CHECK(grad_output.numel() == 1, op, ": grad_output must be a scalar for a reduced loss");
  }
}

void check_reduced(const char* op, const LossConfig& config) {
  TORCH_CHECK(config.reduction != Reduction::None, op, ": reduction must be mean or sum");
}

double loss_norm(const LossConfig& config, int64_t numel) {
  // the heteroscedastic gradients carry their own factors (heteroscedastic_math.h)
  const double factor = config.kind == LossKind::MSE && !config.heteroscedastic ? 2.0 : 1.0;
  return config.reduction == Reduction::Mean ? factor / static_cast<double>(numel) : factor;
}

double loss_grad_scale(const LossConfig& config, int64_t numel, double grad_output,
                       at::ScalarType dtype) {
  if (config.kind != LossKind::L1 || config.reduction != Reduction::Mean ||
      config.heteroscedastic) {
    return grad_output;
  }
  if (dtype == at::kDouble) return grad_output / static_cast<double>(numel);
  const float divided = static_cast<float>(grad_output) / static_cast<float>(numel);
  if (dtype == at::kHalf) return static_cast<float>(c10::Half(divided));
  if (dtype == at::kBFloat16) return static_cast<float>(c10::BFloat16(divided));
  return divided;
}

}  // namespace fusedmtl::losses
