// The eager CPU fast path of the loss ops as a C++ autograd function: the gradient is computed in
// the forward pass (regression_loss_with_grad, 3N elements moved) and handed to autograd in
// backward without a copy. In C++ because at 1M elements the Python autograd.Function around the
// kernel cost a fifth of the step: its interpreter work runs on caches the kernel just flushed.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include "losses/loss_checks.h"
#include "losses/losses.h"

namespace fusedmtl::losses {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// grad_output != 1 may scale the precomputed gradient in place only where that is bitwise torch's
// result (float32/float64; torch's half-precision kernels round intermediate products):
// - mse, smooth_l1 and huber: torch's vectorized kernels multiply by grad_output last;
// - l1: torch's gradient is sign(d) * (grad_output / N), ours at grad_output 1 is sign(d) * (1 / N):
//   the same after scaling when 1 / N is exact, i.e. for reduction sum or N a power of two.
bool scales_exactly(at::ScalarType dtype, LossKind kind, Reduction reduction, int64_t numel) {
  if (dtype != at::kFloat && dtype != at::kDouble) return false;
  if (kind != LossKind::L1) return true;
  const bool power_of_two = numel > 0 && (numel & (numel - 1)) == 0;
  return reduction == Reduction::Sum || power_of_two;
}

at::Tensor take(AutogradContext* ctx, const char* key) {
  auto entry = ctx->saved_data.find(key);
  if (entry == ctx->saved_data.end()) return {};
  at::Tensor tensor = std::move(entry->second).toTensor();
  ctx->saved_data.erase(entry);
  return tensor;
}

class RegressionLossWithGrad : public torch::autograd::Function<RegressionLossWithGrad> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& target,
                            const std::string& kind, double param, int64_t reduction) {
    const bool input_grad = input.requires_grad();
    const bool target_grad = target.requires_grad();
    // Through the dispatcher, so that dispatch modes (profilers, op recorders) see the kernel.
    static const auto with_grad =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("fusedmtl::regression_loss_with_grad", "")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                const at::Tensor&, const at::Tensor&, c10::string_view, double, int64_t, bool,
                bool)>();
    auto [loss, grad_input, grad_target] =
        with_grad.call(input, target, kind, param, reduction, input_grad, target_grad);
    ctx->save_for_backward({input, target});
    ctx->saved_data["kind"] = kind;
    ctx->saved_data["param"] = param;
    ctx->saved_data["reduction"] = reduction;
    if (input_grad) ctx->saved_data["grad_input"] = std::move(grad_input);
    if (target_grad) ctx->saved_data["grad_target"] = std::move(grad_target);
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor& grad_output = grad_outputs[0];
    // Dropping our references first lets autograd adopt the buffers as .grad without a copy.
    at::Tensor grad_input = take(ctx, "grad_input");
    at::Tensor grad_target = take(ctx, "grad_target");
    const std::string kind = ctx->saved_data["kind"].toStringRef();
    const double param = ctx->saved_data["param"].toDouble();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& target = saved[1];
    const bool input_grad = ctx->needs_input_grad(0);
    const bool target_grad = ctx->needs_input_grad(1);
    const double scale = grad_output.item<double>();  // a CPU scalar: no synchronisation
    const bool precomputed = grad_input.defined() || grad_target.defined();

    if (at::GradMode::is_enabled()) {
      // create_graph=True: differentiate the registered op, whose backward runs the
      // differentiable reference formula, so double backward gives torch's results.
      grad_input.reset();
      grad_target.reset();
      static const auto regression_loss =
          c10::Dispatcher::singleton()
              .findSchemaOrThrow("fusedmtl::regression_loss", "")
              .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, double,
                                int64_t)>();
      at::Tensor loss = regression_loss.call(input, target, kind, param, reduction);
      return differentiable_grads(loss, grad_output, input, target, input_grad, target_grad);
    }
    const LossConfig config = check_loss_args("fusedmtl::regression_loss_eager", input, target,
                                              kind, param, reduction);
    if (!precomputed || (scale != 1.0 && !scales_exactly(input.scalar_type(), config.kind,
                                                          config.reduction, input.numel()))) {
      grad_input.reset();  // back to the buffer cache before the recomputation allocates
      grad_target.reset();
      static const auto recompute =
          c10::Dispatcher::singleton()
              .findSchemaOrThrow("fusedmtl::regression_loss_backward", "")
              .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                        const at::Tensor&, c10::string_view,
                                                        double, int64_t, bool, bool)>();
      std::tie(grad_input, grad_target) = recompute.call(grad_output, input, target, kind, param,
                                                         reduction, input_grad, target_grad);
    } else if (scale != 1.0) {
      if (grad_input.defined()) grad_input.mul_(scale);
      if (grad_target.defined()) grad_target.mul_(scale);
    }
    return {input_grad ? std::move(grad_input) : at::Tensor(),
            target_grad ? std::move(grad_target) : at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }

 private:
  static variable_list differentiable_grads(const at::Tensor& loss, const at::Tensor& grad_output,
                                            const at::Tensor& input, const at::Tensor& target,
                                            bool input_grad, bool target_grad) {
    variable_list inputs;
    if (input_grad) inputs.push_back(input);
    if (target_grad) inputs.push_back(target);
    variable_list grads = torch::autograd::grad({loss}, inputs, {grad_output},
                                                /*retain_graph=*/true, /*create_graph=*/true,
                                                /*allow_unused=*/true);
    at::Tensor grad_input = input_grad ? grads[0] : at::Tensor();
    at::Tensor grad_target = target_grad ? grads[input_grad ? 1 : 0] : at::Tensor();
    return {grad_input, grad_target, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor regression_loss_eager_autograd_cpu(const at::Tensor& input, const at::Tensor& target,
                                              c10::string_view kind, double param,
                                              int64_t reduction) {
  return RegressionLossWithGrad::apply(input, target, std::string(kind), param, reduction);
}

}  // namespace fusedmtl::losses
