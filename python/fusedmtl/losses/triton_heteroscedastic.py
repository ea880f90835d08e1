"""Triton kernel of the heteroscedastic losses (the GPU path for a CUDA torch without nvcc).

The per-element math of csrc/losses/heteroscedastic_math.h, launched and registered like the
regression losses of triton.py (custom_op with fake and autograd, one partial sum per
program added by torch.sum, values upcast right after loading, nothing read on the host).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusedmtl.losses.autograd import register_heteroscedastic_autograd
from fusedmtl.losses.triton import BLOCK, _is_power_of_two, _programs, _reduced

KIND_CODES = {"l1": 0, "l2": 1, "smooth_l1": 2}  # LossKind of the base loss, as in C++


@triton.jit
def _heteroscedastic_kernel(
    input_ptr,
    target_ptr,
    log_var_ptr,
    loss_ptr,
    grad_input_ptr,
    grad_log_var_ptr,
    grad_output_ptr,
    block_sums_ptr,
    n,
    beta: tl.float64,
    inv_beta: tl.float64,
    norm: tl.float64,
    KIND: tl.constexpr,
    DIVIDE: tl.constexpr,
    REDUCE: tl.constexpr,
    WRITE_LOSS: tl.constexpr,
    GRAD_INPUT: tl.constexpr,
    GRAD_LOG_VAR: tl.constexpr,
    GRAD_TENSOR: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    compute = tl.float64 if FP64 else tl.float32
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(input_ptr + offsets, mask=mask, other=0).to(compute)
    y = tl.load(target_ptr + offsets, mask=mask, other=0).to(compute)
    s = tl.load(log_var_ptr + offsets, mask=mask, other=0).to(compute)
    d = x - y
    b = tl.full((), beta, compute)
    precision = tl.exp(-s)

    # base loss b(d), the slope w * b'(d) and the leading factor w
    if KIND == 0:
        base = tl.abs(d)
        slope = (d > 0).to(compute) - (d < 0).to(compute)  # sign, 0 at 0 and NaN
        weight = 1.0
    elif KIND == 1:
        base = d * d
        slope = d
        weight = 0.5
    else:
        z = tl.abs(d)
        if DIVIDE:
            quadratic = 0.5 * z * z / b
            inner = d / b
        else:
            inv_b = tl.full((), inv_beta, compute)
            quadratic = 0.5 * z * z * inv_b
            inner = d * inv_b
        base = tl.where(z < b, quadratic, z - 0.5 * b)
        slope = tl.where(d <= -b, -1.0, tl.where(d >= b, 1.0, inner))
        weight = 1.0

    if REDUCE or WRITE_LOSS:
        value = weight * (precision * base + s)
        if WRITE_LOSS:
            tl.store(loss_ptr + offsets, value.to(loss_ptr.dtype.element_ty), mask=mask)
        if REDUCE:
            tl.store(block_sums_ptr + tl.program_id(0), tl.sum(tl.where(mask, value, 0.0), axis=0))

    if GRAD_INPUT or GRAD_LOG_VAR:
        if GRAD_TENSOR:
            g = tl.load(grad_output_ptr + offsets, mask=mask, other=0).to(compute)
        else:  # a 0-dim grad_output, read on the device
            g = tl.load(grad_output_ptr).to(compute)
        scale = g * tl.full((), norm, compute)
        if GRAD_INPUT:
            grad = scale * (precision * slope)
            tl.store(grad_input_ptr + offsets, grad.to(grad_input_ptr.dtype.element_ty), mask=mask)
        if GRAD_LOG_VAR:
            grad_s = scale * (weight * (1.0 - precision * base))
            tl.store(grad_log_var_ptr + offsets, grad_s.to(grad_log_var_ptr.dtype.element_ty), mask=mask)


def _launch(
    input: Tensor,
    target: Tensor,
    log_var: Tensor,
    kind: str,
    beta: float,
    reduction: int,
    *,
    loss: Tensor | None = None,
    grad_input: Tensor | None = None,
    grad_log_var: Tensor | None = None,
    grad_output: Tensor | None = None,
    reduce: bool = False,
) -> Tensor | None:
    """Runs the kernel (contiguous operands of one shape and dtype); returns the per-program loss
    sums when ``reduce``."""
    if kind not in KIND_CODES:
        raise ValueError(f"unknown heteroscedastic loss kind {kind!r}; expected one of {tuple(KIND_CODES)}")
    if beta < 0:
        raise RuntimeError("heteroscedastic_loss does not support negative values for beta.")
    if kind == "smooth_l1" and beta == 0:
        kind = "l1"
    n = input.numel()
    num_programs, block_sums = _programs(input, reduce)
    fp64 = input.dtype == torch.float64
    dummy = input  # pointer arguments that a specialisation never touches
    _heteroscedastic_kernel[(num_programs,)](
        input,
        target,
        log_var,
        loss if loss is not None else dummy,
        grad_input if grad_input is not None else dummy,
        grad_log_var if grad_log_var is not None else dummy,
        grad_output if grad_output is not None else dummy,
        block_sums if block_sums is not None else dummy,
        n,
        float(beta),
        1.0 / beta if beta else 0.0,
        1.0 / n if reduction == 1 and n > 0 else 1.0,
        KIND=KIND_CODES[kind],
        DIVIDE=kind == "smooth_l1" and not _is_power_of_two(beta),
        REDUCE=reduce,
        WRITE_LOSS=loss is not None,
        GRAD_INPUT=grad_input is not None,
        GRAD_LOG_VAR=grad_log_var is not None,
        GRAD_TENSOR=grad_output is not None and grad_output.dim() > 0,
        FP64=fp64,
        BLOCK=BLOCK,
    )
    return block_sums


def _checked(input: Tensor, target: Tensor, log_var: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if not (input.shape == target.shape == log_var.shape) or not (
        input.dtype == target.dtype == log_var.dtype
    ):
        raise RuntimeError(
            "fusedmtl triton heteroscedastic loss: input, target and log_var must have the same "
            f"shape and dtype, got {tuple(input.shape)} {input.dtype}, {tuple(target.shape)} "
            f"{target.dtype} and {tuple(log_var.shape)} {log_var.dtype}"
        )
    return input.contiguous(), target.contiguous(), log_var.contiguous()


@torch.library.custom_op("fusedmtl::triton_heteroscedastic_loss", mutates_args=())
def heteroscedastic_loss(
    input: Tensor, target: Tensor, log_var: Tensor, kind: str, beta: float, reduction: int
) -> Tensor:
    """Same contract as ``torch.ops.fusedmtl.heteroscedastic_loss``, run by Triton."""
    input, target, log_var = _checked(input, target, log_var)
    if reduction == 0:
        loss = torch.empty_like(input)
        _launch(input, target, log_var, kind, beta, reduction, loss=loss)
        return loss
    block_sums = _launch(input, target, log_var, kind, beta, reduction, reduce=True)
    return _reduced(block_sums, input.numel(), reduction, input.dtype)


@heteroscedastic_loss.register_fake
def _(input, target, log_var, kind, beta, reduction):
    return input.new_empty(input.shape if reduction == 0 else ())


@torch.library.custom_op("fusedmtl::triton_heteroscedastic_loss_backward", mutates_args=())
def heteroscedastic_loss_backward(
    grad_output: Tensor,
    input: Tensor,
    target: Tensor,
    log_var: Tensor,
    kind: str,
    beta: float,
    reduction: int,
    input_grad: bool,
    log_var_grad: bool,
) -> tuple[Tensor, Tensor]:
    """Same contract as ``torch.ops.fusedmtl.heteroscedastic_loss_backward``, run by Triton."""
    input, target, log_var = _checked(input, target, log_var)
    grad_output = grad_output.to(input.dtype).contiguous()
    if reduction != 0:
        grad_output = grad_output.reshape(())
    grad_input = torch.empty_like(input) if input_grad else input.new_empty(0)
    grad_log_var = torch.empty_like(input) if log_var_grad else input.new_empty(0)
    _launch(
        input, target, log_var, kind, beta, reduction,
        grad_input=grad_input if input_grad else None,
        grad_log_var=grad_log_var if log_var_grad else None,
        grad_output=grad_output,
    )
    return grad_input, grad_log_var


@heteroscedastic_loss_backward.register_fake
def _(grad_output, input, target, log_var, kind, beta, reduction, input_grad, log_var_grad):
    def new_grad(wanted):
        return input.new_empty(input.shape) if wanted else input.new_empty(0)

    return new_grad(input_grad), new_grad(log_var_grad)


register_heteroscedastic_autograd(
    "fusedmtl::triton_heteroscedastic_loss", torch.ops.fusedmtl.triton_heteroscedastic_loss_backward
)
