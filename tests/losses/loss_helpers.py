"""Inputs and reusable contract checks of the regression-loss tests (test_parity.py and the
others): the precision contract each asserts is stated in test_parity.py's docstring."""

from __future__ import annotations

import functools

import torch

from tests.helpers import (
    LOW_PRECISION_RTOL,
    LossCase,
    assert_bitwise,
    assert_close_to_ref,
    assert_ulp,
    make_grad_output,
    make_pair,
    ref_grad64,
    ref_loss64,
    ref_reduce64,
    smallest_subnormal,
)

EXACT = (torch.float32, torch.float64)

# --------------------------------------------------------------------------------------------
# Inputs

SHAPES = {
    "scalar": (),
    "empty": (0,),
    "empty3x0": (3, 0),
    "n1": (1,),
    "n7": (7,),
    "n1023": (1023,),
    "n100003": (100003,),
    "n2p20p3": (2**20 + 3,),
    "nd5x7x29": (5, 7, 29),
}
NONCONTIGUOUS = ("transposed", "strided", "strided2d")
LAYOUTS = tuple(SHAPES) + NONCONTIGUOUS
# The layouts the parity tests run on CUDA (``cuda_subset``): a 0-dim and an empty tensor (a launch
# with nothing to do), shorter than a vector, a vector tail, many blocks (the multi-block
# reduction), and the non-contiguous paths. The others launch the same kernels.
CUDA_LAYOUTS = ("scalar", "empty", "n7", "n1023", "n2p20p3", "transposed", "strided")


@functools.lru_cache(maxsize=None)
def make_layout(layout: str, dtype: torch.dtype):
    """(input, target) for a named layout; cached, so tests must not modify them in place."""
    if layout in SHAPES:
        return make_pair(SHAPES[layout], dtype)
    if layout == "transposed":  # input a transposed view, target contiguous
        x, y = make_pair((37, 45), dtype)
        return x.t(), y.t().contiguous()
    if layout == "strided":  # both sliced with a step
        x, y = make_pair((3 * 1001,), dtype)
        return x[::3], y[1::3]
    if layout == "strided2d":
        x, y = make_pair((24, 66), dtype)
        return x[:, ::2], y[:, 1::2]
    raise ValueError(layout)


def grad_output_for(loss: torch.Tensor, grad_kind: str) -> torch.Tensor:
    if grad_kind == "one":
        return torch.ones_like(loss)
    if grad_kind == "third":
        return torch.full_like(loss, 1 / 3)
    return make_grad_output(loss.shape, loss.dtype).to(loss.device)


def leaves(*tensors):
    return [t.detach().requires_grad_() for t in tensors]


# --------------------------------------------------------------------------------------------
# The contract, as reusable checks


def loose_rtol(dtype):
    return 4 * LOW_PRECISION_RTOL[dtype]


def loose_atol(dtype, ref):
    """torch rounds intermediate results (its norm = 1/N too) to the dtype: a few ulps of the
    largest value, and a few ulps of the smallest subnormal for gradients that are subnormal."""
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return loose_rtol(dtype) * scale + 4 * smallest_subnormal(dtype)


def check_loss(case: LossCase, reduction, x, y, got, expected_torch):
    """Checks a loss computed by fusedmtl from (x, y) against torch's and the float64 formula."""
    __tracebackhide__ = True
    dtype = expected_torch.dtype
    assert got.dtype == dtype, f"dtype {got.dtype} != torch's {dtype}"
    assert got.shape == expected_torch.shape, f"shape {got.shape} != torch's {expected_torch.shape}"
    bx, by = torch.broadcast_tensors(x.to(dtype), y.to(dtype))
    ref = ref_reduce64(ref_loss64(case.kind, case.param, bx, by), reduction)
    if reduction == "none":
        if dtype in EXACT:
            assert_bitwise(got, expected_torch, "loss vs torch")
        else:
            assert_ulp(got, ref.to(dtype), 1, "loss vs float64 rounded to the dtype")
            assert_close_to_ref(
                got,
                expected_torch,
                rtol=loose_rtol(dtype),
                atol=loose_atol(dtype, ref),
                what="loss vs torch (loose)",
            )
        return
    if dtype == torch.float64:
        assert_close_to_ref(got, ref, rtol=1e-12, what="reduced loss vs float64 formula")
        assert_close_to_ref(got, expected_torch, rtol=1e-12, what="reduced loss vs torch")
    elif dtype == torch.float32:
        # the losses are >= 0, so the sum of their absolute values is the sum itself
        assert_close_to_ref(got, ref, rtol=1e-6, what="reduced loss vs float64 formula")
        assert_close_to_ref(got, expected_torch, rtol=1e-5, what="reduced loss vs torch")
    else:
        rtol = LOW_PRECISION_RTOL[dtype]
        assert_close_to_ref(got, ref.to(dtype), rtol=rtol, what="reduced loss vs float64 rounded")
        assert_close_to_ref(
            got, expected_torch, rtol=loose_rtol(dtype), what="reduced loss vs torch"
        )


def check_grad(
    case, reduction, x, y, g, got, expected_torch, bitwise: bool, what: str, ulps: int = 1
):
    """Checks fusedmtl's d loss / d input (times g) against torch's and the float64 formula.
    x, y have the same shape (no broadcasting)."""
    __tracebackhide__ = True
    dtype = expected_torch.dtype
    assert got is not None, f"{what}: no gradient"
    assert got.dtype == dtype and got.shape == expected_torch.shape, (
        f"{what}: {got.dtype}{tuple(got.shape)} != torch's {dtype}{tuple(expected_torch.shape)}"
    )
    if dtype in EXACT:
        if bitwise:
            assert_bitwise(got, expected_torch, f"{what} vs torch")
        else:
            assert_ulp(got, expected_torch, ulps, f"{what} vs torch")
        return
    ref = ref_grad64(case.kind, case.param, x, y, g, reduction)
    assert_ulp(got, ref.to(dtype), 1, f"{what} vs float64 rounded to the dtype")
    assert_close_to_ref(
        got,
        expected_torch,
        rtol=loose_rtol(dtype),
        atol=loose_atol(dtype, ref),
        what=f"{what} vs torch (loose)",
    )
