"""Pure-PyTorch reference of the regression losses (../shared/METHODS.md, section 1).

Differentiable torch operations, written in the order ATen evaluates them: the 'reference' backend
runs this, and the native backend uses :func:`regression_loss_grad` for double backward.
``input`` and ``target`` arrive broadcast to one shape and one dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

KINDS = ("l1", "mse", "smooth_l1", "huber")


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def regression_loss(input: Tensor, target: Tensor, kind: str, param: float, reduction: str) -> Tensor:
    """The loss of ``input`` against ``target``.

    kind: 'l1' | 'mse' | 'smooth_l1' (param = beta > 0) | 'huber' (param = delta > 0);
    reduction: 'none' (shape of input) | 'mean' | 'sum' (0-dim).
    """
    d = input - target
    if kind == "l1":
        loss = d.abs()
    elif kind == "mse":
        loss = d * d
    else:
        z = d.abs()
        # Both branches are evaluated; clamping the quadratic one keeps an infinite |d| from
        # turning its (unused) gradient into 0 * inf = nan.
        zq = torch.minimum(z, z.new_tensor(param))
        if kind == "smooth_l1":
            loss = torch.where(z < param, 0.5 * zq * zq / param, z - 0.5 * param)
        elif kind == "huber":
            loss = torch.where(z < param, 0.5 * zq * zq, param * (z - 0.5 * param))
        else:
            raise ValueError(f"unknown loss kind {kind!r}; expected one of {KINDS}")
    return _reduce(loss, reduction)


def regression_loss_grad(
    grad_output: Tensor, input: Tensor, target: Tensor, kind: str, param: float, reduction: str
) -> Tensor:
    """d loss / d input times grad_output (the gradient w.r.t. target is its negation).

    grad_output has the loss's shape (0-dim for 'mean' and 'sum'). Differentiable, so that
    double backward (create_graph=True) gives torch's results.
    """
    d = input - target
    mean = reduction == "mean"
    n = d.numel()
    if kind == "l1":
        # autograd's mean backward divides grad_output by N before sign(d) multiplies it
        return (grad_output / n if mean else grad_output) * torch.sign(d)
    norm = (2.0 if kind == "mse" else 1.0) / n if mean else (2.0 if kind == "mse" else 1.0)
    if kind == "mse":
        return norm * d * grad_output
    if kind == "smooth_l1":
        inner = d / param * norm * grad_output
        outer = norm * grad_output
    elif kind == "huber":
        inner = norm * d * grad_output
        outer = norm * grad_output * param
    else:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {KINDS}")
    return torch.where(d <= -param, -outer, torch.where(d >= param, outer, inner))
