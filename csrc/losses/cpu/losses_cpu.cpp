// CPU implementations of the loss ops: argument checks, allocation and threading around the
// per-instruction-set kernels of loss_kernels.cpp.
#include "losses/losses.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/SmallVector.h>

#include "common/tensor_utils.h"
#include "losses/cpu/loss_kernels.h"
#include "losses/loss_checks.h"

FUSEDMTL_CPU_KERNEL(fusedmtl::losses::cpu, loss_block, ::fusedmtl::losses::cpu::LossBlockFn)

namespace fusedmtl::losses {
namespace {

// Reductions sum fixed blocks of kBlock elements independently and add the block sums in order,
// so a result does not depend on how many threads ran the blocks.
constexpr int64_t kBlock = 16384;
// Fewer elements than this run on the calling thread: waking threads costs more than they save.
constexpr int64_t kGrainBlocks = 4;

cpu::LossKernelArgs kernel_args(const LossConfig& config, const at::Tensor& input,
                                const at::Tensor& target) {
  cpu::LossKernelArgs args{};
  args.kind = config.kind;
  args.dtype = scalar_kind(input.scalar_type());
  args.param = config.param;
  args.norm = loss_norm(config, input.numel());
  args.grad_scale = 1.0;
  args.input = input.const_data_ptr();
  args.target = target.const_data_ptr();
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

at::Tensor reduced_loss(const LossConfig& config, double total, int64_t n,
                        const at::Tensor& like) {
  // mean of an empty tensor is 0 / 0 = nan, as in torch.
  const double value = config.reduction == Reduction::Mean ? total / static_cast<double>(n) : total;
  return at::scalar_tensor(value, like.options());
}

at::Tensor empty_gradient(const at::Tensor& like) { return at::empty({0}, like.options()); }

}  // namespace

at::Tensor regression_loss_cpu(const at::Tensor& input_, const at::Tensor& target_,
                               c10::string_view kind, double param, int64_t reduction) {
  const LossConfig config =
      check_loss_args("fusedmtl::regression_loss", input_, target_, kind, param, reduction);
  const at::Tensor input = input_.contiguous();
  const at::Tensor target = target_.contiguous();
  cpu::LossKernelArgs args = kernel_args(config, input, target);
  if (config.reduction == Reduction::None) {
    at::Tensor loss = empty_for_overwrite(input);
    args.loss = loss.mutable_data_ptr();
    run_loss_kernel(args, input.numel());
    return loss;
  }
  args.reduce = true;
  return reduced_loss(config, run_loss_kernel(args, input.numel()), input.numel(), input);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> regression_loss_with_grad_cpu(
    const at::Tensor& input_, const at::Tensor& target_, c10::string_view kind, double param,
    int64_t reduction, bool input_grad, bool target_grad) {
  const LossConfig config = check_loss_args("fusedmtl::regression_loss_with_grad", input_, target_,
                                            kind, param, reduction);
  TORCH_CHECK(config.reduction != Reduction::None,
              "fusedmtl::regression_loss_with_grad: reduction must be mean or sum");
  const at::Tensor input = input_.contiguous();
  const at::Tensor target = target_.contiguous();
  cpu::LossKernelArgs args = kernel_args(config, input, target);
  args.reduce = true;
  args.grad_scale = loss_grad_scale(config, input.numel(), 1.0, input.scalar_type());
  at::Tensor grad_input = input_grad ? empty_for_overwrite(input) : empty_gradient(input);
  at::Tensor grad_target = target_grad ? empty_for_overwrite(input) : empty_gradient(input);
  if (input_grad) args.grad_input = grad_input.mutable_data_ptr();
  if (target_grad) args.grad_target = grad_target.mutable_data_ptr();
  at::Tensor loss = reduced_loss(config, run_loss_kernel(args, input.numel()), input.numel(), input);
  return {loss, grad_input, grad_target};
}

std::tuple<at::Tensor, at::Tensor> regression_loss_backward_cpu(
    const at::Tensor& grad_output_, const at::Tensor& input_, const at::Tensor& target_,
    c10::string_view kind, double param, int64_t reduction, bool input_grad, bool target_grad) {
  const LossConfig config = check_loss_args("fusedmtl::regression_loss_backward", input_, target_,
                                            kind, param, reduction);
  const at::Tensor input = input_.contiguous();
  const at::Tensor target = target_.contiguous();
  cpu::LossKernelArgs args = kernel_args(config, input, target);
  at::Tensor grad_output;
  if (config.reduction == Reduction::None) {
    TORCH_CHECK(grad_output_.sizes() == input.sizes(),
                "fusedmtl::regression_loss_backward: grad_output must have the input's shape ",
                input.sizes(), " for reduction='none', but got ", grad_output_.sizes());
    grad_output = grad_output_.to(input.scalar_type()).contiguous();
    args.grad_output = grad_output.const_data_ptr();
  } else {
    TORCH_CHECK(grad_output_.numel() == 1,
                "fusedmtl::regression_loss_backward: grad_output must be a scalar for a reduced loss");
    // A CPU scalar: reading it is a load, not a device synchronisation.
    args.grad_scale = loss_grad_scale(config, input.numel(), grad_output_.item<double>(),
                                      input.scalar_type());
  }
  at::Tensor grad_input = input_grad ? empty_for_overwrite(input) : empty_gradient(input);
  at::Tensor grad_target = target_grad ? empty_for_overwrite(input) : empty_gradient(input);
  if (input_grad) args.grad_input = grad_input.mutable_data_ptr();
  if (target_grad) args.grad_target = grad_target.mutable_data_ptr();
  run_loss_kernel(args, input.numel());
  return {grad_input, grad_target};
}

}  // namespace fusedmtl::losses
