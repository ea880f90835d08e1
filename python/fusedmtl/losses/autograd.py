"""Autograd of the loss ops, shared by every compiled backend (native and triton).

Backward calls the backend's one-pass backward op, which recomputes the gradient from input and
target with grad_output folded in; under create_graph=True it runs the differentiable formula of
``reference`` instead, so that double backward gives torch's results.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.losses import reference

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
REDUCTION_NAMES = {value: name for name, value in REDUCTIONS.items()}


def loss_backward(
    backward_op,
    grad_output: Tensor,
    input: Tensor,
    target: Tensor,
    kind: str,
    param: float,
    reduction: int,
    needs_input_grad: bool,
    needs_target_grad: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """(grad_input, grad_target) of a loss, None where not needed.

    backward_op has the schema of ``fusedmtl::regression_loss_backward``; under create_graph=True
    the differentiable reference formula runs instead, so that double backward works.
    """
    if torch.is_grad_enabled():
        grad = reference.regression_loss_grad(
            grad_output, input, target, kind, param, REDUCTION_NAMES[reduction]
        )
        return (grad if needs_input_grad else None), (-grad if needs_target_grad else None)
    grad_input, grad_target = backward_op(
        grad_output, input, target, kind, param, reduction, needs_input_grad, needs_target_grad
    )
    return (grad_input if needs_input_grad else None), (grad_target if needs_target_grad else None)


def register_loss_autograd(forward_op: str, backward_op) -> None:
    """Autograd for a loss op of schema (input, target, kind, param, reduction) -> loss."""

    def setup_context(ctx, inputs, output):
        input, target, kind, param, reduction = inputs
        ctx.save_for_backward(input, target)
        ctx.config = (kind, param, reduction)

    def backward(ctx, grad_output):
        input, target = ctx.saved_tensors
        grads = loss_backward(
            backward_op, grad_output, input, target, *ctx.config, *ctx.needs_input_grad[:2]
        )
        return *grads, None, None, None

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


def heteroscedastic_backward(
    backward_op,
    grad_output: Tensor,
    input: Tensor,
    target: Tensor,
    log_var: Tensor,
    kind: str,
    beta: float,
    reduction: int,
    needs_input_grad: bool,
    needs_target_grad: bool,
    needs_log_var_grad: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(grad_input, grad_target, grad_log_var) of a heteroscedastic loss, None where not needed.

    backward_op has the schema of ``fusedmtl::heteroscedastic_loss_backward`` (one pass giving
    grad_input and grad_log_var); the target's gradient is -grad_input. Under create_graph=True the
    differentiable reference formula runs instead, so that double backward works.
    """
    d_wanted = needs_input_grad or needs_target_grad
    if torch.is_grad_enabled():
        grad_input, grad_log_var = reference.heteroscedastic_grad(
            grad_output, input, target, log_var, kind, beta, REDUCTION_NAMES[reduction]
        )
    else:
        grad_input, grad_log_var = backward_op(
            grad_output, input, target, log_var, kind, beta, reduction, d_wanted, needs_log_var_grad
        )
    return (
        grad_input if needs_input_grad else None,
        -grad_input if needs_target_grad else None,
        grad_log_var if needs_log_var_grad else None,
    )


def register_heteroscedastic_autograd(forward_op: str, backward_op) -> None:
    """Autograd for an op of schema (input, target, log_var, kind, beta, reduction) -> loss."""

    def setup_context(ctx, inputs, output):
        input, target, log_var, kind, beta, reduction = inputs
        ctx.save_for_backward(input, target, log_var)
        ctx.config = (kind, beta, reduction)

    def backward(ctx, grad_output):
        grads = heteroscedastic_backward(
            backward_op, grad_output, *ctx.saved_tensors, *ctx.config, *ctx.needs_input_grad[:3]
        )
        return *grads, None, None, None

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)
