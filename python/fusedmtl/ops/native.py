"""The compiled loss ops (torch.ops.fusedmtl.*) made ready for autograd and torch.compile.

The schemas and kernels are in csrc/torch_bindings.cpp; this module adds their fake (meta)
implementations and autograd formulas, and the eager fast path:

- ``regression_loss`` is the op torch.compile and GPUs see: backward recomputes the gradient from
  input and target in one pass with grad_output folded in (``regression_loss_backward``; 5N elements
  moved in forward + backward).
- :class:`FusedLossWithGrad`, used in eager mode on CPU when a gradient is needed, computes the
  gradient in the forward pass itself (``regression_loss_with_grad``) and hands that buffer to
  autograd as it is when grad_output is 1 (``loss.backward()``): 3N elements moved, the minimum.
- Under create_graph=True both fall back to the differentiable formula of ``naive`` (see
  loss_autograd.py), so double backward gives torch's results.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.ops.loss_autograd import REDUCTIONS, loss_backward, register_loss_autograd


def _new_grad(input: Tensor, wanted: bool) -> Tensor:
    return input.new_empty(input.shape) if wanted else input.new_empty(0)


@torch.library.register_fake("fusedmtl::regression_loss")
def _regression_loss_fake(input, target, kind, param, reduction):
    return input.new_empty(input.shape if reduction == 0 else ())


@torch.library.register_fake("fusedmtl::regression_loss_with_grad")
def _regression_loss_with_grad_fake(input, target, kind, param, reduction, input_grad, target_grad):
    return input.new_empty(()), _new_grad(input, input_grad), _new_grad(input, target_grad)


@torch.library.register_fake("fusedmtl::regression_loss_backward")
def _regression_loss_backward_fake(
    grad_output, input, target, kind, param, reduction, input_grad, target_grad
):
    return _new_grad(input, input_grad), _new_grad(input, target_grad)


register_loss_autograd("fusedmtl::regression_loss", torch.ops.fusedmtl.regression_loss_backward)


class FusedLossWithGrad(torch.autograd.Function):
    """Eager CPU fast path for reduction mean/sum: the gradient is computed in the forward pass.

    In backward the buffer is returned as it is when grad_output == 1 (reading a CPU scalar costs
    nothing). The reference to it is dropped first, so that autograd can adopt it as a leaf's .grad
    without a copy. Any other grad_output scales it in place where that gives torch's result bit
    for bit (float32/float64 mse and smooth_l1, and l1 with reduction sum, whose kernels multiply by
    grad_output last); elsewhere, like a second backward (retain_graph=True) or double backward,
    the gradient is recomputed with grad_output folded in, which rounds once, as torch does.
    """

    @staticmethod
    def forward(ctx, input: Tensor, target: Tensor, kind: str, param: float, reduction: int):
        needs_input_grad, needs_target_grad = ctx.needs_input_grad[:2]
        loss, grad_input, grad_target = torch.ops.fusedmtl.regression_loss_with_grad(
            input, target, kind, param, reduction, needs_input_grad, needs_target_grad
        )
        ctx.save_for_backward(input, target)
        ctx.config = (kind, param, reduction)
        ctx.precomputed = [
            grad_input if needs_input_grad else None,
            grad_target if needs_target_grad else None,
        ]
        ctx.scales_exactly = input.dtype in (torch.float32, torch.float64) and (
            kind in ("mse", "smooth_l1") or (kind == "l1" and reduction == REDUCTIONS["sum"])
        )
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        precomputed, ctx.precomputed = ctx.precomputed, None
        scale = float(grad_output)  # a CPU scalar: no synchronisation
        if precomputed is None or torch.is_grad_enabled() or (scale != 1.0 and not ctx.scales_exactly):
            del precomputed  # back to the buffer cache before the recomputation allocates
            input, target = ctx.saved_tensors
            grads = loss_backward(
                torch.ops.fusedmtl.regression_loss_backward,
                grad_output, input, target, *ctx.config, *ctx.needs_input_grad[:2],
            )
            return *grads, None, None, None
        if scale != 1.0:
            for grad in precomputed:
                if grad is not None:
                    grad.mul_(scale)
        grad_input, grad_target = precomputed
        del precomputed
        return grad_input, grad_target, None, None, None
