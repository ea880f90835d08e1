"""Triton kernels of the losses (the GPU path for a CUDA torch without nvcc): the regression losses
and the heteroscedastic ones, two kernels sharing their launch code and op registrations.

The same per-element math as csrc/losses/loss_math.h and heteroscedastic_math.h, in the same order
of operations, and rounded the same way on a GPU as on the CPU: fp32 division is the correctly
rounded ``tl.div_rn`` (a plain ``/`` compiles to an approximate division), exp(-s) is the CPU
kernels' polynomial (``tl.exp`` compiles to the approximate ex2), and every launch passes
``enable_fp_fusion=False`` so that no multiply-add is fused into an FMA (tests/losses/
test_triton_rounding.py reads the PTX). On the CPU the kernels run under the Triton interpreter
(TRITON_INTERPRET=1), which is how CI tests them. Values are upcast right after loading: the
interpreter mis-computes bf16 arithmetic, and fp16/bf16 compute and accumulate in fp32 anyway.

Every entry is a torch custom op (fusedmtl::triton_*) with a fake and autograd (autograd.py), run
under a device guard for its operands' device. Reductions write one partial sum per program and
add the partials with torch.sum: no atomics, so results are the same from run to run. The
parameter is an fp64 kernel argument and a 0-dim grad_output is read by the kernel from device
memory: nothing synchronises with the host.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusedmtl.backend import device_guard
from fusedmtl.losses.autograd import register_loss_op
from fusedmtl.losses.kinds import (
    HETEROSCEDASTIC_KINDS,
    REGRESSION_KINDS,
    check_heteroscedastic,
    regression_kind,
)

KIND_CODES = {k.name: k.code for k in REGRESSION_KINDS}
HETEROSCEDASTIC_CODES = {k.name: k.code for k in HETEROSCEDASTIC_KINDS}  # of the base loss
_L1 = KIND_CODES["l1"]
_MSE = KIND_CODES["mse"]
_SMOOTH_L1 = KIND_CODES["smooth_l1"]
# Elements per program. The interpreter costs about 1 ms per program instance whatever its size
# (it runs each on numpy arrays), so it gets much larger blocks than a GPU.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK = 65536 if INTERPRETED else 4096
# Options of every launch (and of triton.compile in the resource and rounding checks).
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _divide(x, y, FP64: tl.constexpr):
    """x / y correctly rounded (fp64 division always is; fp32 `/` is approximate on a GPU)."""
    if FP64:
        return x / y
    else:
        return tl.div_rn(x, y)


@triton.jit
def _exp(x, FP64: tl.constexpr):
    """exp(x), the polynomial of heteroscedastic_math.h's exp_of, operation for operation (with
    fusion off), so that it rounds as the CPU kernels do: Cephes' expf for fp32, a degree-13
    Taylor series for fp64, scaled by 2^n in two halves."""
    if FP64:
        c = tl.float64
        x = tl.where(x > 710.0, 710.0, tl.where(x < -746.0, -746.0, x))
        shift = tl.full((), 6755399441055744.0, c)  # 0x1.8p52
        shifted = x * tl.full((), 1.4426950408889634074, c) + shift
        n = shifted - shift
        r = (x - n * tl.full((), 0.693147180369123816490, c)) - n * tl.full(
            (), 1.90821492927058770002e-10, c
        )
        p = tl.full((), 1.0 / 6227020800.0, c)
        p = p * r + tl.full((), 1.0 / 479001600.0, c)
        p = p * r + tl.full((), 1.0 / 39916800.0, c)
        p = p * r + tl.full((), 1.0 / 3628800.0, c)
        p = p * r + tl.full((), 1.0 / 362880.0, c)
        p = p * r + tl.full((), 1.0 / 40320.0, c)
        p = p * r + tl.full((), 1.0 / 5040.0, c)
        p = p * r + tl.full((), 1.0 / 720.0, c)
        p = p * r + tl.full((), 1.0 / 120.0, c)
        p = p * r + tl.full((), 1.0 / 24.0, c)
        p = p * r + tl.full((), 1.0 / 6.0, c)
        p = p * r + tl.full((), 0.5, c)
        exp_r = p * (r * r) + r + tl.full((), 1.0, c)
        n_int = shifted.to(tl.int64, bitcast=True) - shift.to(tl.int64, bitcast=True)
        half = ((n_int + 2048) >> 1) - 1024
        scale_a = ((half + 1023) << 52).to(tl.float64, bitcast=True)
        scale_b = ((n_int - half + 1023) << 52).to(tl.float64, bitcast=True)
    else:
        c = tl.float32
        x = tl.where(x > 89.0, 89.0, tl.where(x < -104.0, -104.0, x))
        shift = tl.full((), 12582912.0, c)  # 0x1.8p23
        shifted = x * tl.full((), 1.44269504088896341, c) + shift
        n = shifted - shift
        r = (x - n * tl.full((), 0.693359375, c)) - n * tl.full((), -2.12194440e-4, c)
        p = tl.full((), 1.9875691500e-4, c)
        p = p * r + tl.full((), 1.3981999507e-3, c)
        p = p * r + tl.full((), 8.3334519073e-3, c)
        p = p * r + tl.full((), 4.1665795894e-2, c)
        p = p * r + tl.full((), 1.6666665459e-1, c)
        p = p * r + tl.full((), 5.0000001201e-1, c)
        exp_r = p * (r * r) + r + tl.full((), 1.0, c)
        n_int = shifted.to(tl.int32, bitcast=True) - shift.to(tl.int32, bitcast=True)
        half = n_int >> 1
        scale_a = ((half + 127) << 23).to(tl.float32, bitcast=True)
        scale_b = ((n_int - half + 127) << 23).to(tl.float32, bitcast=True)
    return exp_r * scale_a * scale_b


@triton.jit
def _grad_output(grad_output_ptr, offsets, mask, compute, GRAD_TENSOR: tl.constexpr):
    if GRAD_TENSOR:
        return tl.load(grad_output_ptr + offsets, mask=mask, other=0).to(compute)
    else:  # a 0-dim grad_output, read on the device
        return tl.load(grad_output_ptr).to(compute)


@triton.jit
def _store_loss(
    value, loss_ptr, block_sums_ptr, offsets, mask, WRITE_LOSS: tl.constexpr, REDUCE: tl.constexpr
):
    """The element-wise loss where it is asked for, and the program's sum of it for a reduction."""
    if WRITE_LOSS:
        tl.store(loss_ptr + offsets, value.to(loss_ptr.dtype.element_ty), mask=mask)
    if REDUCE:
        tl.store(block_sums_ptr + tl.program_id(0), tl.sum(tl.where(mask, value, 0.0), axis=0))


@triton.jit
def _regression_loss_kernel(
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
                    quadratic = _divide(quadratic, p, FP64)
                else:
                    quadratic = quadratic * inv_p
                value = tl.where(z < p, quadratic, z - 0.5 * p)
            else:
                value = tl.where(z < p, quadratic, p * (z - 0.5 * p))
        _store_loss(value, loss_ptr, block_sums_ptr, offsets, mask, WRITE_LOSS, REDUCE)

    if GRAD_INPUT or GRAD_TARGET:
        s = tl.full((), norm, compute)
        g = _grad_output(grad_output_ptr, offsets, mask, compute, GRAD_TENSOR)
        if L1_MEAN:  # autograd's mean backward divides grad_output by N in the tensor's dtype
            g = _divide(g, n.to(compute), FP64).to(grad_output_ptr.dtype.element_ty).to(compute)
        if KIND == 0:
            grad = g * ((d > 0).to(compute) - (d < 0).to(compute))
        elif KIND == 1:
            grad = s * d * g
        else:
            if KIND == 2:
                if DIVIDE:
                    inner = _divide(d, p, FP64) * s * g
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
            tl.store(
                grad_target_ptr + offsets, (-grad).to(grad_target_ptr.dtype.element_ty), mask=mask
            )


@triton.jit
def _heteroscedastic_loss_kernel(
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
    precision = _exp(-s, FP64)

    # base loss b(d), the slope w * b'(d) and the leading factor w (heteroscedastic_math.h)
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
            quadratic = _divide(0.5 * z * z, b, FP64)
            inner = _divide(d, b, FP64)
        else:
            inv_b = tl.full((), inv_beta, compute)
            quadratic = 0.5 * z * z * inv_b
            inner = d * inv_b
        base = tl.where(z < b, quadratic, z - 0.5 * b)
        slope = tl.where(inner > 1.0, 1.0, tl.where(inner < -1.0, -1.0, inner))
        weight = 1.0

    if REDUCE or WRITE_LOSS:
        value = weight * (precision * base + s)
        _store_loss(value, loss_ptr, block_sums_ptr, offsets, mask, WRITE_LOSS, REDUCE)

    if GRAD_INPUT or GRAD_LOG_VAR:
        g = _grad_output(grad_output_ptr, offsets, mask, compute, GRAD_TENSOR)
        scale = g * tl.full((), norm, compute)
        if GRAD_INPUT:
            grad = scale * (precision * slope)
            tl.store(grad_input_ptr + offsets, grad.to(grad_input_ptr.dtype.element_ty), mask=mask)
        if GRAD_LOG_VAR:
            grad_s = scale * (weight * (1.0 - precision * base))
            tl.store(
                grad_log_var_ptr + offsets, grad_s.to(grad_log_var_ptr.dtype.element_ty), mask=mask
            )


def _is_power_of_two(x: float) -> bool:
    return x > 0 and math.frexp(x)[0] == 0.5


def _launch(
    operands: tuple[Tensor, ...],
    kind: str,
    param: float,
    reduction: int,
    *,
    loss: Tensor | None = None,
    grad_first: Tensor | None = None,
    grad_second: Tensor | None = None,
    grad_output: Tensor | None = None,
) -> Tensor | None:
    """Runs the kernel of the family of ``operands`` ((input, target) or (input, target, log_var),
    contiguous, one shape and dtype) under a device guard. grad_first is the input's gradient,
    grad_second the target's (regression) or log_var's (heteroscedastic). Returns the per-program
    loss sums when neither a loss nor a gradient is asked for (a reduced forward)."""
    input = operands[0]
    heteroscedastic = len(operands) == 3
    if kind == "smooth_l1" and param == 0:
        kind = "l1"
    n = input.numel()
    reduce = loss is None and grad_first is None and grad_second is None
    num_programs = max(1, triton.cdiv(n, BLOCK))
    fp64 = input.dtype == torch.float64
    block_sums = None
    if reduce:  # in the compute type: float64 for float64, else float32
        sums_dtype = torch.float64 if fp64 else torch.float32
        block_sums = torch.empty(num_programs, device=input.device, dtype=sums_dtype)
    if heteroscedastic:
        kernel, code, factor = _heteroscedastic_loss_kernel, HETEROSCEDASTIC_CODES[kind], 1.0
    else:
        kernel, code = _regression_loss_kernel, KIND_CODES[kind]
        factor = 2.0 if code == _MSE else 1.0
    dummy = input  # pointer arguments that a specialisation never touches
    pointers = [
        *operands,
        loss if loss is not None else dummy,
        grad_first if grad_first is not None else dummy,
        grad_second if grad_second is not None else dummy,
        grad_output if grad_output is not None else dummy,
        block_sums if block_sums is not None else dummy,
    ]
    constexprs = dict(
        KIND=code,
        DIVIDE=code == _SMOOTH_L1 and not _is_power_of_two(param),
        REDUCE=reduce,
        WRITE_LOSS=loss is not None,
        GRAD_TENSOR=grad_output is not None and grad_output.dim() > 0,
        FP64=fp64,
        BLOCK=BLOCK,
    )
    if heteroscedastic:
        constexprs.update(GRAD_INPUT=grad_first is not None, GRAD_LOG_VAR=grad_second is not None)
    else:
        constexprs.update(
            GRAD_INPUT=grad_first is not None,
            GRAD_TARGET=grad_second is not None,
            L1_MEAN=code == _L1 and reduction == 1,
        )
    norm = factor / n if reduction == 1 and n > 0 else factor
    with device_guard(input.device):
        kernel[(num_programs,)](
            *pointers,
            n,
            float(param),
            1.0 / param if param else 0.0,
            norm,
            **constexprs,
            **LAUNCH_OPTIONS,
        )
    return block_sums


def _checked(op: str, *operands: Tensor) -> tuple[Tensor, ...]:
    first = operands[0]
    if any(t.shape != first.shape or t.dtype != first.dtype for t in operands[1:]):
        described = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in operands)
        raise RuntimeError(
            f"fusedmtl::{op}: the operands must have the same shape and dtype, got {described}"
        )
    return tuple(t.contiguous() for t in operands)


def _forward(op: str, operands: tuple[Tensor, ...], kind: str, param: float, reduction: int):
    operands = _checked(op, *operands)
    input = operands[0]
    if reduction == 0:
        loss = torch.empty_like(input)
        _launch(operands, kind, param, reduction, loss=loss)
        return loss
    with device_guard(input.device):
        total = _launch(operands, kind, param, reduction).sum()
        # mean of nothing: 0 / 0 = nan
        return (total / input.numel() if reduction == 1 else total).to(input.dtype)


def _backward(
    op: str,
    grad_output: Tensor,
    operands: tuple[Tensor, ...],
    kind: str,
    param: float,
    reduction: int,
    first_wanted: bool,
    second_wanted: bool,
) -> tuple[Tensor, Tensor]:
    operands = _checked(op, *operands)
    input = operands[0]
    expected = input.shape if reduction == 0 else ()
    if grad_output.numel() != math.prod(expected) or (
        reduction == 0 and grad_output.shape != input.shape
    ):
        raise RuntimeError(
            f"fusedmtl::{op}: grad_output of shape {tuple(grad_output.shape)} does not match the "
            f"loss of shape {tuple(expected)}"
        )
    grad_output = grad_output.to(input.dtype).contiguous()
    if reduction != 0:
        grad_output = grad_output.reshape(())
    grad_first = torch.empty_like(input) if first_wanted else input.new_empty(0)
    grad_second = torch.empty_like(input) if second_wanted else input.new_empty(0)
    _launch(
        operands,
        kind,
        param,
        reduction,
        grad_first=grad_first if first_wanted else None,
        grad_second=grad_second if second_wanted else None,
        grad_output=grad_output,
    )
    return grad_first, grad_second


@torch.library.custom_op("fusedmtl::triton_regression_loss", mutates_args=())
def regression_loss(
    input: Tensor, target: Tensor, kind: str, param: float, reduction: int
) -> Tensor:
    """Same contract as ``torch.ops.fusedmtl.regression_loss``, run by Triton."""
    regression_kind(kind)
    return _forward("triton_regression_loss", (input, target), kind, param, reduction)


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
    return _backward(
        "triton_regression_loss_backward",
        grad_output,
        (input, target),
        kind,
        param,
        reduction,
        input_grad,
        target_grad,
    )


@torch.library.custom_op("fusedmtl::triton_heteroscedastic_loss", mutates_args=())
def heteroscedastic_loss(
    input: Tensor, target: Tensor, log_var: Tensor, kind: str, beta: float, reduction: int
) -> Tensor:
    """Same contract as ``torch.ops.fusedmtl.heteroscedastic_loss``, run by Triton."""
    check_heteroscedastic(kind, beta)
    return _forward("triton_heteroscedastic_loss", (input, target, log_var), kind, beta, reduction)


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
    check_heteroscedastic(kind, beta)
    return _backward(
        "triton_heteroscedastic_loss_backward",
        grad_output,
        (input, target, log_var),
        kind,
        beta,
        reduction,
        input_grad,
        log_var_grad,
    )


register_loss_op("fusedmtl::triton_regression_loss", "fusedmtl::triton_regression_loss_backward")
register_loss_op(
    "fusedmtl::triton_heteroscedastic_loss", "fusedmtl::triton_heteroscedastic_loss_backward"
)


def _compile_cases() -> list[tuple]:
    """(kernel, signature, constexprs) of every specialisation the ops launch, over the dtypes:
    what triton.compile needs to build each kernel for a GPU target without a driver (with
    ``LAUNCH_OPTIONS``)."""
    cases = []
    dtypes = {"fp32": False, "fp16": False, "bf16": False, "fp64": True}
    for name, fp64 in dtypes.items():
        sums = "*fp64" if fp64 else "*fp32"
        for heteroscedastic in (False, True):
            if heteroscedastic:
                kernel, codes = (
                    _heteroscedastic_loss_kernel,
                    sorted(set(HETEROSCEDASTIC_CODES.values())),
                )
                pointers = [
                    "input_ptr",
                    "target_ptr",
                    "log_var_ptr",
                    "loss_ptr",
                    "grad_input_ptr",
                    "grad_log_var_ptr",
                    "grad_output_ptr",
                ]
                grad_flags = ("GRAD_INPUT", "GRAD_LOG_VAR")
                scalars = ("beta", "inv_beta", "norm")
            else:
                kernel, codes = _regression_loss_kernel, sorted(KIND_CODES.values())
                pointers = [
                    "input_ptr",
                    "target_ptr",
                    "loss_ptr",
                    "grad_input_ptr",
                    "grad_target_ptr",
                    "grad_output_ptr",
                ]
                grad_flags = ("GRAD_INPUT", "GRAD_TARGET")
                scalars = ("param", "inv_param", "norm")
            signature = {p: f"*{name}" for p in pointers}
            signature.update(block_sums_ptr=sums, n="i64")
            signature.update({s: "fp64" for s in scalars})
            for code in codes:
                divides = (True, False) if code == _SMOOTH_L1 else (False,)
                for divide in divides:
                    # forward reduced, forward element-wise, backward (scalar and tensor grad)
                    passes = [
                        dict(REDUCE=True, WRITE_LOSS=False, GRAD_TENSOR=False, grads=False),
                        dict(REDUCE=False, WRITE_LOSS=True, GRAD_TENSOR=False, grads=False),
                        dict(REDUCE=False, WRITE_LOSS=False, GRAD_TENSOR=False, grads=True),
                        dict(REDUCE=False, WRITE_LOSS=False, GRAD_TENSOR=True, grads=True),
                    ]
                    for flags in passes:
                        grads = flags.pop("grads")
                        constexprs = dict(
                            KIND=code,
                            DIVIDE=divide,
                            FP64=fp64,
                            BLOCK=BLOCK,
                            **flags,
                            **{g: grads for g in grad_flags},
                        )
                        if not heteroscedastic:
                            constexprs["L1_MEAN"] = code == _L1 and grads
                        cases.append((kernel, dict(signature), constexprs))
    return cases


COMPILE_CASES = _compile_cases()
