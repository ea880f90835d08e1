"""Pure-PyTorch reference of the regression losses (../shared/METHODS.md, section 1).

torch operations written in the order ATen evaluates them: the 'reference' backend runs this, the
tests compare the fused kernels against it, and the compiled backends use
:func:`regression_loss_grad` for double backward. ``input`` and ``target`` arrive broadcast to one
shape and one dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

KINDS = ("l1", "mse", "smooth_l1", "huber")


LOW_PRECISION = (torch.float16, torch.bfloat16)


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16 and bf16 are computed in fp32 and rounded once, as the fused kernels do.
    return torch.float32 if dtype in LOW_PRECISION else dtype


def loss_value(input: Tensor, target: Tensor, kind: str, param: float, reduction: str) -> Tensor:
    """The loss of ``input`` against ``target``, without autograd's help.

    kind: 'l1' | 'mse' | 'smooth_l1' (param = beta > 0) | 'huber' (param = delta > 0);
    reduction: 'none' (shape of input) | 'mean' | 'sum' (0-dim). Returns input's dtype.
    """
    compute = _compute_dtype(input.dtype)
    d = input.to(compute) - target.to(compute)
    if kind == "l1":
        loss = d.abs()
    elif kind == "mse":
        loss = d * d
    elif kind == "smooth_l1":
        z = d.abs()
        loss = torch.where(z < param, 0.5 * z * z / param, z - 0.5 * param)
    elif kind == "huber":
        z = d.abs()
        loss = torch.where(z < param, 0.5 * z * z, param * (z - 0.5 * param))
    else:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {KINDS}")
    return _reduce(loss, reduction).to(input.dtype)


def regression_loss_grad(
    grad_output: Tensor, input: Tensor, target: Tensor, kind: str, param: float, reduction: str
) -> Tensor:
    """d loss / d input times grad_output (the gradient w.r.t. target is its negation).

    grad_output has the loss's shape (0-dim for 'mean' and 'sum'). Written in the order of ATen's
    backward kernels, so that float32/float64 results equal torch's, and differentiable, so that
    double backward (create_graph=True) gives torch's results too.
    """
    compute = _compute_dtype(input.dtype)
    d = input.to(compute) - target.to(compute)
    mean = reduction == "mean"
    n = d.numel()
    if kind == "l1":
        # autograd's mean backward divides grad_output by N (in its dtype) before sign(d) multiplies it
        scale = grad_output / n if mean else grad_output
        return (scale.to(compute) * torch.sign(d)).to(input.dtype)
    g = grad_output.to(compute)
    factor = 2.0 if kind == "mse" else 1.0
    norm = factor / n if mean and n else factor
    if kind == "mse":
        return (norm * d * g).to(input.dtype)
    if kind == "smooth_l1":
        inner = d / param * norm * g
        outer = norm * g
    elif kind == "huber":
        inner = norm * d * g
        outer = norm * g * param
    else:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {KINDS}")
    return torch.where(d <= -param, -outer, torch.where(d >= param, outer, inner)).to(input.dtype)


class _ReferenceLoss(torch.autograd.Function):
    """loss_value with regression_loss_grad as its backward: torch's gradients to the last ulp
    (autograd through the forward formula would round in another order), double backward through
    the differentiable gradient formula, and torch.func transforms through setup_context."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, target, kind, param, reduction):
        return loss_value(input, target, kind, param, reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, kind, param, reduction = inputs
        ctx.save_for_backward(input, target)
        ctx.config = (kind, param, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        input, target = ctx.saved_tensors
        needs_input_grad, needs_target_grad = ctx.needs_input_grad[:2]
        grad = regression_loss_grad(grad_output, input, target, *ctx.config)
        return (grad if needs_input_grad else None), (-grad if needs_target_grad else None), None, None, None


def regression_loss(input: Tensor, target: Tensor, kind: str, param: float, reduction: str) -> Tensor:
    """The loss of ``input`` against ``target`` (same shape and dtype), differentiable.

    kind: 'l1' | 'mse' | 'smooth_l1' (param = beta > 0) | 'huber' (param = delta > 0);
    reduction: 'none' (shape of input) | 'mean' | 'sum' (0-dim).
    """
    if not (input.dtype.is_floating_point and target.dtype.is_floating_point):
        # integer l1_loss: torch composes sub, abs and the reduction, and so errors or not as they do
        return _reduce((input - target).abs(), reduction)
    return _ReferenceLoss.apply(input, target, kind, param, reduction)
