"""Multi-tensor kernels over per-task gradients (../shared/METHODS.md, sections 2 and 4).

Multi-task methods need, every step, quantities over the gradients of K tasks with respect to P
shared parameter tensors. These functions read the gradients where they lie, in a few passes over
memory, instead of a kernel per tensor per task or a flattened K x G copy.

``task_grads`` is a sequence of K sequences of P tensors: task i's tensor p has the shape of
parameter p, or is None where task i does not reach parameter p (treated as zeros). All tensors
share one floating dtype and one device. Norms, Gramians and penalties are float32 for
float32/float16/bfloat16 gradients (accumulated in fp32 or better) and float64 for float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fusedmtl import backend
from fusedmtl.multi_tensor import naive

__all__ = ["combine", "gramian", "l1_l2_penalty_", "normalized_sum", "norms"]

TaskGrads = Sequence[Sequence["Tensor | None"]]

if backend._C is not None:
    from fusedmtl.multi_tensor import native as _native  # noqa: F401  (fake registrations)


def norms(task_grads: TaskGrads) -> Tensor:
    """The L2 norm of each task's whole gradient: Tensor[K]."""
    return _gramian(task_grads, diagonal_only=True).sqrt()


def gramian(task_grads: TaskGrads) -> Tensor:
    """All inner products M[i, j] = <g_i, g_j> summed over the P tensors: Tensor[K, K]."""
    return _gramian(task_grads, diagonal_only=False)


def combine(
    task_grads: TaskGrads,
    coeffs: Tensor | Sequence[float],
    out: Sequence[Tensor] | None = None,
    accumulate: bool = False,
) -> list[Tensor | None]:
    """out[p] = sum_i coeffs[i] * task_grads[i][p] for every parameter p.

    coeffs: Tensor[K] or K floats. Without ``out``, returns new tensors of the gradients' dtype
    (None for a parameter no task reaches). With ``out`` (P tensors, e.g. the parameters' .grad),
    writes into them (zeros where no task reaches) and returns them; ``accumulate=True`` adds
    into them instead, the way autograd accumulates gradients.
    """
    table, dtype, device = _validated(task_grads)
    k, num_params = len(table), len(table[0])
    coeffs = _coefficients(coeffs, k, device)
    if out is None:
        shapes = [_shape_of(table, p) for p in range(num_params)]
        result: list[Tensor | None] = [
            torch.empty(shape, dtype=dtype, device=device) if shape is not None else None
            for shape in shapes
        ]
        targets = [t for t in result if t is not None]
        _combine_into(
            [[grads[p] for p in range(num_params) if shapes[p] is not None] for grads in table],
            coeffs, targets, accumulate=False,
        )
        return result
    if len(out) != num_params:
        raise ValueError(f"combine: {len(out)} output tensors for {num_params} parameters")
    for p, target in enumerate(out):
        shape = _shape_of(table, p)
        if shape is not None and tuple(target.shape) != tuple(shape):
            raise ValueError(
                f"combine: output {p} has shape {tuple(target.shape)} but parameter {p}'s "
                f"gradients have {tuple(shape)}"
            )
    _combine_into(table, coeffs, list(out), accumulate)
    return list(out)


def normalized_sum(
    task_grads: TaskGrads,
    eps: float = 1e-8,
    out: Sequence[Tensor] | None = None,
    accumulate: bool = False,
) -> tuple[list[Tensor | None], Tensor]:
    """sum_i g_i / (norm(g_i) + eps) and the norms: Su 2022's gradient normalisation.

    Two passes over the gradients: their norms, then the weighted sum. A zero gradient gets a
    finite coefficient 1 / eps and contributes nothing. Returns (P tensors, Tensor[K] norms).
    """
    task_norms = norms(task_grads)
    combined = combine(task_grads, 1.0 / (task_norms + eps), out=out, accumulate=accumulate)
    return combined, task_norms


def l1_l2_penalty_(params: Sequence[Tensor], l1: float = 0.0, l2: float = 0.0) -> Tensor:
    """Returns l1 * sum |w| + l2 * sum w^2 over ``params`` and adds its gradient
    l1 * sign(w) + 2 * l2 * w into each parameter's .grad (creating .grad where it is None),
    in one pass. L1 drives weights to exactly zero (a Laplace prior); L2 shrinks them (a Gaussian
    prior, weight decay for plain SGD)."""
    params = list(params)
    if not params:
        return torch.zeros(())
    _check_same(params, "l1_l2_penalty_", lambda p: f"parameter {p}")
    total = None
    with torch.no_grad():
        for overwrite in (False, True):
            chosen = [p for p in params if (p.grad is None) == overwrite]
            if not chosen:
                continue
            if overwrite:
                for p in chosen:
                    p.grad = torch.empty_like(p, memory_format=torch.contiguous_format)
            part = _penalty(chosen, overwrite, float(l1), float(l2))
            total = part if total is None else total + part
    return total


# ---------------------------------------------------------------------------------------------


def _validated(task_grads: TaskGrads) -> tuple[list[list[Tensor | None]], torch.dtype, torch.device]:
    """The task gradients as lists, checked: equal lengths, one dtype and device, equal shapes per
    parameter. Errors name the task and the parameter."""
    table = [list(grads) for grads in task_grads]
    if not table:
        raise ValueError("multi_tensor: expected at least one task's gradients, got none")
    num_params = len(table[0])
    dtype = device = None
    for i, grads in enumerate(table):
        if len(grads) != num_params:
            raise ValueError(
                f"multi_tensor: task {i} has {len(grads)} gradients but task 0 has {num_params}"
            )
        for p, g in enumerate(grads):
            if g is None:
                continue
            if dtype is None:
                dtype, device = g.dtype, g.device
                if not dtype.is_floating_point:
                    raise ValueError(f"multi_tensor: task {i} parameter {p}: gradients must be floating point, got {dtype}")
            elif g.dtype != dtype or g.device != device:
                raise ValueError(
                    f"multi_tensor: task {i} parameter {p} is {g.dtype} on {g.device} but the "
                    f"other gradients are {dtype} on {device}"
                )
    for p in range(num_params):
        shape = None
        for i, grads in enumerate(table):
            g = grads[p]
            if g is None:
                continue
            if shape is None:
                shape, first = g.shape, i
            elif g.shape != shape:
                raise ValueError(
                    f"multi_tensor: task {i} parameter {p} has shape {tuple(g.shape)} but task "
                    f"{first} has {tuple(shape)}"
                )
    return table, dtype or torch.float32, device or torch.device("cpu")


def _shape_of(table, p: int):
    for grads in table:
        if grads[p] is not None:
            return grads[p].shape
    return None


def _check_same(tensors: Sequence[Tensor], op: str, name) -> None:
    first = tensors[0]
    for p, t in enumerate(tensors):
        if t.dtype != first.dtype or t.device != first.device:
            raise ValueError(
                f"{op}: {name(p)} is {t.dtype} on {t.device} but {name(0)} is {first.dtype} on {first.device}"
            )


def _coefficients(coeffs, k: int, device: torch.device) -> Tensor:
    coeffs = torch.as_tensor(coeffs, device=device) if not isinstance(coeffs, Tensor) else coeffs
    if coeffs.numel() != k:
        raise ValueError(f"combine: expected {k} coefficients (one per task), got {coeffs.numel()}")
    return coeffs.reshape(k)


def _flat(table) -> list[Tensor | None]:
    return [g for grads in table for g in grads]


def _gramian(task_grads: TaskGrads, diagonal_only: bool) -> Tensor:
    table, dtype, device = _validated(task_grads)
    if backend.select(device) == "native" and dtype in _NATIVE_DTYPES:
        return torch.ops.fusedmtl.multi_tensor_gramian(_flat(table), len(table), diagonal_only)
    return naive.gramian(table, dtype, device, diagonal_only)


def _combine_into(table, coeffs: Tensor, out: list[Tensor], accumulate: bool) -> None:
    if not out:
        return
    device = out[0].device
    if backend.select(device) == "native" and out[0].dtype in _NATIVE_DTYPES:
        # The kernels write contiguous outputs; others (rare for .grad) go through a copy.
        direct = [t if t.is_contiguous() else torch.empty_like(t, memory_format=torch.contiguous_format) for t in out]
        if accumulate:
            for t, d in zip(out, direct):
                if d is not t:
                    d.copy_(t)
        torch.ops.fusedmtl.multi_tensor_combine(_flat(table), len(table), coeffs, direct, accumulate)
        for t, d in zip(out, direct):
            if d is not t:
                t.copy_(d)
        return
    naive.combine(table, coeffs, out, accumulate)


def _penalty(params: list[Tensor], overwrite: bool, l1: float, l2: float) -> Tensor:
    grads = [p.grad for p in params]
    device = params[0].device
    if (
        backend.select(device) == "native"
        and params[0].dtype in _NATIVE_DTYPES
        and all(t.is_contiguous() for t in (*params, *grads))
    ):
        return torch.ops.fusedmtl.multi_tensor_add_l1_l2_penalty(params, grads, overwrite, l1, l2)
    return naive.l1_l2_penalty(params, grads, overwrite, l1, l2)


_NATIVE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
