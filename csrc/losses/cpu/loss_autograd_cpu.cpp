// The eager CPU fast path of the loss ops as a C++ autograd function: the gradient is computed in
// the forward pass (regression_loss_with_grad, 3N elements moved) and handed to autograd in
// backward without a copy. In C++ because at 1M elements the Python autograd.Function around the
// kernel cost a fifth of the step: its interpreter work runs on caches the kernel just flushed.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <optional>
#include <vector>

#include "losses/loss_checks.h"
#include "losses/losses.h"

namespace fusedmtl::losses {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// grad_output != 1 may scale the precomputed gradient in place only where that is bitwise torch's
// result: float32/float64 (torch's half-precision kernels round intermediate products), and a kind
// that scales exactly at any element count (loss_kinds.h) or an exact 1 / N (reduction sum, or N
// a power of two).
bool scales_exactly(at::ScalarType dtype, LossKind kind, Reduction reduction, int64_t numel) {
  if (dtype != at::kFloat && dtype != at::kDouble) return false;
  if (scales_exactly_at_any_numel(kind)) return true;
  const bool power_of_two = numel > 0 && (numel & (numel - 1)) == 0;
  return reduction == Reduction::Sum || power_of_two;
}

// Whether the gradient at grad_output 1 keeps sign(d): its scale 1 / N (rounded to the dtype for
// reduction mean) is not 0.
bool sign_survives(at::ScalarType dtype, int64_t reduction, int64_t numel) {
  if (reduction != static_cast<int64_t>(Reduction::Mean) || numel == 0) return true;
  const LossConfig l1{LossKind::L1, 0.0, Reduction::Mean};
  return loss_grad_scale(l1, numel, 1.0, dtype) != 0.0;
}

// grad_output's value when it is a plain CPU scalar, which is a load from memory and no device
// synchronisation; nullopt under a torch.func transform (vmap of the backward, as
// autograd.grad(is_grads_batched=True) and jacobian(vectorize=True) run it), whose wrapped tensors
// have no value to read: backward then recomputes through the dispatcher, which batches.
std::optional<double> plain_scalar(const at::Tensor& grad_output) {
  constexpr c10::DispatchKeySet kWrapped({c10::DispatchKey::Batched,  // autograd's own vmap
                                          c10::DispatchKey::FuncTorchBatched,
                                          c10::DispatchKey::FuncTorchGradWrapper,
                                          c10::DispatchKey::Python});
  if (grad_output.key_set().has_any(kWrapped) || !grad_output.is_cpu()) return std::nullopt;
  return grad_output.item<double>();
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
    static const auto with_grad = c10::Dispatcher::singleton()
                                      .findSchemaOrThrow("fusedmtl::regression_loss_with_grad", "")
                                      .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                          const at::Tensor&, const at::Tensor&, c10::string_view,
                                          double, int64_t, bool, bool)>();
    auto [loss, grad_input, grad_target] =
        with_grad.call(input, target, kind, param, reduction, input_grad, target_grad);
    // L1's gradient is sign(d) * (grad_output / N) and sign(d) is the sign of the gradient computed
    // at grad_output 1 whenever 1 / N does not round to 0: backward needs neither input nor
    // target then, so that, as in torch (whose l1_loss saves d), editing them in place after
    // forward is no error. They are kept unversioned for a second backward (retain_graph=True,
    // after autograd adopted the buffers), which checks that they were not modified.
    // (not while tracing with symbolic shapes: the element count is not known there)
    const bool from_sign = (kind == "l1" || (kind == "smooth_l1" && param == 0.0)) &&
                           (input_grad || target_grad) &&
                           !input.unsafeGetTensorImpl()->has_symbolic_sizes_strides() &&
                           sign_survives(input.scalar_type(), reduction, input.numel());
    if (from_sign) {
      ctx->saved_data["input"] = input;
      ctx->saved_data["target"] = target;
      ctx->saved_data["versions"] = std::vector<int64_t>{static_cast<int64_t>(input._version()),
                                                         static_cast<int64_t>(target._version())};
    } else {
      ctx->save_for_backward({input, target});
    }
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
    const bool from_sign = ctx->saved_data.count("versions") != 0;
    at::Tensor input, target;
    if (from_sign) {
      input = ctx->saved_data["input"].toTensor();
      target = ctx->saved_data["target"].toTensor();
    } else {
      const variable_list saved = ctx->get_saved_variables();
      input = saved[0];
      target = saved[1];
    }
    const bool input_grad = ctx->needs_input_grad(0);
    const bool target_grad = ctx->needs_input_grad(1);
    const bool precomputed = grad_input.defined() || grad_target.defined();

    // Double backward (grad mode) differentiates through input and target, below.
    if (from_sign && precomputed && !at::GradMode::is_enabled()) {
      const std::optional<double> scale = plain_scalar(grad_output);
      if (scale && *scale != 1.0 &&
          scales_exactly(input.scalar_type(), LossKind::L1, static_cast<Reduction>(reduction),
                         input.numel())) {
        if (grad_input.defined()) grad_input.mul_(*scale);
        if (grad_target.defined()) grad_target.mul_(*scale);
      } else if (!scale || *scale != 1.0) {
        // torch's order: autograd's mean backward divides grad_output by N in its dtype, then the
        // sign multiplies it. Tensor operations only: batched under vmap, with no read of
        // grad_output's value.
        const at::Tensor sign = grad_input.defined() ? grad_input.sign() : grad_target.sign().neg();
        const at::Tensor scaled = reduction == static_cast<int64_t>(Reduction::Mean)
                                      ? grad_output.div(c10::Scalar(input.numel()))
                                      : grad_output;
        at::Tensor grad = scaled.mul(sign);
        return {input_grad ? grad : at::Tensor(), target_grad ? grad.neg() : at::Tensor(),
                at::Tensor(), at::Tensor(), at::Tensor()};
      }
      return {input_grad ? std::move(grad_input) : at::Tensor(),
              target_grad ? std::move(grad_target) : at::Tensor(), at::Tensor(), at::Tensor(),
              at::Tensor()};
    }
    if (from_sign) {
      const std::vector<int64_t> versions = ctx->saved_data["versions"].toIntVector();
      TORCH_CHECK(
          static_cast<int64_t>(input._version()) == versions[0] &&
              static_cast<int64_t>(target._version()) == versions[1],
          "one of the variables needed for gradient computation has been modified by an "
          "inplace operation: the input or target of a fusedmtl l1_loss, before a double or "
          "second backward through it (create_graph or retain_graph)");
    }

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
    const LossConfig config =
        check_loss_args("fusedmtl::regression_loss_eager", input, target, kind, param, reduction);
    const std::optional<double> scale = plain_scalar(grad_output);
    if (!precomputed || !scale ||
        (*scale != 1.0 &&
         !scales_exactly(input.scalar_type(), config.kind, config.reduction, input.numel()))) {
      grad_input.reset();  // back to the buffer cache before the recomputation allocates
      grad_target.reset();
      static const auto recompute = c10::Dispatcher::singleton()
                                        .findSchemaOrThrow("fusedmtl::regression_loss_backward", "")
                                        .typed<std::tuple<at::Tensor, at::Tensor>(
                                            const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            c10::string_view, double, int64_t, bool, bool)>();
      std::tie(grad_input, grad_target) = recompute.call(grad_output, input, target, kind, param,
                                                         reduction, input_grad, target_grad);
    } else if (*scale != 1.0) {
      if (grad_input.defined()) grad_input.mul_(*scale);
      if (grad_target.defined()) grad_target.mul_(*scale);
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
