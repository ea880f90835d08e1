"""Triton kernels of the regression losses: the GPU path for a CUDA torch without nvcc.

The same per-element math as csrc/losses/loss_math.h, in the same order of operations. Registered
with torch.library.custom_op (fake and autograd included), so torch.compile and opcheck work; on
the CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1), which is how CI tests
them. Values are upcast right after loading: the interpreter mis-computes bf16 arithmetic, and
fp16/bf16 compute and accumulate in fp32 anyway.

Reductions write one partial sum per program and add the partials with torch.sum: no atomics, so
results are the same from run to run. beta is passed as an fp64 kernel argument and a 0-dim grad_output
is read by the kernel from device memory: nothing synchronises with the host.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusedmtl.losses.autograd import register_loss_autograd

KIND_CODES = {"l1": 0, "mse": 1, "smooth_l1": 2, "huber": 3}
# Elements per program. The interpreter costs about 1 ms per program instance whatever its size
# (it runs each on numpy arrays), so it gets much larger blocks than a GPU.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK = 65536 if INTERPRETED else 4096


@triton.jit
def _loss_kernel(
    input_ptr,
    target_ptr,
    loss_ptr,
    grad_input_ptr,
    grad_target_ptr,
    grad_output_ptr,
    block_sums_ptr,
    n,
    param: tl.float64,
    inv_param: tl.float64,
    norm: tl.float64,
    KIND: tl.constexpr,
    DIVIDE: tl.constexpr,
    REDUCE: tl.constexpr,
    WRITE_LOSS: tl.constexpr,
    GRAD_INPUT: tl.constexpr,
    GRAD_TARGET: tl.constexpr,
    GRAD_TENSOR: tl.constexpr,
    L1_MEAN: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    compute = tl.float64 if FP64 else tl.float32
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(input_ptr + offsets, mask=mask, other=0).to(compute)
    y = tl.load(target_ptr + offsets, mask=mask, other=0).to(compute)
    d = x - y
    p = tl.full((), param, compute)
    inv_p = tl.full((), inv_param, compute)

    if REDUCE or WRITE_LOSS:
        if KIND == 0:
            value = tl.abs(d)
        elif KIND == 1:
            value = d * d
        else:
            z = tl.abs(d)
            quadratic = 0.5 * z * z
            if KIND == 2:
                if DIVIDE:
                    quadratic = quadratic / p
                else:
                    quadratic = quadratic * inv_p
                value = tl.where(z < p, quadratic, z - 0.5 * p)
            else:
                value = tl.where(z < p, quadratic, p * (z - 0.5 * p))
        if WRITE_LOSS:
            tl.store(loss_ptr + offsets, value.to(loss_ptr.dtype.element_ty), mask=mask)
        if REDUCE:
            tl.store(block_sums_ptr + tl.program_id(0), tl.sum(tl.where(mask, value, 0.0), axis=0))

    if GRAD_INPUT or GRAD_TARGET:
        s = tl.full((), norm, compute)
        if GRAD_TENSOR:
            g = tl.load(grad_output_ptr + offsets, mask=mask, other=0).to(compute)
        else:  # a 0-dim grad_output, read on the device
            g = tl.load(grad_output_ptr).to(compute)
            if L1_MEAN:  # autograd's mean backward divides grad_output by N in the tensor's dtype
                g = (g / n).to(grad_output_ptr.dtype.element_ty).to(compute)
        if KIND == 0:
            grad = g * ((d > 0).to(compute) - (d < 0).to(compute))
        elif KIND == 1:
            grad = s * d * g
        else:
            if KIND == 2:
                if DIVIDE:
                    inner = d / p * s * g
                else:
                    inner = d * inv_p * s * g
                outer = s * g
            else:
                inner = s * d * g
                outer = s * p * g  # grad_output last, as torch's vectorized kernel
            grad = tl.where(d <= -p, -outer, tl.where(d >= p, outer, inner))
        if GRAD_INPUT:
            tl.store(grad_input_ptr + offsets, grad.to(grad_input_ptr.dtype.element_ty), mask=mask)
        if GRAD_TARGET:
            tl.store(grad_target_ptr + offsets, (-grad).to(grad_target_ptr.dtype.element_ty), mask=mask)


def _is_power_of_two(x: float) -> bool:
    return x > 0 and math.frexp(x)[0] == 0.5


def _programs(input: Tensor, reduce: bool) -> tuple[int, Tensor | None]:
    """How many programs cover input's elements, and the buffer for their partial loss sums when
    ``reduce`` (in the compute type: float64 for float64, else float32)."""
    num_programs = max(1, triton.cdiv(input.numel(), BLOCK))
    if not reduce:
        return num_programs, None
    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    return num_programs, torch.empty(num_programs, device=input.device, dtype=dtype)


def _launch(
    input: Tensor,
    target: Tensor,
    kind: str,
    param: float,
    reduction: int,
    *,
    loss: Tensor | None = None,
    grad_input: Tensor | None = None,
    grad_target: Tensor | None = None,
    grad_output: Tensor | None = None,
    reduce: bool = False,
) -> Tensor | None:
    """Runs the kernel over input and target (contiguous, same shape and dtype); returns the
    per-program loss sums when ``reduce``."""
    if kind == "smooth_l1" and param == 0:
        kind = "l1"
    n = input.numel()
    num_programs, block_sums = _programs(input, reduce)
    fp64 = input.dtype == torch.float64
    factor = 2.0 if kind == "mse" else 1.0
    norm = factor / n if reduction == 1 and n > 0 else factor
    dummy = input  # pointer arguments that a specialisation never touches
    _loss_kernel[(num_programs,)](
        input,
        target,
        loss if loss is not None else dummy,
        grad_input if grad_input is not None else dummy,
        grad_target if grad_target is not None else dummy,
        grad_output if grad_output is not None else dummy,
        block_sums if block_sums is not None else dummy,
        n,
        float(param),
        1.0 / param if param else 0.0,
        norm,
        KIND=KIND_CODES[kind],
        DIVIDE=kind == "smooth_l1" and not _is_power_of_two(param),
        REDUCE=reduce,
        WRITE_LOSS=loss is not None,
        GRAD_INPUT=grad_input is not None,
        GRAD_TARGET=grad_target is not None,
        GRAD_TENSOR=grad_output is not None and grad_output.dim() > 0,
        L1_MEAN=kind == "l1" and reduction == 1,
        FP64=fp64,
        BLOCK=BLOCK,
    )
    return block_sums


def _reduced(block_sums: Tensor, n: int, reduction: int, dtype: torch.dtype) -> Tensor:
    total = block_sums.sum()
    return (total / n if reduction == 1 else total).to(dtype)  # mean of nothing: 0 / 0 = nan


def _checked(input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    if input.shape != target.shape or input.dtype != target.dtype:
        raise RuntimeError(
            "fusedmtl triton loss: input and target must have the same shape and dtype, got "
            f"{tuple(input.shape)} {input.dtype} and {tuple(target.shape)} {target.dtype}"
        )
    return input.contiguous(), target.contiguous()


@torch.library.custom_op("fusedmtl::triton_regression_loss", mutates_args=())
def regression_loss(input: Tensor, target: Tensor, kind: str, param: float, reduction: int) -> Tensor:
    """Same contract as ``torch.ops.fusedmtl.regression_loss``, run by Triton."""
    input, target = _checked(input, target)
    if reduction == 0:
        loss = torch.empty_like(input)
        _launch(input, target, kind, param, reduction, loss=loss)
        return loss
    block_sums = _launch(input, target, kind, param, reduction, reduce=True)
    return _reduced(block_sums, input.numel(), reduction, input.dtype)


@regression_loss.register_fake
def _(input, target, kind, param, reduction):
    return input.new_empty(input.shape if reduction == 0 else ())


@torch.library.custom_op("fusedmtl::triton_regression_loss_backward", mutates_args=())
def regression_loss_backward(
    grad_output: Tensor,
    input: Tensor,
    target: Tensor,
    kind: str,
    param: float,
    reduction: int,
    input_grad: bool,
    target_grad: bool,
) -> tuple[Tensor, Tensor]:
    """Same contract as ``torch.ops.fusedmtl.regression_loss_backward``, run by Triton."""
    input, target = _checked(input, target)
    grad_output = grad_output.to(input.dtype).contiguous()
    if reduction != 0:
        grad_output = grad_output.reshape(())
    grad_input = torch.empty_like(input) if input_grad else input.new_empty(0)
    grad_target = torch.empty_like(input) if target_grad else input.new_empty(0)
    _launch(
        input, target, kind, param, reduction,
        grad_input=grad_input if input_grad else None,
        grad_target=grad_target if target_grad else None,
        grad_output=grad_output,
    )
    return grad_input, grad_target


@regression_loss_backward.register_fake
def _(grad_output, input, target, kind, param, reduction, input_grad, target_grad):
    def new_grad(wanted):
        return input.new_empty(input.shape) if wanted else input.new_empty(0)

    return new_grad(input_grad), new_grad(target_grad)


register_loss_autograd(
    "fusedmtl::triton_regression_loss", torch.ops.fusedmtl.triton_regression_loss_backward
)
