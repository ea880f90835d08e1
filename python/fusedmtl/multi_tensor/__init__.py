"""Multi-tensor kernels over per-task gradients (docs/METHODS.md, sections 2 and 4).

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
from fusedmtl.multi_tensor import reference

__all__ = [
    "combine",
    "combine_into_grad_",
    "gramian",
    "l1_l2_penalty_",
    "normalized_sum",
    "norms",
    "sign_dropout_",
    "trim_",
]

TaskGrads = Sequence[Sequence["Tensor | None"]]

if backend._C is not None:
    from fusedmtl.multi_tensor import native as _native  # noqa: F401  (fake registrations)


def norms(task_grads: TaskGrads) -> Tensor:
    """The L2 norm of each task's whole gradient (over its P tensors).

    Args:
        task_grads: K sequences of P tensors (or None), as described in the module docstring.

    Returns:
        Tensor[K], float32 (float64 for float64 gradients), on the gradients' device.
    """
    return _gramian(*_validated(task_grads), diagonal_only=True).sqrt()


def gramian(task_grads: TaskGrads, diagonal_only: bool = False) -> Tensor:
    """The Gramian of the task gradients: all inner products M[i, j] = <g_i, g_j>, summed over
    the P tensors, in one pass over memory.

    Args:
        task_grads: K sequences of P tensors (or None), as described in the module docstring.
        diagonal_only: compute just the squared norms M[i, i] (K dot products instead of
            K (K + 1) / 2, the same single pass).

    Returns:
        Tensor[K, K] (Tensor[K] with ``diagonal_only``), symmetric, float32 (float64 for float64
        gradients), on the gradients' device.
    """
    return _gramian(*_validated(task_grads), diagonal_only=diagonal_only)


def combine(
    task_grads: TaskGrads,
    coeffs: Tensor | Sequence[float],
    out: Sequence[Tensor] | None = None,
    accumulate: bool = False,
) -> list[Tensor | None]:
    """out[p] = sum_i coeffs[i] * task_grads[i][p] for every parameter p, in one pass.

    Args:
        task_grads: K sequences of P tensors (or None), as described in the module docstring.
        coeffs: Tensor[K] (any floating dtype, on the gradients' device; not requiring grad) or K
            Python floats.
        out: optional P tensors of the parameters' shapes and the gradients' dtype (e.g. the
            parameters' .grad) to write into, zeros where no task reaches the parameter.
        accumulate: add into ``out`` instead of overwriting it, the way autograd accumulates.

    Returns:
        P tensors of the gradients' dtype: new ones (None for a parameter no task reaches), or
        ``out`` itself.
    """
    table, dtype, device = _validated(task_grads)
    coeffs = _coefficients(coeffs, len(table), device)
    result, table = _outputs(table, dtype, device, out)
    _combine_into(table, coeffs, [t for t in result if t is not None], accumulate)
    return result


def normalized_sum(
    task_grads: TaskGrads,
    eps: float = 1e-8,
    out: Sequence[Tensor] | None = None,
    accumulate: bool = False,
) -> tuple[list[Tensor | None], Tensor]:
    """sum_i g_i / (norm(g_i) + eps) and the norms: Su 2022's gradient normalisation
    (docs/METHODS.md, section 4).

    Two passes over the gradients, their norms and then the weighted sum (one launch on CUDA).
    A zero gradient gets the finite coefficient 1 / eps and contributes nothing.

    Args:
        task_grads: K sequences of P tensors (or None), as described in the module docstring.
        eps: added to each norm before dividing.
        out, accumulate: as for :func:`combine`.

    Returns:
        (P tensors as from :func:`combine`, Tensor[K] of the norms, float32 (float64 for float64
        gradients)).
    """
    table, dtype, device = _validated(task_grads)
    result, columns = _outputs(table, dtype, device, out)
    targets = [t for t in result if t is not None]
    if _backend(device, dtype) == "native" and targets:
        task_norms = _into_contiguous(
            targets,
            accumulate,
            lambda direct: torch.ops.fusedmtl.multi_tensor_normalized_sum(
                _flat(columns), len(table), float(eps), direct, accumulate
            ),
        )
        return result, task_norms
    task_norms = _gramian(table, dtype, device, diagonal_only=True).sqrt()
    _combine_into(columns, 1.0 / (task_norms + eps), targets, accumulate)
    return result, task_norms


def trim_(task_grads: TaskGrads, trim: int) -> None:
    """Masks every task gradient in place to the coordinates where its value is neither among the
    ``trim`` smallest nor the ``trim`` largest of the K tasks' values there: afterwards
    sum_i g_i / (K - 2 trim) is the coordinate-wise trimmed mean (Yin et al., "Byzantine-Robust
    Distributed Learning", ICML 2018; docs/METHODS.md, section 4), and the masked gradients are
    what its update is made of. One pass over the gradients, no K x numel temporary.

    Ranks are those of a stable ascending sort of the K values at each coordinate (ties in task
    order, NaN after every number, as ``torch.sort``); a None gradient counts as zeros there and
    stays None. Dropped values are multiplied by 0, not replaced: a dropped inf or NaN becomes
    NaN, so a non-finite step stays visible.

    Args:
        task_grads: K sequences of P tensors (or None), as described in the module docstring;
            written in place, so no two may share memory (a non-contiguous one is masked through
            a contiguous copy, copied back).
        trim: t >= 0 values dropped at each end of every coordinate, 2 t < K.

    Returns:
        None; the gradients hold the result.
    """
    table, dtype, device = _validated(task_grads)
    k = len(table)
    if trim < 0 or 2 * trim >= k:
        raise ValueError(f"trim_: needs 0 <= trim < K / 2, got trim={trim} for {k} tasks")
    if trim == 0:
        _check_distinct([g for grads in table for g in grads if g is not None], "trim_", "gradient")
        return
    _in_place(
        "trim_",
        table,
        dtype,
        device,
        lambda grads, reached: torch.ops.fusedmtl.multi_tensor_trim_(_flat(grads), k, trim),
        lambda grads, reached: _triton().trim_(grads, trim),
        lambda grads, reached: reference.trim_(grads, trim),
    )


def sign_dropout_(task_grads: TaskGrads, uniforms: Sequence[Tensor | None], leak: Tensor) -> None:
    """GradDrop's sign dropout in place (Chen et al., "Just Pick a Sign", NeurIPS 2020; f the
    identity; docs/METHODS.md, section 4): at every coordinate, with total = sum_i g_i and
    magnitude = sum_i |g_i| (added in task order), P = (1 + total / magnitude) / 2 and U the
    coordinate's uniform, g_i *= l_i + (1 - l_i) M_i, M_i = 1 where P > U and g_i > 0 or P < U and
    g_i < 0 (one sign survives; a coordinate of zeros has P = NaN and keeps nothing). Computed in
    float32 (float64 for float64 gradients), each operation rounded: the same bits on every
    backend. One pass over the gradients. Dropped values are multiplied by 0 (a dropped inf or
    NaN becomes NaN); a None gradient counts as zeros and stays None.

    Args:
        task_grads: K sequences of P tensors (or None), as described in the module docstring;
            written in place, so no two may share memory.
        uniforms: P tensors of the parameters' shapes and the gradients' dtype (e.g. from
            ``torch.rand``), or None for a parameter no task reaches.
        leak: ``Tensor[K]``, the leaks l_i in [0, 1] (any float dtype and device).

    Returns:
        None; the gradients hold the result.
    """
    table, dtype, device = _validated(task_grads)
    uniforms = list(uniforms)
    if len(uniforms) != len(table[0]) or leak.numel() != len(table):
        raise ValueError(
            f"sign_dropout_: {len(uniforms)} uniform tensors and {leak.numel()} leaks for "
            f"{len(table[0])} parameters and {len(table)} tasks"
        )
    for p, u in enumerate(uniforms):
        shape = _shape_of(table, p)
        if shape is not None and (
            u is None or u.shape != shape or u.dtype != dtype or u.device != device
        ):
            raise ValueError(
                f"sign_dropout_: uniforms {p} must be a {dtype} tensor of shape {tuple(shape)} on "
                f"{device}, got {None if u is None else (u.dtype, tuple(u.shape), u.device)}"
            )
    leak = leak.detach().reshape(-1)
    k = len(table)

    def draws(reached):
        return [uniforms[p].contiguous() for p in reached]

    _in_place(
        "sign_dropout_",
        table,
        dtype,
        device,
        lambda grads, reached: torch.ops.fusedmtl.multi_tensor_sign_dropout_(
            _flat(grads), k, draws(reached), leak
        ),
        lambda grads, reached: _triton().sign_dropout_(grads, draws(reached), leak),
        lambda grads, reached: reference.sign_dropout_(grads, draws(reached), leak),
    )


def _triton():
    from fusedmtl.multi_tensor import triton as triton_kernels

    return triton_kernels


def _in_place(op: str, table, dtype, device, native, triton, fallback) -> None:
    """Runs an in-place op on the task gradients by the backend's kernel, each called with
    (grads, reached): all K gradients of each parameter some task reaches, contiguous (zeros for
    a task that does not reach it: the ops' schemas have no optional mutable tensors), and those
    parameters' indices; the results land in the caller's tensors (copied back into a
    non-contiguous one)."""
    present = [g for grads in table for g in grads if g is not None]
    _check_distinct(present, op, "gradient")
    if not present:
        return
    reached = [p for p in range(len(table[0])) if _shape_of(table, p) is not None]
    direct = []
    for grads in table:
        row = []
        for p in reached:
            g = grads[p]
            if g is None:
                g = torch.zeros(_shape_of(table, p), dtype=dtype, device=device)
            row.append(g if g.is_contiguous() else g.contiguous())
        direct.append(row)
    with torch.no_grad():
        kernel = {"native": native, "triton": triton}.get(_backend(device, dtype), fallback)
        kernel(direct, reached)
        for grads, copies in zip(table, direct):
            for p, d in zip(reached, copies):
                if grads[p] is not None and d is not grads[p]:
                    grads[p].copy_(d)


def l1_l2_penalty_(params: Sequence[Tensor], l1: float = 0.0, l2: float = 0.0) -> Tensor:
    """The penalty l1 * sum |w| + l2 * sum w^2 over ``params``, its gradient
    l1 * sign(w) + 2 * l2 * w added into each parameter's .grad (created where it is None), in
    one pass. L1 drives weights to exactly zero (a Laplace prior); L2 shrinks them (a Gaussian
    prior, weight decay for plain SGD); docs/METHODS.md, section 2.

    Args:
        params: tensors of one floating dtype and device.
        l1, l2: the penalties' factors.

    Returns:
        0-dim tensor, float32 (float64 for float64 parameters); a CPU float32 zero for no
        parameters.
    """
    params = list(params)
    if not params:
        return torch.zeros(())
    _check_same(params, "l1_l2_penalty_", lambda p: f"parameter {p}")
    total = None
    with torch.no_grad():
        for chosen, fresh in _by_grad_existence(params):
            part = _penalty([params[p] for p in chosen], fresh, float(l1), float(l2))
            total = part if total is None else total + part
    return total


def combine_into_grad_(
    params: Sequence[Tensor], task_grads: TaskGrads, coeffs: Tensor | Sequence[float]
) -> None:
    """p.grad += sum_i coeffs[i] * task_grads[i][p] for every parameter p, creating .grad where it
    is None, the way autograd accumulates (a parameter no task reaches keeps its .grad).
    The update of a shared model from per-task gradients, in one pass over them.

    Args:
        params: P distinct parameters, of the task gradients' shapes.
        task_grads: K sequences of P tensors (or None), as described in the module docstring.
        coeffs: Tensor[K] or K Python floats, as for :func:`combine`.

    Returns:
        None; the parameters' .grad hold the result.
    """
    params = list(params)
    table, dtype, device = _validated(task_grads)
    if len(table[0]) != len(params):
        raise ValueError(
            f"combine_into_grad_: {len(params)} parameters but {len(table[0])} gradients per task"
        )
    _check_distinct(params, "combine_into_grad_", "parameter")
    for p, param in enumerate(params):
        shape = _shape_of(table, p)
        if shape is not None and tuple(shape) != tuple(param.shape):
            raise ValueError(
                f"combine_into_grad_: parameter {p} has shape {tuple(param.shape)} but its task "
                f"gradients have {tuple(shape)} (same element count is not enough: a transposed "
                "gradient would be written flat)"
            )
    coeffs = _coefficients(coeffs, len(table), device)
    reached = [p for p in range(len(params)) if _shape_of(table, p) is not None]
    with torch.no_grad():
        for chosen, fresh in _by_grad_existence([params[p] for p in reached]):
            columns = [[grads[reached[p]] for p in chosen] for grads in table]
            _combine_into(
                columns, coeffs, [params[reached[p]].grad for p in chosen], accumulate=not fresh
            )


# ---------------------------------------------------------------------------------------------


def _validated(
    task_grads: TaskGrads,
) -> tuple[list[list[Tensor | None]], torch.dtype, torch.device]:
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
                    raise ValueError(
                        f"multi_tensor: task {i} parameter {p}: gradients must be floating point, "
                        f"got {dtype}"
                    )
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


def _by_grad_existence(params: list[Tensor]):
    """(indices, fresh) for the parameters that have a .grad (fresh False: accumulate into it)
    and for those that had none (fresh True: given an uninitialised contiguous .grad to
    overwrite, saving the pass that zeroing it would cost)."""
    for fresh in (False, True):
        chosen = [p for p, param in enumerate(params) if (param.grad is None) == fresh]
        if not chosen:
            continue
        if fresh:
            for p in chosen:
                params[p].grad = torch.empty_like(params[p], memory_format=torch.contiguous_format)
        yield chosen, fresh


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
                f"{op}: {name(p)} is {t.dtype} on {t.device} but {name(0)} is {first.dtype} on "
                f"{first.device}"
            )


def _coefficients(coeffs, k: int, device: torch.device) -> Tensor:
    if isinstance(coeffs, Tensor) and coeffs.requires_grad and torch.is_grad_enabled():
        # The kernels write into existing tensors and record no graph: a silent detach would lose
        # the coefficients' gradient, so ask for an explicit one.
        raise ValueError(
            "multi_tensor: the multi-tensor ops are not differentiable, but coeffs requires grad; "
            "pass coeffs.detach() or compute sum_i c_i * g_i with torch ops to backpropagate into c"
        )
    if not isinstance(coeffs, Tensor):  # Python floats are doubles: keep them so for float64 grads
        coeffs = torch.tensor([float(c) for c in coeffs], dtype=torch.float64)
        if device.type == "cuda":  # from pinned memory the copy does not wait for the GPU
            coeffs = coeffs.pin_memory().to(device, non_blocking=True)
        else:
            coeffs = coeffs.to(device)
    if coeffs.numel() != k:
        raise ValueError(f"combine: expected {k} coefficients (one per task), got {coeffs.numel()}")
    return coeffs.reshape(k)


def _flat(table) -> list[Tensor | None]:
    return [g for grads in table for g in grads]


def _backend(device: torch.device, dtype: torch.dtype) -> str:
    return backend.select(device) if dtype in _NATIVE_DTYPES else "reference"


def _outputs(table, dtype, device, out):
    """The result list (new tensors, or ``out`` checked) and the table restricted to the
    parameters that have an output tensor."""
    num_params = len(table[0])
    shapes = [_shape_of(table, p) for p in range(num_params)]
    if out is None:
        result = [
            torch.empty(s, dtype=dtype, device=device) if s is not None else None for s in shapes
        ]
    else:
        result = list(out)
        if len(result) != num_params:
            raise ValueError(
                f"multi_tensor: {len(result)} output tensors for {num_params} parameters"
            )
        for p, (target, shape) in enumerate(zip(result, shapes)):
            if not isinstance(target, Tensor):
                raise ValueError(
                    f"multi_tensor: output {p} is {type(target).__name__}, not a tensor"
                )
            if target.dtype != dtype and shape is not None:
                raise ValueError(
                    f"multi_tensor: output {p} is {target.dtype} but the gradients are {dtype} "
                    "(no silent rounding or truncation into another dtype)"
                )
            if shape is not None and tuple(target.shape) != tuple(shape):
                raise ValueError(
                    f"multi_tensor: output {p} has shape {tuple(target.shape)} but parameter {p}'s "
                    f"gradients have {tuple(shape)}"
                )
        _check_distinct(result, "multi_tensor", "output")
    columns = [[grads[p] for p, t in enumerate(result) if t is not None] for grads in table]
    return result, columns


def _check_distinct(tensors: Sequence[Tensor], op: str, what: str) -> None:
    """Rejects a tensor given twice (or two views of the same memory): written once per
    occurrence, it would be counted twice, or raced over by two threads. Skipped while
    torch.compile traces (storage addresses are not traceable; the same call in eager checks)."""
    if torch.compiler.is_compiling():
        return
    seen = {}
    for p, t in enumerate(tensors):
        if t.numel() == 0:
            continue
        key = (t.device, t.untyped_storage().data_ptr())
        start, end = t.storage_offset(), t.storage_offset() + t.numel()
        for q, (other_start, other_end) in seen.get(key, []):
            if start < other_end and other_start < end:
                raise ValueError(
                    f"{op}: {what}s {q} and {p} share memory (the same tensor given "
                    "twice?); pass each once"
                )
        seen.setdefault(key, []).append((p, (start, end)))


def _into_contiguous(out: list[Tensor], accumulate: bool, kernel):
    """Runs kernel(outputs) on contiguous outputs: the kernels need them, and a non-contiguous
    one (rare for .grad) goes through a contiguous copy."""
    direct = [
        t if t.is_contiguous() else torch.empty_like(t, memory_format=torch.contiguous_format)
        for t in out
    ]
    for t, d in zip(out, direct):
        if d is not t and accumulate:
            d.copy_(t)
    result = kernel(direct)
    for t, d in zip(out, direct):
        if d is not t:
            t.copy_(d)
    return result


def _gramian(table, dtype, device, diagonal_only: bool) -> Tensor:
    chosen = _backend(device, dtype)
    if all(g is None for grads in table for g in grads):  # nothing to sum, and no device to run on
        k = len(table)
        return torch.zeros(
            (k,) if diagonal_only else (k, k),
            dtype=reference.accumulate_dtype(dtype),
            device=device,
        )
    if chosen == "native":
        return torch.ops.fusedmtl.multi_tensor_gramian(_flat(table), len(table), diagonal_only)
    if chosen == "triton":
        from fusedmtl.multi_tensor import triton as triton_kernels

        return triton_kernels.gramian(table, dtype, device, diagonal_only)
    return reference.gramian(table, dtype, device, diagonal_only)


def _combine_into(table, coeffs: Tensor, out: list[Tensor], accumulate: bool) -> None:
    if not out:
        return
    chosen = _backend(out[0].device, out[0].dtype)
    if chosen == "native":
        _into_contiguous(
            out,
            accumulate,
            lambda direct: torch.ops.fusedmtl.multi_tensor_combine(
                _flat(table), len(table), coeffs, direct, accumulate
            ),
        )
    elif chosen == "triton":
        from fusedmtl.multi_tensor import triton as triton_kernels

        _into_contiguous(
            out,
            accumulate,
            lambda direct: triton_kernels.combine(table, coeffs, direct, accumulate),
        )
    else:
        reference.combine(table, coeffs, out, accumulate)


def _penalty(params: list[Tensor], overwrite: bool, l1: float, l2: float) -> Tensor:
    grads = [p.grad for p in params]
    chosen = _backend(params[0].device, params[0].dtype)
    if chosen != "reference" and all(t.is_contiguous() for t in (*params, *grads)):
        if chosen == "native":
            return torch.ops.fusedmtl.multi_tensor_add_l1_l2_penalty(
                params, grads, overwrite, l1, l2
            )
        from fusedmtl.multi_tensor import triton as triton_kernels

        return triton_kernels.l1_l2_penalty(params, grads, overwrite, l1, l2)
    return reference.l1_l2_penalty(params, grads, overwrite, l1, l2)


_NATIVE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
