"""The compiled loss ops (torch.ops.fusedmtl.*) made ready for autograd and torch.compile.

The schemas and kernels are in csrc/torch_bindings.cpp; this module adds their fake (meta)
implementations and autograd formulas, and the eager fast path:

- ``regression_loss`` is the op torch.compile and GPUs see: backward recomputes the gradient from
  input and target in one pass with grad_output folded in (``regression_loss_backward``; 5N elements
  moved in forward + backward).
- ``regression_loss_eager``, used in eager mode on CPU when a gradient is needed, computes the
  gradient in the forward pass itself (``regression_loss_with_grad``) and hands that buffer to
  autograd as it is when grad_output is 1 (``loss.backward()``): 3N elements moved, the minimum.
  Its autograd is a C++ function (csrc/losses/cpu/loss_autograd_cpu.cpp): no Python in the step.
- Under create_graph=True both fall back to the differentiable formula of ``reference`` (see
  loss_autograd.py), so double backward gives torch's results.

The heteroscedastic losses follow the same design: ``heteroscedastic_loss`` (backward:
``heteroscedastic_loss_backward``, grad_input and grad_log_var in one pass) and
:class:`FusedHeteroscedasticWithGrad` for the eager CPU fast path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.losses.autograd import (
    heteroscedastic_backward,
    register_heteroscedastic_autograd,
    register_loss_autograd,
)


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


@torch.library.register_fake("fusedmtl::heteroscedastic_loss")
def _heteroscedastic_loss_fake(input, target, log_var, kind, beta, reduction):
    return input.new_empty(input.shape if reduction == 0 else ())


@torch.library.register_fake("fusedmtl::heteroscedastic_loss_with_grad")
def _heteroscedastic_loss_with_grad_fake(
    input, target, log_var, kind, beta, reduction, input_grad, log_var_grad
):
    return input.new_empty(()), _new_grad(input, input_grad), _new_grad(input, log_var_grad)


@torch.library.register_fake("fusedmtl::heteroscedastic_loss_backward")
def _heteroscedastic_loss_backward_fake(
    grad_output, input, target, log_var, kind, beta, reduction, input_grad, log_var_grad
):
    return _new_grad(input, input_grad), _new_grad(input, log_var_grad)


register_heteroscedastic_autograd(
    "fusedmtl::heteroscedastic_loss", torch.ops.fusedmtl.heteroscedastic_loss_backward
)


class FusedHeteroscedasticWithGrad(torch.autograd.Function):
    """Eager CPU fast path of the heteroscedastic losses for reduction mean/sum: grad_input and
    grad_log_var are computed in the forward pass, and handed to autograd as they are when
    grad_output == 1 (``loss.backward()``); the target's gradient is -grad_input (negated in place
    when input needs none). Any other grad_output, a second backward (retain_graph=True) or double
    backward recomputes the gradients with grad_output folded in, which rounds once."""

    @staticmethod
    def forward(ctx, input: Tensor, target: Tensor, log_var: Tensor, kind: str, beta: float,
                reduction: int):
        needs_input, needs_target, needs_log_var = ctx.needs_input_grad[:3]
        loss, grad_input, grad_log_var = torch.ops.fusedmtl.heteroscedastic_loss_with_grad(
            input, target, log_var, kind, beta, reduction, needs_input or needs_target, needs_log_var
        )
        ctx.save_for_backward(input, target, log_var)
        ctx.config = (kind, beta, reduction)
        ctx.precomputed = (grad_input, grad_log_var)
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        precomputed, ctx.precomputed = ctx.precomputed, None
        needs_input, needs_target, needs_log_var = ctx.needs_input_grad[:3]
        if precomputed is None or torch.is_grad_enabled() or float(grad_output) != 1.0:
            del precomputed  # back to the buffer cache before the recomputation allocates
            grads = heteroscedastic_backward(
                torch.ops.fusedmtl.heteroscedastic_loss_backward,
                grad_output, *ctx.saved_tensors, *ctx.config, needs_input, needs_target, needs_log_var,
            )
            return *grads, None, None, None
        grad_input, grad_log_var = precomputed
        del precomputed  # so that autograd can adopt the buffers as .grad without a copy
        grad_target = None
        if needs_target:
            grad_target = -grad_input if needs_input else grad_input.neg_()
        return (
            grad_input if needs_input else None,
            grad_target if needs_target else None,
            grad_log_var if needs_log_var else None,
            None,
            None,
            None,
        )
