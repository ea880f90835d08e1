// The loss ops' implementations, one per device; schemas in csrc/torch_bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <tuple>

namespace fusedmtl::losses {

// Forward: the element-wise loss (reduction none) or its mean or sum (a 0-dim tensor).
at::Tensor regression_loss_cpu(const at::Tensor& input, const at::Tensor& target,
                               c10::string_view kind, double param, int64_t reduction);

// Forward fused with the gradients for grad_output == 1, in one pass over input and target:
// (loss, grad_input, grad_target), a gradient not asked for being an empty tensor.
// reduction must be mean or sum.
std::tuple<at::Tensor, at::Tensor, at::Tensor> regression_loss_with_grad_cpu(
    const at::Tensor& input, const at::Tensor& target, c10::string_view kind, double param,
    int64_t reduction, bool input_grad, bool target_grad);

// Backward recomputed from input and target with grad_output folded in: (grad_input, grad_target).
std::tuple<at::Tensor, at::Tensor> regression_loss_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& target,
    c10::string_view kind, double param, int64_t reduction, bool input_grad, bool target_grad);

// The eager CPU fast path (AutogradCPU kernel of regression_loss_eager): the reduced loss, with the
// gradient computed in forward and handed to autograd in backward (loss_autograd_cpu.cpp).
at::Tensor regression_loss_eager_autograd_cpu(const at::Tensor& input, const at::Tensor& target,
                                              c10::string_view kind, double param,
                                              int64_t reduction);
// Heteroscedastic losses (Kendall & Gal 2017, heteroscedastic_math.h). kind: 'l2' | 'l1' |
// 'smooth_l1'; input, target and log_var: same shape and dtype. The gradient w.r.t. target is
// the negated grad_input, which the caller forms.
at::Tensor heteroscedastic_loss_cpu(const at::Tensor& input, const at::Tensor& target,
                                    const at::Tensor& log_var, c10::string_view kind, double beta,
                                    int64_t reduction);
// (loss, grad_input, grad_log_var) for grad_output == 1; reduction must be mean or sum.
std::tuple<at::Tensor, at::Tensor, at::Tensor> heteroscedastic_loss_with_grad_cpu(
    const at::Tensor& input, const at::Tensor& target, const at::Tensor& log_var,
    c10::string_view kind, double beta, int64_t reduction, bool input_grad, bool log_var_grad);
// (grad_input, grad_log_var) with grad_output folded in, in one pass.
std::tuple<at::Tensor, at::Tensor> heteroscedastic_loss_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& target,
    const at::Tensor& log_var, c10::string_view kind, double beta, int64_t reduction,
    bool input_grad, bool log_var_grad);

#ifdef FUSEDMTL_WITH_CUDA
at::Tensor regression_loss_cuda(const at::Tensor& input, const at::Tensor& target,
                                c10::string_view kind, double param, int64_t reduction);
std::tuple<at::Tensor, at::Tensor, at::Tensor> regression_loss_with_grad_cuda(
    const at::Tensor& input, const at::Tensor& target, c10::string_view kind, double param,
    int64_t reduction, bool input_grad, bool target_grad);
std::tuple<at::Tensor, at::Tensor> regression_loss_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& target,
    c10::string_view kind, double param, int64_t reduction, bool input_grad, bool target_grad);
at::Tensor heteroscedastic_loss_cuda(const at::Tensor& input, const at::Tensor& target,
                                     const at::Tensor& log_var, c10::string_view kind, double beta,
                                     int64_t reduction);
std::tuple<at::Tensor, at::Tensor, at::Tensor> heteroscedastic_loss_with_grad_cuda(
    const at::Tensor& input, const at::Tensor& target, const at::Tensor& log_var,
    c10::string_view kind, double beta, int64_t reduction, bool input_grad, bool log_var_grad);
std::tuple<at::Tensor, at::Tensor> heteroscedastic_loss_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& target,
    const at::Tensor& log_var, c10::string_view kind, double beta, int64_t reduction,
    bool input_grad, bool log_var_grad);
#endif

}  // namespace fusedmtl::losses
