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
  autograd.py), so double backward gives torch's results.

The heteroscedastic losses follow the same design: ``heteroscedastic_loss`` (backward:
``heteroscedastic_loss_backward``, grad_input and grad_log_var in one pass) and
:class:`FusedHeteroscedasticWithGrad` for the eager CPU fast path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.losses.autograd import is_batched, loss_backward, loss_fake, register_loss_op

for _family in ("regression_loss", "heteroscedastic_loss"):
    register_loss_op(
        f"fusedmtl::{_family}", f"fusedmtl::{_family}_backward", f"fusedmtl::{_family}_with_grad"
    )
# The eager fast path's op: its autograd is C++ (AutogradCPU), below autograd it is the forward.
torch.library.register_fake("fusedmtl::regression_loss_eager", loss_fake)


class FusedHeteroscedasticWithGrad(torch.autograd.Function):
    """Eager CPU fast path of the heteroscedastic losses for reduction mean/sum: grad_input and
    grad_log_var are computed in the forward pass, and handed to autograd as they are when
    grad_output == 1 (``loss.backward()``); the target's gradient is -grad_input (negated in place
    when input needs none). Any other grad_output, a second backward (retain_graph=True) or double
    backward recomputes the gradients with grad_output folded in, which rounds once."""

    @staticmethod
    def forward(
        ctx, input: Tensor, target: Tensor, log_var: Tensor, kind: str, beta: float, reduction: int
    ):
        needs_input, needs_target, needs_log_var = ctx.needs_input_grad[:3]
        loss, grad_input, grad_log_var = torch.ops.fusedmtl.heteroscedastic_loss_with_grad(
            input,
            target,
            log_var,
            kind,
            beta,
            reduction,
            needs_input or needs_target,
            needs_log_var,
        )
        ctx.save_for_backward(input, target, log_var)
        ctx.config = (kind, beta, reduction)
        ctx.precomputed = (grad_input, grad_log_var)
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        precomputed, ctx.precomputed = ctx.precomputed, None
        needs_input, needs_target, needs_log_var = ctx.needs_input_grad[:3]
        if precomputed is None or torch.is_grad_enabled() or not _is_one(grad_output):
            del precomputed  # back to the buffer cache before the recomputation allocates
            grads = loss_backward(
                torch.ops.fusedmtl.heteroscedastic_loss_backward.default,
                grad_output,
                ctx.saved_tensors,
                *ctx.config,
                (needs_input, needs_target, needs_log_var),
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


def _is_one(grad_output: Tensor) -> bool:
    """Whether grad_output is a plain CPU scalar equal to 1 (a load, no device synchronisation).
    Under a torch.func transform (vmap of the backward: autograd.grad(is_grads_batched=True),
    jacobian(vectorize=True)) it is a wrapped tensor without a readable value: False, and backward
    recomputes through the backward op, which has a vmap rule."""
    if is_batched(grad_output) or type(grad_output) is not Tensor:
        return False
    return grad_output.item() == 1.0
