"""Pure-PyTorch reference of the multi-tensor ops (docs/METHODS.md, sections 2 and 4).

A loop over parameters with torch operations; the 'reference' backend runs it, on any device.
``table`` is the validated task-gradient table of :mod:`fusedmtl.multi_tensor` (K lists of P
tensors or None). Gramians accumulate in float64 and are returned in float32 (float64 for float64
gradients); combinations are computed in float32 (float64) and rounded once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

TaskGrads = Sequence[Sequence[Tensor | None]]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gramian(
    table: TaskGrads, dtype: torch.dtype, device: torch.device, diagonal_only: bool
) -> Tensor:
    """K x K inner products (diagonal_only: the K squared norms), accumulated in float64."""
    k = len(table)
    acc = torch.float64
    result = torch.zeros((k, k), dtype=acc, device=device)
    for p in range(len(table[0])):
        present = [grads[p] for grads in table if grads[p] is not None]
        if not present:
            continue
        n = present[0].numel()
        stacked = torch.stack(
            [
                grads[p].reshape(-1).to(acc)
                if grads[p] is not None
                else torch.zeros(n, dtype=acc, device=device)
                for grads in table
            ]
        )
        result += (stacked * stacked).sum(1).diag() if diagonal_only else stacked @ stacked.T
    # BLAS need not round <g_i, g_j> and <g_j, g_i> alike (it depends on alignment and the CPU):
    # mirror the upper triangle so that the result is exactly symmetric.
    result = result.triu() + result.triu(1).mT
    result = result.to(accumulate_dtype(dtype))
    return result.diagonal().clone() if diagonal_only else result


def combine(table: TaskGrads, coeffs: Tensor, out: Sequence[Tensor], accumulate: bool) -> None:
    """out[p] (+)= sum_i coeffs[i] * table[i][p], in the accumulation dtype, rounded once."""
    for p, target in enumerate(out):
        acc = accumulate_dtype(target.dtype)
        total = (
            target.to(acc)
            if accumulate
            else torch.zeros(target.shape, dtype=acc, device=target.device)
        )
        for i, grads in enumerate(table):
            if grads[p] is not None:
                total = total + coeffs[i].to(acc) * grads[p].to(acc)
        target.copy_(total)


def trim_(table: TaskGrads, trim: int) -> None:
    """Masks every gradient (all K of each parameter given) in place to the coordinates where its
    value ranks in [trim, K - trim) among the K tasks' values (a stable ascending sort, NaN last),
    by a stable argsort of the K x numel stack of each parameter."""
    k = len(table)
    for p in range(len(table[0])):
        stack = torch.stack([row[p] for row in table])
        order = stack.argsort(dim=0, stable=True)
        keep = torch.zeros_like(stack, dtype=torch.bool)
        keep.scatter_(0, order[trim : k - trim], True)
        for i, row in enumerate(table):
            # a multiplication, not a selection: 0 * inf is NaN, so a dropped overflow is seen
            row[p].mul_(keep[i])


def sign_dropout_(table: TaskGrads, uniforms: Sequence[Tensor], leak: Tensor, f=None) -> None:
    """GradDrop's masks in place (every gradient given): with total = sum_i g_i and
    magnitude = sum_i |g_i| added in task order, P = f((1 + total / magnitude) / 2) and U the
    parameter's uniforms, g_i *= l_i + (1 - l_i) [P > U and g_i > 0, or P < U and g_i < 0], all in
    the accumulation dtype (f: the identity when None)."""
    for p, uniform in enumerate(uniforms):
        grads = [row[p] for row in table]
        acc = accumulate_dtype(grads[0].dtype)
        total = torch.zeros(grads[0].shape, dtype=acc, device=grads[0].device)
        magnitude = torch.zeros_like(total)
        for g in grads:
            total.add_(g)
            magnitude.add_(g.abs())
        purity = 0.5 * (1.0 + total / magnitude)
        if f is not None:
            purity = f(purity)
        draw = uniform.to(acc)
        up, down = purity > draw, purity < draw
        del total, magnitude, purity, draw
        leaks = leak.to(device=grads[0].device, dtype=acc)
        for g, keep_leak in zip(grads, leaks):
            kept = (up & (g > 0)) | (down & (g < 0))
            # a multiplication, not a selection: 0 * inf is NaN, so a dropped overflow is seen
            g.mul_(keep_leak + (1 - keep_leak) * kept)


def l1_l2_penalty(
    params: Sequence[Tensor], grads: Sequence[Tensor], overwrite: bool, l1: float, l2: float
) -> Tensor:
    """l1 * sum |w| + l2 * sum w^2; writes or adds l1 sign(w) + 2 l2 w into grads."""
    acc = accumulate_dtype(params[0].dtype) if params else torch.float32
    total = torch.zeros((), dtype=acc, device=params[0].device if params else None)
    for w, g in zip(params, grads):
        w_acc = w.detach().to(acc)
        total = total + l1 * w_acc.abs().sum() + l2 * (w_acc * w_acc).sum()
        update = l1 * torch.sign(w_acc) + (2 * l2) * w_acc
        g.copy_(update if overwrite else g.to(acc) + update)
    return total
