"""Drop-in replacements for torch.nn.functional's regression losses, with fused kernels.

Same signatures, defaults, broadcasting (and its warning), dtype rules, results and errors as the
torch.nn.functional functions; which implementation runs is chosen by :mod:`fusedmtl.backend`.
"""

from __future__ import annotations

import inspect
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import _reduction
from torch.overrides import handle_torch_function, has_torch_function_variadic

from fusedmtl import backend
from fusedmtl.losses import reference
from fusedmtl.losses.kinds import REGRESSION_KINDS

if backend._C is not None:
    from fusedmtl.losses import native  # noqa: F401  (fake and autograd registrations)

__all__ = ["smooth_l1_loss", "huber_loss", "l1_loss", "mse_loss"]


def smooth_l1_loss(
    input: Tensor,
    target: Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    beta: float = 1.0,
) -> Tensor:
    """Smooth-L1 loss (Girshick, Fast R-CNN 2015): 0.5 d^2 / beta if |d| < beta else |d| - 0.5 beta,
    d = input - target (docs/METHODS.md, section 1). Drop-in for
    :func:`torch.nn.functional.smooth_l1_loss`.

    Args:
        input, target: broadcastable tensors of float32, float64, float16 or bfloat16 (mixed
            dtypes promote as in torch; float16 and bfloat16 are computed in float32 and the
            result rounded once).
        size_average, reduce: torch's deprecated reduction arguments, honoured as there.
        reduction: 'none' | 'mean' | 'sum'.
        beta: the threshold, >= 0; beta == 0 is exactly the L1 loss.

    Returns:
        The element-wise loss of the broadcast shape (reduction='none') or a 0-dim tensor, of the
        promoted dtype.
    """
    return _drop_in(smooth_l1_loss, input, target, reduction, beta, None, size_average, reduce)


def huber_loss(
    input: Tensor,
    target: Tensor,
    reduction: str = "mean",
    delta: float = 1.0,
    weight: Tensor | None = None,
) -> Tensor:
    """Huber loss: 0.5 d^2 if |d| < delta else delta (|d| - 0.5 delta), d = input - target
    (docs/METHODS.md, section 1). Drop-in for :func:`torch.nn.functional.huber_loss`.

    Args:
        input, target: broadcastable tensors of float32, float64, float16 or bfloat16 (computed in
            input's dtype, as torch; float16 and bfloat16 in float32, rounded once).
        reduction: 'none' | 'mean' | 'sum'.
        delta: the threshold, > 0.
        weight: optional element-wise weights of input's size (computed by the reference path).

    Returns:
        The element-wise loss of the broadcast shape (reduction='none') or a 0-dim tensor, of
        input's dtype.
    """
    return _drop_in(huber_loss, input, target, reduction, delta, weight)


def l1_loss(
    input: Tensor,
    target: Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    weight: Tensor | None = None,
) -> Tensor:
    """L1 loss |d|, d = input - target (docs/METHODS.md, section 1). Drop-in for
    :func:`torch.nn.functional.l1_loss`.

    Args:
        input, target: broadcastable tensors of float32, float64, float16 or bfloat16 (mixed
            dtypes promote as in torch; float16 and bfloat16 are computed in float32 and the
            result rounded once).
        size_average, reduce: torch's deprecated reduction arguments, honoured as there.
        reduction: 'none' | 'mean' | 'sum'.
        weight: optional element-wise weights of input's size (computed by the reference path).

    Returns:
        The element-wise loss of the broadcast shape (reduction='none') or a 0-dim tensor, of the
        promoted dtype.
    """
    return _drop_in(l1_loss, input, target, reduction, None, weight, size_average, reduce)


def mse_loss(
    input: Tensor,
    target: Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    weight: Tensor | None = None,
) -> Tensor:
    """Squared error d^2, d = input - target (docs/METHODS.md, section 1). Drop-in for
    :func:`torch.nn.functional.mse_loss`.

    Args:
        input, target: broadcastable tensors of float32, float64, float16 or bfloat16 (mixed
            dtypes promote as in torch; float16 and bfloat16 are computed in float32 and the
            result rounded once).
        size_average, reduce: torch's deprecated reduction arguments, honoured as there.
        reduction: 'none' | 'mean' | 'sum'.
        weight: optional element-wise weights of input's size (computed by the reference path).

    Returns:
        The element-wise loss of the broadcast shape (reduction='none') or a 0-dim tensor, of the
        promoted dtype.
    """
    return _drop_in(mse_loss, input, target, reduction, None, weight, size_average, reduce)


def _drop_in(
    public,
    input: Tensor,
    target: Tensor,
    reduction: str,
    param: float | None,
    weight: Tensor | None,
    size_average: bool | None = None,
    reduce: bool | None = None,
) -> Tensor:
    """The body of the public losses: torch's steps before the loss itself, then the loss.

    The four functions above spell out torch's signatures (a test holds them to torch's) and pass
    their arguments here, positionally (keywords would cost a dict per call); their row of the
    kinds table says the rest.

    Args:
        public: the public function called (``l1_loss``, ...); its name is a key of
            ``_SIGNATURES``.
        input, target, reduction, size_average, reduce: its arguments.
        param: its parameter (beta, delta), None for the kinds without one.
        weight: its element-wise weights, None where it takes none (smooth_l1_loss).

    Returns:
        The loss, as :func:`_regression_loss` computes it, or what a ``__torch_function__``
        override of input, target or weight returns (called as torch calls it: input and target
        positional, the others by keyword in the signature's order).
    """
    row, names, weighted = _SIGNATURES[public.__name__]
    tensors = (input, target, weight) if weighted else (input, target)
    if has_torch_function_variadic(*tensors):
        given = {
            "size_average": size_average,
            "reduce": reduce,
            "reduction": reduction,
            row.param_name: param,
            "weight": weight,
        }
        return handle_torch_function(
            public, tensors, input, target, **{name: given[name] for name in names}
        )
    kind = row.name
    if param is None:
        param = 0.0
    elif param < 0 or (param == 0 and row.at_zero is None):
        rule = "negative" if row.at_zero is not None else "non-positive"
        raise RuntimeError(f"{row.function} does not support {rule} values for {row.param_name}.")
    elif param == 0:
        kind = row.at_zero
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    return _regression_loss(kind, input, target, reduction, param, weight)


_REDUCED = {"mean": 1, "sum": 2}
_EAGER_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _regression_loss(
    kind: str, input: Tensor, target: Tensor, reduction: str, param: float, weight: Tensor | None
) -> Tensor:
    # The common training case first, with as little Python as possible: at 1M elements every
    # interpreter step after the previous kernel runs on flushed caches and shows in the step time.
    if weight is None and reduction in _REDUCED and _eager_fast_path(input, target):
        return torch.ops.fusedmtl.regression_loss_eager(
            input, target, kind, param, _REDUCED[reduction]
        )
    reduction_code = _reduction.get_enum(reduction)  # ValueError for an unknown reduction
    if input.device != target.device:
        raise _device_mismatch(input=input, target=target)
    # torch's dtype rules: huber_loss computes in input's dtype, the others in the promoted one
    # (torch broadcasts first, so a 0-dim target promotes like any other tensor).
    dtype = input.dtype if kind == "huber" else torch.promote_types(input.dtype, target.dtype)
    if not dtype.is_floating_point:
        if target.dtype.is_floating_point:  # huber of an integer input
            raise RuntimeError(
                f"result type {target.dtype} can't be cast to the desired output type {dtype}"
            )
        if (
            kind != "l1"
        ):  # l1_loss of integers works in torch for 'none' and 'sum': the reference does that
            raise NotImplementedError(f"\"{kind}_loss\" not implemented for '{dtype}'")
        return reference.regression_loss(
            *torch.broadcast_tensors(input, target), kind, param, reduction
        )
    if kind == "huber" and target.dtype != dtype:
        # torch computes this in input's dtype but its backward rejects the mixed dtypes: its own
        # function behaves exactly like that (and such a loss is no training case to fuse)
        return F.huber_loss(input, target, reduction=reduction, delta=param, weight=weight)
    input, target = input.to(dtype), target.to(dtype)  # no-ops when the dtype is already right
    if target.shape != input.shape:
        warnings.warn(
            f"Using a target size ({target.size()}) that is different to the input size "
            f"({input.size()}). This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.",
            stacklevel=4,  # the caller of the public function (through _drop_in)
        )
        input, target = torch.broadcast_tensors(input, target)

    if weight is not None:
        return _weighted_loss(kind, input, target, reduction, param, weight)
    chosen = _chosen_backend(input.device)
    if chosen == "native":
        if reduction_code != 0 and _eager_gradient_wanted(input, target):
            return torch.ops.fusedmtl.regression_loss_eager(
                input, target, kind, param, reduction_code
            )
        return torch.ops.fusedmtl.regression_loss(input, target, kind, param, reduction_code)
    if chosen == "triton":
        from fusedmtl.losses import triton  # noqa: F401  (registers the op on first use)

        return torch.ops.fusedmtl.triton_regression_loss(input, target, kind, param, reduction_code)
    return reference.regression_loss(input, target, kind, param, reduction)


def _device_mismatch(**operands: Tensor) -> RuntimeError:
    """torch's error for operands (by name, in order) that are not all on one device."""
    found = [f"{name} on {t.device}" for name, t in operands.items()]
    return RuntimeError(
        "Expected all tensors to be on the same device, but found "
        f"{', '.join(found[:-1])} and {found[-1]}"
    )


def _chosen_backend(device: torch.device) -> str:
    """The backend that runs a loss on ``device``: :func:`fusedmtl.backend.select`'s, but the
    reference under torch.func transforms (grad, vmap, jacrev), which do not support ops whose
    autograd is registered with torch.library.register_autograd yet."""
    chosen = backend.select(device)
    if torch._C._are_functorch_transforms_active():
        return "reference"
    return chosen


def _eager_fast_path(input: Tensor, target: Tensor) -> bool:
    """Whether the arguments need no promotion, broadcasting or checks beyond the op's own and
    the eager fast path applies: what the general path below would conclude, decided cheaply."""
    return (
        input.dtype is target.dtype
        and input.is_cpu
        and target.is_cpu
        and input.shape == target.shape
        and (input.requires_grad or target.requires_grad)
        and input.dtype in _EAGER_DTYPES
        and type(input) is Tensor
        and type(target) is Tensor
        and torch.is_grad_enabled()
        and backend.cpu_runs_native()
        and not torch._C._are_functorch_transforms_active()
        and not torch.compiler.is_compiling()
    )


def _eager_gradient_wanted(input: Tensor, *others: Tensor) -> bool:
    """Whether the eager fast path (gradient computed in forward) applies to a loss of input and
    the other operands (on input's device)."""
    operands = (input, *others)
    return (
        torch.is_grad_enabled()
        and any(t.requires_grad for t in operands)
        and input.device.type == "cpu"
        and all(type(t) is Tensor for t in operands)
        and not torch.compiler.is_compiling()
    )


def _weighted_loss(
    kind: str, input: Tensor, target: Tensor, reduction: str, param: float, weight: Tensor
) -> Tensor:
    # torch.nn.functional's element-wise weights, with its normalisation: l1 and mse divide the
    # weighted sum by the sum of the weights for 'mean', huber takes the plain mean.
    if weight.size() != input.size():
        raise ValueError("Weights and input must have the same size.")
    weighted = reference.regression_loss(input, target, kind, param, "none") * weight
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return torch.sum(weighted)
    if kind == "huber":
        return weighted.mean()
    return torch.sum(weighted) / torch.sum(weight)


def _signature(function) -> tuple:
    """(function's row of the kinds table, its argument names after input and target, whether it
    takes weight)."""
    row = next(k for k in REGRESSION_KINDS if k.function == function.__name__)
    names = tuple(inspect.signature(function).parameters)[2:]
    return row, names, "weight" in names


# By name: a wrapped or patched public function still finds its row.
_SIGNATURES = {f.__name__: _signature(f) for f in (smooth_l1_loss, huber_loss, l1_loss, mse_loss)}
