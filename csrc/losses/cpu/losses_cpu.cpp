// CPU implementations of the loss ops: argument checks, allocation and threading around the
// per-instruction-set kernels of loss_kernels.cpp.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/SmallVector.h>

#include "common/tensor_utils.h"
#include "losses/cpu/loss_kernels.h"
#include "losses/loss_checks.h"
#include "losses/losses.h"

FUSEDMTL_CPU_KERNEL(fusedmtl::losses::cpu, loss_block, ::fusedmtl::losses::cpu::LossBlockFn)

namespace fusedmtl::losses {
namespace {

// Reductions sum fixed blocks of kBlock elements independently and add the block sums in order,
// so a result does not depend on how many threads ran the blocks.
constexpr int64_t kBlock = 16384;
// Fewer elements than this run on the calling thread: waking threads costs more than they save.
constexpr int64_t kGrainBlocks = 4;

cpu::LossKernelArgs kernel_args(const LossOperands& op) {
  cpu::LossKernelArgs args{};
  args.kind = op.config.kind;
  args.dtype = scalar_kind(op.input.scalar_type());
  args.param = op.config.param;
  args.norm = loss_norm(op.config, op.input.numel());
  args.grad_scale = 1.0;
  args.input = op.input.const_data_ptr();
  args.target = op.target.const_data_ptr();
  if (op.log_var.defined()) args.log_var = op.log_var.const_data_ptr();
  return args;
}

// Runs the kernel over all n elements; returns the sum of the losses when args.reduce.
double run_loss_kernel(const cpu::LossKernelArgs& args, int64_t n) {
  auto* kernel = cpu::loss_block_kernel.get();
  const int64_t num_blocks = (n + kBlock - 1) / kBlock;
  if (!args.reduce) {
    at::parallel_for(0, num_blocks, kGrainBlocks, [&](int64_t first, int64_t last) {
      kernel(args, first * kBlock, std::min(n, last * kBlock));
    });
    return 0.0;
  }
  c10::SmallVector<double, 64> block_sums(num_blocks);
  at::parallel_for(0, num_blocks, kGrainBlocks, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      block_sums[b] = kernel(args, b * kBlock, std::min(n, (b + 1) * kBlock));
    }
  });
  double total = 0.0;
  for (double s : block_sums) total += s;
  return total;
}

at::Tensor reduced_loss(const LossConfig& config, double total, int64_t n, const at::Tensor& like) {
  // mean of an empty tensor is 0 / 0 = nan, as in torch.
  const double value = config.reduction == Reduction::Mean ? total / static_cast<double>(n) : total;
  return at::scalar_tensor(value, like.options());
}

at::Tensor empty_gradient(const at::Tensor& like) { return at::empty({0}, like.options()); }

// The gradient besides the input's: the target's (regression losses) or log_var's
// (heteroscedastic losses, whose target gradient is the negated input gradient).
void*& second_grad_slot(const LossOperands& op, cpu::LossKernelArgs& args) {
  return op.log_var.defined() ? args.grad_log_var : args.grad_target;
}

// Forward of any loss op: the element-wise loss or its mean or sum.
at::Tensor loss_forward(const LossOperands& op) {
  cpu::LossKernelArgs args = kernel_args(op);
  const at::Tensor& input = op.input;
  if (op.config.reduction == Reduction::None) {
    at::Tensor loss = empty_for_overwrite(input);
    args.loss = loss.mutable_data_ptr();
    run_loss_kernel(args, input.numel());
    return loss;
  }
  args.reduce = true;
  return reduced_loss(op.config, run_loss_kernel(args, input.numel()), input.numel(), input);
}

// Forward fused with the gradients for grad_output == 1: (loss, grad_input, second gradient).
std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_forward_with_grad(const char* name,
                                                                      const LossOperands& op,
                                                                      bool input_grad,
                                                                      bool second_grad) {
  check_reduced(name, op.config);
  cpu::LossKernelArgs args = kernel_args(op);
  const at::Tensor& input = op.input;
  args.reduce = true;
  args.grad_scale = loss_grad_scale(op.config, input.numel(), 1.0, input.scalar_type());
  at::Tensor grad_input = input_grad ? empty_for_overwrite(input) : empty_gradient(input);
  at::Tensor grad_second = second_grad ? empty_for_overwrite(input) : empty_gradient(input);
  if (input_grad) args.grad_input = grad_input.mutable_data_ptr();
  if (second_grad) second_grad_slot(op, args) = grad_second.mutable_data_ptr();
  at::Tensor loss =
      reduced_loss(op.config, run_loss_kernel(args, input.numel()), input.numel(), input);
  return {loss, grad_input, grad_second};
}

// Backward recomputed with grad_output folded in: (grad_input, second gradient).
std::tuple<at::Tensor, at::Tensor> loss_backward(const char* name, const LossOperands& op,
                                                 const at::Tensor& grad_output_, bool input_grad,
                                                 bool second_grad) {
  const at::Tensor& input = op.input;
  check_grad_output(name, op.config, grad_output_, input);
  cpu::LossKernelArgs args = kernel_args(op);
  at::Tensor grad_output;
  if (op.config.reduction == Reduction::None) {
    grad_output = grad_output_.to(input.scalar_type()).contiguous();
    args.grad_output = grad_output.const_data_ptr();
  } else {
    // A CPU scalar: reading it is a load, not a device synchronisation (under vmap this op runs
    // once per batch entry, on plain tensors).
    args.grad_scale =
        loss_grad_scale(op.config, input.numel(), grad_output_.item<double>(), input.scalar_type());
  }
  at::Tensor grad_input = input_grad ? empty_for_overwrite(input) : empty_gradient(input);
  at::Tensor grad_second = second_grad ? empty_for_overwrite(input) : empty_gradient(input);
  if (input_grad) args.grad_input = grad_input.mutable_data_ptr();
  if (second_grad) second_grad_slot(op, args) = grad_second.mutable_data_ptr();
  run_loss_kernel(args, input.numel());
  return {grad_input, grad_second};
}

}  // namespace

at::Tensor regression_loss_cpu(const at::Tensor& input, const at::Tensor& target,
                               c10::string_view kind, double param, int64_t reduction) {
  return loss_forward(
      regression_operands("fusedmtl::regression_loss", input, target, kind, param, reduction));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> regression_loss_with_grad_cpu(
    const at::Tensor& input, const at::Tensor& target, c10::string_view kind, double param,
    int64_t reduction, bool input_grad, bool target_grad) {
  constexpr const char* name = "fusedmtl::regression_loss_with_grad";
  return loss_forward_with_grad(name,
                                regression_operands(name, input, target, kind, param, reduction),
                                input_grad, target_grad);
}

std::tuple<at::Tensor, at::Tensor> regression_loss_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& target,
    c10::string_view kind, double param, int64_t reduction, bool input_grad, bool target_grad) {
  constexpr const char* name = "fusedmtl::regression_loss_backward";
  return loss_backward(name, regression_operands(name, input, target, kind, param, reduction),
                       grad_output, input_grad, target_grad);
}

at::Tensor heteroscedastic_loss_cpu(const at::Tensor& input, const at::Tensor& target,
                                    const at::Tensor& log_var, c10::string_view kind, double beta,
                                    int64_t reduction) {
  return loss_forward(heteroscedastic_operands("fusedmtl::heteroscedastic_loss", input, target,
                                               log_var, kind, beta, reduction));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> heteroscedastic_loss_with_grad_cpu(
    const at::Tensor& input, const at::Tensor& target, const at::Tensor& log_var,
    c10::string_view kind, double beta, int64_t reduction, bool input_grad, bool log_var_grad) {
  constexpr const char* name = "fusedmtl::heteroscedastic_loss_with_grad";
  return loss_forward_with_grad(
      name, heteroscedastic_operands(name, input, target, log_var, kind, beta, reduction),
      input_grad, log_var_grad);
}

std::tuple<at::Tensor, at::Tensor> heteroscedastic_loss_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& target,
    const at::Tensor& log_var, c10::string_view kind, double beta, int64_t reduction,
    bool input_grad, bool log_var_grad) {
  constexpr const char* name = "fusedmtl::heteroscedastic_loss_backward";
  return loss_backward(
      name, heteroscedastic_operands(name, input, target, log_var, kind, beta, reduction),
      grad_output, input_grad, log_var_grad);
}

}  // namespace fusedmtl::losses
