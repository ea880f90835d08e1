"""Fake (meta), autograd and vmap registrations of the loss ops, shared by every compiled backend
(native and triton) and both families (regression and heteroscedastic losses).

A loss op has the schema ``(*operands, kind, param, reduction) -> loss`` with operands
(input, target) or (input, target, log_var); its backward op ``(grad_output, *operands, kind,
param, reduction, first_grad, second_grad) -> (grad_first, grad_second)`` recomputes the gradients
from the operands in one pass with grad_output folded in. grad_second is the target's gradient
(regression) or log_var's (heteroscedastic, whose target gradient is -grad_input). Under
create_graph=True the differentiable formula of ``reference`` runs instead, so that double
backward gives torch's results.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.losses import reference

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
REDUCTION_NAMES = {value: name for name, value in REDUCTIONS.items()}


def is_batched(t: Tensor) -> bool:
    """Whether t is wrapped by a vmap (autograd's own, which is_grads_batched=True and
    jacobian(vectorize=True) use, or torch.func's): such a tensor has no value to read."""
    functorch = torch._C._functorch
    return functorch.is_legacy_batchedtensor(t) or functorch.is_functorch_wrapped_tensor(t)


def unmodified(saved: list[tuple[Tensor, int]]) -> list[Tensor]:
    """Tensors kept with their versions at forward, checked not to have been modified in place."""
    for t, version in saved:
        if t._version != version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an "
                f"inplace operation: [{t.type()} {list(t.shape)}] is at version {t._version}; "
                f"expected version {version} instead (double backward of an l1_loss)"
            )
    return [t for t, _ in saved]


def new_grad(input: Tensor, wanted: bool) -> Tensor:
    """A gradient buffer of input's shape, or the empty tensor that stands for "not wanted"."""
    return input.new_empty(input.shape) if wanted else input.new_empty(0)


def loss_fake(input: Tensor, *rest) -> Tensor:
    """Fake of a loss op: the element-wise loss or a 0-dim one (reduction is the last argument)."""
    return input.new_empty(input.shape if rest[-1] == 0 else ())


def backward_fake(grad_output: Tensor, input: Tensor, *rest) -> tuple[Tensor, Tensor]:
    """Fake of a backward op (the wanted flags are its last two arguments)."""
    return new_grad(input, rest[-2]), new_grad(input, rest[-1])


def with_grad_fake(input: Tensor, *rest) -> tuple[Tensor, Tensor, Tensor]:
    """Fake of a forward-with-gradients op: (0-dim loss, grad_first, grad_second)."""
    return input.new_empty(()), new_grad(input, rest[-2]), new_grad(input, rest[-1])


def loss_backward(
    backward_op,
    grad_output: Tensor,
    operands: tuple[Tensor, ...],
    kind: str,
    param: float,
    reduction: int,
    needs_grad: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:
    """The gradients of a loss op w.r.t. each operand, None where ``needs_grad`` is False."""
    heteroscedastic = len(operands) == 3
    if heteroscedastic:
        needs_input, needs_target, needs_log_var = needs_grad
        first_wanted, second_wanted = needs_input or needs_target, needs_log_var
    else:
        first_wanted, second_wanted = needs_grad
    if torch.is_grad_enabled():
        reduction_name = REDUCTION_NAMES[reduction]
        if heteroscedastic:
            first, second = reference.heteroscedastic_grad(
                grad_output, *operands, kind, param, reduction_name
            )
        else:
            first = reference.regression_loss_grad(
                grad_output, *operands, kind, param, reduction_name
            )
            second = -first if second_wanted else None
    else:
        first, second = backward_op(
            grad_output, *operands, kind, param, reduction, first_wanted, second_wanted
        )
    if heteroscedastic:
        return (
            first if needs_input else None,
            -first if needs_target else None,
            second if needs_log_var else None,
        )
    return (first if first_wanted else None), (second if second_wanted else None)


def _backward_vmap(backward_op):
    """vmap rule of a backward op: one call per batch entry, stacked. It runs when a batched
    grad_output flows into the backward (autograd.grad(is_grads_batched=True),
    jacobian(vectorize=True)); each call sees plain tensors, so no value is read on the host."""

    def rule(info, in_dims, *args):
        batch = info.batch_size
        tensors = [
            (a.movedim(d, 0) if d is not None else None) if isinstance(a, Tensor) else None
            for a, d in zip(args, in_dims)
        ]
        outputs = []
        for i in range(batch):
            call = [t[i] if t is not None else a for t, a in zip(tensors, args)]
            outputs.append(backward_op(*call))
        return tuple(torch.stack(parts) for parts in zip(*outputs)), (0, 0)

    return rule


def register_loss_op(forward_op: str, backward_op: str, with_grad_op: str | None = None) -> None:
    """Fakes, autograd and vmap for a loss op, its backward op and (native) its with-grad op."""
    for name, fake in (
        (forward_op, loss_fake),
        (backward_op, backward_fake),
        (with_grad_op, with_grad_fake),
    ):
        if name is not None:
            torch.library.register_fake(name, fake)
    backward_callable = _op(backward_op)
    torch.library.register_vmap(backward_op, _backward_vmap(backward_callable))

    heteroscedastic = "heteroscedastic" in forward_op

    def setup_context(ctx, inputs, output):
        *operands, kind, param, reduction = inputs
        ctx.config = (kind, param, reduction)
        # L1 keeps d = input - target, as torch's l1_loss does: input and target may then be
        # edited in place after forward (an extra subtraction, on this path only)
        is_l1 = not heteroscedastic and (kind == "l1" or (kind == "smooth_l1" and param == 0))
        ctx.difference = reference.l1_difference(*operands) if is_l1 else None
        ctx.dtype = operands[0].dtype
        if ctx.difference is None:
            ctx.save_for_backward(*operands)
        else:  # for double backward only, which differentiates through them (checked versions)
            ctx.operands = [(t, t._version) for t in operands]

    def backward(ctx, grad_output):
        if ctx.difference is not None and not torch.is_grad_enabled():
            grad = reference.l1_grad(
                grad_output, ctx.difference, REDUCTION_NAMES[ctx.config[2]], ctx.dtype
            )
            needs_input, needs_target = ctx.needs_input_grad[:2]
            return (
                (grad if needs_input else None),
                (-grad if needs_target else None),
                None,
                None,
                None,
            )
        # the saved operands, or L1's (double backward) checked against in-place edits
        operands = ctx.saved_tensors if ctx.difference is None else unmodified(ctx.operands)
        grads = loss_backward(
            backward_callable,
            grad_output,
            operands,
            *ctx.config,
            tuple(ctx.needs_input_grad[: len(operands)]),
        )
        return *grads, None, None, None

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


def _op(name: str):
    namespace, op = name.split("::")
    return getattr(getattr(torch.ops, namespace), op).default
