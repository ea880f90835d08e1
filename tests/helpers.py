"""Shared helpers of the fusedmtl test suite: the backends and devices under test, the loss cases,
the data, the float64 oracle and the ulp comparisons (the fixtures and hooks are in conftest.py).

Test modules import them as ``from tests.helpers import ...`` (pyproject puts the checkout on the
path); ``from conftest import ...`` would resolve to whichever conftest pytest loaded last.

The oracle is torch.nn.functional, plus float64 evaluations of the formulas of
docs/METHODS.md section 1 (``ref_loss64`` / ``ref_grad64``).

conftest.py sets TRITON_INTERPRET (without a GPU) before this module asks whether Triton runs on
the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

import fusedmtl
from fusedmtl.losses import REGRESSION_KINDS
from fusedmtl.losses.kinds import RegressionKind, regression_kind


def backends_on(device: str) -> tuple[str, ...]:
    """The backends the tests run on ``device``: native and reference everywhere, triton where its
    kernels run: on CUDA wherever Triton is installed (without a GPU those cases skip), on the CPU
    only under the interpreter (TRITON_INTERPRET=1, which conftest.py sets without a GPU)."""
    triton = fusedmtl.backend.triton_runs_on(torch.device(device).type)
    return ("native", "reference") + (("triton",) if triton else ())


# The backends of the tests that run on the CPU only (the ``backend`` fixture without ``device``).
BACKENDS = backends_on("cpu")
# Devices every device-parametric test runs on: the CPU, and CUDA where there is one (one pytest
# run on a GPU machine exercises every CUDA and Triton kernel with the same oracles).
# FUSEDMTL_TEST_DEVICES=cpu,cuda generates the CUDA cases without a GPU too (they skip), so CI
# proves that the GPU part of the suite collects (`make gpu-check` runs it with `-m cuda`).
DEVICES = tuple(
    os.environ.get(
        "FUSEDMTL_TEST_DEVICES", "cpu,cuda" if torch.cuda.is_available() else "cpu"
    ).split(",")
)
# The (backend, device) pairs of the tests that take both fixtures: each device with the backends
# that run there, so that triton x cuda exists on a GPU machine (where Triton does not run on the
# CPU) and triton x cpu only under the interpreter.
BACKEND_DEVICES = tuple(
    (b, d) for b in ("native", "reference", "triton") for d in DEVICES if b in backends_on(d)
)


def skip_without_a_gpu(device: str) -> None:
    """Skips a case on CUDA where there is no GPU (FUSEDMTL_TEST_DEVICES=cpu,cuda generates such
    cases so that CI sees them collect): for tests that take ``device`` as a parameter of their
    own rather than through the ``device`` fixture, which does the same."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


REDUCTIONS = ("none", "mean", "sum")
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)
DTYPE_IDS = {
    torch.float64: "f64",
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
}
# Relative resolution of the low-precision dtypes for reduced losses (brief: rtol 2**-10 / 2**-7).
LOW_PRECISION_RTOL = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def dtype_id(dtype: torch.dtype) -> str:
    return DTYPE_IDS[dtype]


# --------------------------------------------------------------------------------------------
# The loss cases: an op with one value of its parameter.


@dataclass(frozen=True)
class LossCase:
    op: str  # a kind of fusedmtl.losses.REGRESSION_KINDS: 'l1' | 'mse' | 'smooth_l1' | 'huber'
    param: float | None = None  # its parameter (beta, delta), None for the kinds without one

    @property
    def row(self) -> RegressionKind:
        return regression_kind(self.op)

    @property
    def id(self) -> str:
        if self.param is None:
            return self.op
        return f"{self.op}-{self.row.param_name}{self.param:g}"

    @property
    def kind(self) -> str:
        """The loss that is actually computed (smooth_l1 with beta == 0 is l1)."""
        if self.op == "smooth_l1" and self.param == 0:
            return "l1"
        return self.op

    @property
    def is_default(self) -> bool:
        return self.param in (None, 1.0)

    def kwargs(self) -> dict:
        return {} if self.param is None else {self.row.param_name: self.param}

    def fused(self, input, target, reduction="mean", **kwargs):
        fn = getattr(fusedmtl, self.row.function)
        return fn(input, target, reduction=reduction, **self.kwargs(), **kwargs)

    def torch(self, input, target, reduction="mean", **kwargs):
        return self.row.torch_function(
            input, target, reduction=reduction, **self.kwargs(), **kwargs
        )


# Every kind of the table with each value of its parameter under test: 0 (smooth-L1 routes it to
# L1), a power of two, the default, and one the kernels divide by.
PARAM_VALUES = {"beta": (0.0, 0.5, 1.0, 2.5), "delta": (0.5, 1.0, 2.5)}
ALL_CASES = tuple(
    LossCase(k.name, p)
    for k in REGRESSION_KINDS
    for p in (PARAM_VALUES[k.param_name] if k.param_name else (None,))
)
DEFAULT_CASES = tuple(LossCase(k.name, k.default_param) for k in REGRESSION_KINDS)
# Default parameters plus a non-power-of-two beta (the kernels divide there) and a small delta.
CORE_PARAM = {"beta": 2.5, "delta": 0.5}
CORE_CASES = DEFAULT_CASES + tuple(
    LossCase(k.name, CORE_PARAM[k.param_name]) for k in REGRESSION_KINDS if k.param_name
)


def case_params(cases):
    return [pytest.param(c, id=c.id) for c in cases]


def dtype_params(dtypes=FLOAT_DTYPES):
    return [pytest.param(d, id=dtype_id(d)) for d in dtypes]


# --------------------------------------------------------------------------------------------
# Data


def make_pair(shape, dtype, seed=0, scale=2.0):
    """(input, target) of ``shape``: normal values, 30% of them on a grid of quarters so that
    d == 0, |d| == 0.5, 1, 2.5 (the parameters under test) occur exactly."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        values = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
        on_grid = torch.rand(shape, generator=gen) < 0.3
        grid = torch.randint(-12, 13, shape, generator=gen).to(torch.float64) / 4
        out.append(torch.where(on_grid, grid, values).to(dtype))
    return out[0], out[1]


def make_grad_output(shape, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


# --------------------------------------------------------------------------------------------
# float64 reference of METHODS.md section 1


def ref_loss64(kind: str, param, input, target):
    """Element-wise loss in float64 (kind as in LossCase.kind)."""
    d = input.double() - target.double()
    z = d.abs()
    if kind == "l1":
        return z
    if kind == "mse":
        return d * d
    if kind == "smooth_l1":
        return torch.where(z < param, 0.5 * z * z / param, z - 0.5 * param)
    if kind == "huber":
        return torch.where(z < param, 0.5 * z * z, param * (z - 0.5 * param))
    raise ValueError(kind)


def ref_grad64(kind: str, param, input, target, grad_output, reduction: str):
    """d loss / d input times grad_output, in float64 (grad_output broadcast to the loss)."""
    d = input.double() - target.double()
    if kind == "l1":
        local = torch.sign(d)  # 0 at d == 0 and at NaN, as torch
    elif kind == "mse":
        local = 2 * d
    elif kind in ("smooth_l1", "huber"):
        # linear branch at |d| >= param (so at |d| == param too); NaN propagates through the inner
        # one
        inner = d / param if kind == "smooth_l1" else d
        outer = torch.ones_like(d) if kind == "smooth_l1" else torch.full_like(d, param)
        local = torch.where(d <= -param, -outer, torch.where(d >= param, outer, inner))
    else:
        raise ValueError(kind)
    grad = local * grad_output.double()
    if reduction == "mean":
        grad = grad / max(d.numel(), 1)
    return grad


def ref_reduce64(loss64, reduction):
    if reduction == "mean":
        return loss64.mean()
    if reduction == "sum":
        return loss64.sum()
    return loss64


# --------------------------------------------------------------------------------------------
# Comparisons

_INT_OF = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}
_HUGE = 2**62


def _ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """Maps floats to integers whose order is the order of the floats, +0 and -0 both to 0, so that
    the difference of two of them is the distance in ulps."""
    int_dtype = _INT_OF[t.dtype]
    bits = t.contiguous().view(int_dtype).to(torch.int64)
    nbits = torch.finfo(t.dtype).bits
    magnitude = bits & ((1 << (nbits - 1)) - 1)
    return torch.where(bits < 0, -magnitude, magnitude)


def ulp_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise distance in ulps of a and b (same dtype and shape) as int64: 0 where both are
    NaN, a huge value where only one is. +0 and -0 are at distance 0."""
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    oa, ob = _ordered_bits(a.detach().cpu()), _ordered_bits(b.detach().cpu())
    same_sign = (oa >= 0) == (ob >= 0)
    # opposite signs: |oa| + |ob|, clamped so that the sum cannot overflow int64
    dist = torch.where(
        same_sign, (oa - ob).abs(), oa.abs().clamp(max=_HUGE // 2) + ob.abs().clamp(max=_HUGE // 2)
    )
    nan_a, nan_b = a.detach().cpu().isnan(), b.detach().cpu().isnan()
    dist = torch.where(nan_a & nan_b, torch.zeros_like(dist), dist)
    return torch.where(nan_a ^ nan_b, torch.full_like(dist, _HUGE), dist)


def _describe_worst(actual, expected, dist) -> str:
    flat = dist.reshape(-1)
    worst = int(flat.argmax())
    count = int((flat > 0).sum())
    return (
        f"max ulp distance {int(flat[worst])} at flat index {worst}: "
        f"actual {actual.reshape(-1)[worst].item()!r}, expected "
        f"{expected.reshape(-1)[worst].item()!r}; "
        f"{count} of {flat.numel()} elements differ"
    )


def assert_ulp(actual, expected, max_ulp: int, what: str = ""):
    """dtype and shape equal, every element within ``max_ulp`` ulps, NaN where expected is NaN."""
    __tracebackhide__ = True  # keeps pytest from printing the tensors of this frame
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if actual.numel() == 0:
        return
    dist = ulp_diff(actual, expected)
    assert int(dist.max()) <= max_ulp, f"{what}: {_describe_worst(actual, expected, dist)}"


def assert_bitwise(actual, expected, what: str = ""):
    """Bitwise equal up to the NaN payload (NaN positions equal) and the sign of zero."""
    __tracebackhide__ = True  # keeps pytest from printing the tensors of this frame
    assert_ulp(actual, expected, 0, what)


def assert_close_to_ref(actual, ref64, rtol, atol=0.0, what=""):
    """|actual - ref64| <= atol + rtol * |ref64| computed in float64, NaN/inf positions equal."""
    __tracebackhide__ = True  # keeps pytest from printing the tensors of this frame
    assert actual.shape == ref64.shape, f"{what}: shape {actual.shape} != {ref64.shape}"
    torch.testing.assert_close(
        actual.double(),
        ref64.double(),
        rtol=rtol,
        atol=atol,
        equal_nan=True,
        msg=lambda m: f"{what}: {m}",
    )


def smallest_subnormal(dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps
