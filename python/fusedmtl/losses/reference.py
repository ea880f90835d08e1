"""Pure-PyTorch reference of the regression losses (docs/METHODS.md, section 1).

torch operations written in the order ATen evaluates them: the 'reference' backend runs this, the
tests compare the fused kernels against it, and the compiled backends use
:func:`regression_loss_grad` for double backward. ``input`` and ``target`` arrive broadcast to one
shape and one dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.losses.kinds import HETEROSCEDASTIC_KINDS as _HETEROSCEDASTIC_ROWS
from fusedmtl.losses.kinds import REGRESSION_KINDS

KINDS = tuple(kind.name for kind in REGRESSION_KINDS)


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
        return l1_grad(grad_output, d, reduction, input.dtype)
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
        # grad_output last, as torch's vectorized kernel; norm * param rounded in the compute dtype
        outer = d.new_tensor(norm) * param * g  # d: never batched, unlike g under vmap
    else:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {KINDS}")
    return torch.where(d <= -param, -outer, torch.where(d >= param, outer, inner)).to(input.dtype)


def l1_grad(grad_output: Tensor, d: Tensor, reduction: str, dtype: torch.dtype) -> Tensor:
    """L1's d loss / d input times grad_output from d = input - target alone, which is what torch's
    l1_loss saves (so that editing input or target in place after forward is no error). d may be
    in the inputs' dtype: the difference of two float16/bfloat16 values never rounds to 0 or
    changes sign, so sign(d) is exact."""
    compute = _compute_dtype(dtype)
    # autograd's mean backward divides grad_output by N (in its dtype) before sign(d) multiplies it
    scale = grad_output / d.numel() if reduction == "mean" else grad_output
    return (scale.to(compute) * torch.sign(d).to(compute)).to(dtype)


def l1_difference(input: Tensor, target: Tensor) -> Tensor:
    """What an L1 loss keeps for backward: d = input - target, outside autograd."""
    with torch.no_grad():
        return input - target


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
        ctx.config = (kind, param, reduction)
        ctx.dtype = input.dtype
        ctx.difference = l1_difference(input, target) if kind == "l1" else None
        if ctx.difference is None:
            ctx.save_for_backward(input, target)
        else:  # for double backward only, which differentiates through them (checked versions)
            ctx.operands = [(input, input._version), (target, target._version)]

    @staticmethod
    def backward(ctx, grad_output):
        needs_input_grad, needs_target_grad = ctx.needs_input_grad[:2]
        if ctx.difference is not None and torch.is_grad_enabled():
            from fusedmtl.losses.autograd import unmodified

            grad = regression_loss_grad(grad_output, *unmodified(ctx.operands), *ctx.config)
        elif ctx.difference is not None:
            grad = l1_grad(grad_output, ctx.difference, ctx.config[2], ctx.dtype)
        else:
            grad = regression_loss_grad(grad_output, *ctx.saved_tensors, *ctx.config)
        return (
            (grad if needs_input_grad else None),
            (-grad if needs_target_grad else None),
            None,
            None,
            None,
        )


def regression_loss(
    input: Tensor, target: Tensor, kind: str, param: float, reduction: str
) -> Tensor:
    """The loss of ``input`` against ``target``, differentiable (docs/METHODS.md, section 1).

    Args:
        input, target: one shape and dtype (float16 and bfloat16 are computed in float32).
        kind: 'l1' | 'mse' | 'smooth_l1' | 'huber' (a name of the kinds table).
        param: smooth-L1's beta > 0 or Huber's delta > 0; ignored by the other kinds.
        reduction: 'none' | 'mean' | 'sum'.

    Returns:
        The element-wise loss of input's shape ('none') or a 0-dim tensor, of input's dtype.
    """
    if not (input.dtype.is_floating_point and target.dtype.is_floating_point):
        # integer l1_loss: torch composes sub, abs and the reduction, and so errors or not as they
        # do
        return _reduce((input - target).abs(), reduction)
    return _ReferenceLoss.apply(input, target, kind, param, reduction)


# --------------------------------------------------------------------------------------------
# Heteroscedastic regression losses (Kendall & Gal 2017), as csrc/losses/heteroscedastic_math.h

HETEROSCEDASTIC_KINDS = tuple(kind.name for kind in _HETEROSCEDASTIC_ROWS)


def _heteroscedastic_base(d: Tensor, kind: str, beta: float) -> tuple[Tensor, float]:
    """(b(d), w): the base loss and the leading factor of ``w * (exp(-s) * b + s)``."""
    if kind == "l2":
        return d * d, 0.5
    if kind == "l1" or (kind == "smooth_l1" and beta == 0):
        return d.abs(), 1.0
    if kind == "smooth_l1":
        z = d.abs()
        return torch.where(z < beta, 0.5 * z * z / beta, z - 0.5 * beta), 1.0
    raise ValueError(
        f"unknown heteroscedastic loss kind {kind!r}; expected one of {HETEROSCEDASTIC_KINDS}"
    )


def heteroscedastic_value(
    input: Tensor, target: Tensor, log_var: Tensor, kind: str, beta: float, reduction: str
) -> Tensor:
    """The heteroscedastic loss, without autograd's help: w * (exp(-s) * b(input - target) + s).

    input, target, log_var: one shape and dtype. Computed in float32 for float16/bfloat16 and
    rounded once to their dtype.
    """
    compute = _compute_dtype(input.dtype)
    d = input.to(compute) - target.to(compute)
    s = log_var.to(compute)
    base, weight = _heteroscedastic_base(d, kind, beta)
    return _reduce(weight * (torch.exp(-s) * base + s), reduction).to(input.dtype)


def heteroscedastic_grad(
    grad_output: Tensor,
    input: Tensor,
    target: Tensor,
    log_var: Tensor,
    kind: str,
    beta: float,
    reduction: str,
) -> tuple[Tensor, Tensor]:
    """(d loss / d input, d loss / d log_var) times grad_output; the target's is -grad_input.

    d loss / d input = w exp(-s) b'(d) and d loss / d s = w (1 - exp(-s) b(d)), with torch's
    conventions for b' (sign(d) is 0 at 0 and NaN; smooth-L1's slope is linear at |d| >= beta).
    Differentiable, so that double backward through the compiled ops works.
    """
    compute = _compute_dtype(input.dtype)
    d = input.to(compute) - target.to(compute)
    s = log_var.to(compute)
    base, weight = _heteroscedastic_base(d, kind, beta)
    if kind == "l2":
        slope = d  # 0.5 * 2d
    elif kind == "l1" or beta == 0:
        slope = torch.sign(d)
    else:
        slope = torch.where(d <= -beta, -1.0, torch.where(d >= beta, 1.0, d / beta))
    g = grad_output.to(compute)
    if reduction == "mean":
        g = g / d.numel()
    precision = torch.exp(-s)
    grad_input = g * (precision * slope)
    grad_log_var = g * (weight * (1 - precision * base))
    return grad_input.to(input.dtype), grad_log_var.to(input.dtype)


class _ReferenceHeteroscedastic(torch.autograd.Function):
    """heteroscedastic_value with heteroscedastic_grad as its backward: the kernels' conventions
    at the kinks and at NaN (autograd through torch.where would take the other branch's), double
    backward through the differentiable formula, and torch.func transforms."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, target, log_var, kind, beta, reduction):
        return heteroscedastic_value(input, target, log_var, kind, beta, reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, log_var, kind, beta, reduction = inputs
        ctx.save_for_backward(input, target, log_var)
        ctx.config = (kind, beta, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        grad_input, grad_log_var = heteroscedastic_grad(
            grad_output, *ctx.saved_tensors, *ctx.config
        )
        needs_input, needs_target, needs_log_var = ctx.needs_input_grad[:3]
        return (
            grad_input if needs_input else None,
            -grad_input if needs_target else None,
            grad_log_var if needs_log_var else None,
            None,
            None,
            None,
        )


def heteroscedastic_loss(
    input: Tensor, target: Tensor, log_var: Tensor, kind: str, beta: float, reduction: str
) -> Tensor:
    """The heteroscedastic loss w * (exp(-s) * b(input - target) + s), s = log_var,
    differentiable (:func:`fusedmtl.heteroscedastic_loss` has the formulas).

    Args:
        input, target, log_var: one shape and floating dtype.
        kind: 'l2' | 'l1' | 'smooth_l1'.
        beta: smooth-L1's threshold, >= 0.
        reduction: 'none' | 'mean' | 'sum'.

    Returns:
        The element-wise loss of the operands' shape ('none') or a 0-dim tensor, of their dtype.
    """
    return _ReferenceHeteroscedastic.apply(input, target, log_var, kind, beta, reduction)
