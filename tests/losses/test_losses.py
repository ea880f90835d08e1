"""Parity of fusedmtl's regression losses (python/fusedmtl/ops/losses.py, nn.py) with
torch.nn.functional and with float64 evaluations of METHODS.md section 1.

Precision contract checked here:
- float32/float64, reduction 'none': the loss is bitwise equal to torch (NaN positions equal).
- float32/float64 gradients: within 1 ulp of torch; bitwise for the default parameters with
  grad_output == 1 (mse, l1, smooth_l1(beta=1), huber(delta=1)).
- mean/sum: float32 within 1e-6 (relative) of float64 and 1e-5 of torch; float64 within 1e-12.
- float16/bfloat16: one rounding of a float32 computation, so within 1 ulp of the float64 result
  rounded to the dtype for 'none' and gradients, and within the dtype's resolution for mean/sum.
- grad w.r.t. target == -grad w.r.t. input, exactly.
"""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedmtl
import fusedmtl.nn
from conftest import (
    ALL_CASES,
    BACKENDS,
    CORE_CASES,
    DEFAULT_CASES,
    LOW_PRECISION_RTOL,
    REDUCTIONS,
    LossCase,
    assert_bitwise,
    assert_close_to_ref,
    assert_ulp,
    case_params,
    dtype_params,
    make_grad_output,
    make_pair,
    smallest_subnormal,
    ulp_diff,
    ref_grad64,
    ref_loss64,
    ref_reduce64,
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
    return make_grad_output(loss.shape, loss.dtype)


def leaves(*tensors):
    return [t.detach().requires_grad_() for t in tensors]


@pytest.mark.parametrize("dtype", dtype_params())
def test_ulp_diff_helper(dtype):
    """The comparison helper itself: distances in ulps across zero, subnormals, inf and NaN."""
    info = torch.finfo(dtype)
    one = torch.tensor([1.0], dtype=dtype)
    up = torch.nextafter(one, torch.tensor([2.0], dtype=dtype))
    tiny = torch.tensor([smallest_subnormal(dtype)], dtype=dtype)
    cases = [
        (one, one, 0), (one, up, 1), (up, one, 1), (-one, -up, 1),
        (torch.tensor([0.0], dtype=dtype), torch.tensor([-0.0], dtype=dtype), 0),
        (tiny, -tiny, 2), (tiny, torch.tensor([0.0], dtype=dtype), 1),
        (torch.tensor([info.max], dtype=dtype), torch.tensor([math.inf], dtype=dtype), 1),
        (torch.tensor([math.nan], dtype=dtype), torch.tensor([-math.nan], dtype=dtype), 0),
    ]
    for a, b, expected in cases:
        assert int(ulp_diff(a, b)) == expected, (a, b)
    assert int(ulp_diff(torch.tensor([math.nan], dtype=dtype), one)) > 2**60
    assert int(ulp_diff(torch.tensor([-math.inf], dtype=dtype), torch.tensor([math.inf], dtype=dtype))) > 1000


# --------------------------------------------------------------------------------------------
# The contract, as reusable checks


def loose_rtol(dtype):
    return 4 * LOW_PRECISION_RTOL[dtype]


def loose_atol(dtype, ref):
    """torch rounds intermediate results (its norm = 1/N too) to the dtype: a few ulps of the largest
    value, and a few ulps of the smallest subnormal for gradients that are subnormal."""
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
            assert_close_to_ref(got, expected_torch, rtol=loose_rtol(dtype),
                                atol=loose_atol(dtype, ref), what="loss vs torch (loose)")
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
        assert_close_to_ref(got, expected_torch, rtol=loose_rtol(dtype), what="reduced loss vs torch")


def check_grad(case, reduction, x, y, g, got, expected_torch, bitwise: bool, what: str, ulps: int = 1):
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
    assert_close_to_ref(got, expected_torch, rtol=loose_rtol(dtype), atol=loose_atol(dtype, ref),
                        what=f"{what} vs torch (loose)")


# --------------------------------------------------------------------------------------------
# Forward and backward parity over op x parameter x reduction x dtype x layout x backend


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", case_params(ALL_CASES))
def test_forward_parity(backend, case, reduction, dtype, layout):
    x, y = make_layout(layout, dtype)
    got = case.fused(x, y, reduction)
    check_loss(case, reduction, x, y, got, case.torch(x, y, reduction))


@pytest.mark.parametrize("grad_kind", ["random", "one"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", case_params(ALL_CASES))
def test_backward_parity(backend, case, reduction, dtype, layout, grad_kind):
    """Gradients w.r.t. input and target; grad_output random or exactly 1 (for mean/sum, 1 is the
    eager fast path that hands the gradient computed in forward to autograd)."""
    x, y = make_layout(layout, dtype)
    xf, yf = leaves(x, y)
    xt, yt = leaves(x, y)
    loss = case.fused(xf, yf, reduction)
    expected = case.torch(xt, yt, reduction)
    g = grad_output_for(expected, grad_kind)
    loss.backward(g)
    expected.backward(g)

    # the forward value does not depend on whether a gradient is wanted
    with torch.no_grad():
        assert_bitwise(loss.detach(), case.fused(x, y, reduction), "loss with grad vs without")
    bitwise = grad_kind == "one" and case.is_default
    # torch takes its scalar loop for non-contiguous strides and its vectorised one for contiguous
    # tensors, which round differently (smooth_l1 with beta not a power of two, by up to 2 ulps):
    # fusedmtl equals torch on contiguous copies, and is within 2 ulps of torch on the strides.
    ulps = 1
    if layout in NONCONTIGUOUS:
        xc, yc = leaves(x.contiguous(), y.contiguous())
        case.torch(xc, yc, reduction).backward(g)
        check_grad(case, reduction, x, y, g, xf.grad, xc.grad, bitwise, "grad input vs contiguous")
        ulps = 2
    check_grad(case, reduction, x, y, g, xf.grad, xt.grad, bitwise, "grad input", ulps)
    check_grad(case, reduction, x, y, -g, yf.grad, yt.grad, bitwise, "grad target", ulps)
    assert_bitwise(yf.grad, -xf.grad, "grad target vs -grad input")


# (loss, functional kwargs, N, reduction): where the eager fast path scales the gradient computed
# in forward in place, and that must be torch's result bit for bit. Huber at N = 1000 would not be:
# torch's scalar tail multiplies in another order than its vectorized loop, for a few elements.
EXACT_SCALING = [
    ("mse_loss", {}, 1000, "mean"),
    ("smooth_l1_loss", {"beta": 1.0}, 1000, "mean"),
    ("huber_loss", {"delta": 2.5}, 4096, "mean"),
    ("huber_loss", {"delta": 1.0}, 1000, "sum"),
    ("l1_loss", {}, 4096, "mean"),  # 1 / N exact: N a power of two
    ("l1_loss", {}, 1000, "sum"),
]


@pytest.mark.parametrize("dtype", dtype_params(EXACT))
@pytest.mark.parametrize("name, kwargs, n, reduction", EXACT_SCALING)
def test_weighted_loss_is_torch_bitwise(backend, name, kwargs, n, reduction, dtype):
    """(w * loss).backward() gives torch's gradient exactly where fusedmtl scales in place."""
    x, y = make_pair((n,), dtype, seed=5)
    for w in (0.7313, -3.1, 1e-3):
        grads = []
        for fn in (getattr(fusedmtl, name), getattr(F, name)):
            xf, yf = leaves(x, y)
            (w * fn(xf, yf, reduction=reduction, **kwargs)).backward()
            grads.append((xf.grad, yf.grad))
        assert_bitwise(grads[0][0], grads[1][0], f"grad input, w={w}")
        assert_bitwise(grads[0][1], grads[1][1], f"grad target, w={w}")


@pytest.mark.parametrize("layout", ["n1023", "n100003"])
@pytest.mark.parametrize("grad_kind", ["random", "third", "one"])
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", case_params(CORE_CASES))
def test_second_backward_retain_graph(backend, case, reduction, dtype, grad_kind, layout):
    """A second backward of the same graph (retain_graph=True) gives the same gradients again
    (the eager fast path hands its buffer out once and recomputes afterwards)."""
    x, y = make_layout(layout, dtype)
    xf, yf = leaves(x, y)
    loss = case.fused(xf, yf, reduction)
    g = grad_output_for(loss, grad_kind)
    first = torch.autograd.grad(loss, (xf, yf), g, retain_graph=True)
    second = torch.autograd.grad(loss, (xf, yf), g, retain_graph=True)
    third = torch.autograd.grad(loss, (xf, yf), g)
    for name, a, b, c in zip(("input", "target"), first, second, third):
        assert_bitwise(b, a, f"second grad {name} vs first")
        assert_bitwise(c, a, f"third grad {name} vs first")
    xt, yt = leaves(x, y)
    expected = torch.autograd.grad(case.torch(xt, yt, reduction), (xt, yt), g)
    check_grad(case, reduction, x, y, g, first[0], expected[0], False, "grad input")


@pytest.mark.parametrize("which", ["input", "target"])
@pytest.mark.parametrize("dtype", dtype_params(EXACT))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", case_params(CORE_CASES))
def test_gradient_of_one_argument(backend, case, reduction, dtype, which):
    """Only one of input and target requires grad."""
    x, y = make_layout("n1023", dtype)
    xf, yf = (x.detach().requires_grad_(), y) if which == "input" else (x, y.detach().requires_grad_())
    xt, yt = (x.detach().requires_grad_(), y) if which == "input" else (x, y.detach().requires_grad_())
    loss = case.fused(xf, yf, reduction)
    expected = case.torch(xt, yt, reduction)
    g = grad_output_for(expected, "random")
    loss.backward(g)
    expected.backward(g)
    leaf, other = (xf, yf) if which == "input" else (yf, xf)
    leaf_t = xt if which == "input" else yt
    assert other.grad is None
    assert_ulp(leaf.grad, leaf_t.grad, 1, f"grad {which}")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", case_params(CORE_CASES))
def test_gradient_accumulates(backend, case, reduction):
    """Two forward/backward passes accumulate into .grad like torch (the fast path's buffer is
    adopted as .grad by the first and must not be reused by the second)."""
    x, y = make_layout("n1023", torch.float32)
    xf, yf = leaves(x, y)
    xt, yt = leaves(x, y)
    for scale in (1.0, 1.0, -0.75):
        (case.fused(xf, yf, reduction) * scale).backward()
        (case.torch(xt, yt, reduction) * scale).backward()
    assert_close_to_ref(xf.grad, xt.grad, rtol=1e-6, atol=1e-9, what="accumulated grad input")
    assert_close_to_ref(yf.grad, yt.grad, rtol=1e-6, atol=1e-9, what="accumulated grad target")


def test_gradient_buffers_are_not_shared(backend):
    """The fast path's gradients of input and target are separate tensors, and a later backward
    does not write into a gradient already handed out."""
    x, y = make_layout("n1023", torch.float32)
    xf, yf = leaves(x, y)
    fusedmtl.mse_loss(xf, yf).backward()
    gx, gy = xf.grad.clone(), yf.grad.clone()
    assert xf.grad.data_ptr() != yf.grad.data_ptr()
    saved_x = xf.grad
    xf.grad = None
    yf.grad = None
    fusedmtl.mse_loss(xf, yf).backward(torch.tensor(3.0))
    assert_bitwise(saved_x, gx, "an earlier gradient was modified by a later backward")
    assert_ulp(xf.grad, gx * 3, 1, "scaled gradient")
    assert_ulp(yf.grad, gy * 3, 1, "scaled gradient")


# --------------------------------------------------------------------------------------------
# Special values: |d| == beta, d == 0, NaN and +-inf, in input and target


def special_values(param: float, dtype: torch.dtype) -> torch.Tensor:
    p = torch.tensor(param, dtype=dtype)
    values = [
        torch.tensor(v, dtype=dtype)
        for v in (0.0, -0.0, param, -param, 0.5 * param, -0.5 * param, 2 * param, 1.0, -3.0, 1e-30,
                  math.inf, -math.inf, math.nan)
    ]
    values += [torch.nextafter(p, torch.tensor(0.0, dtype=dtype)),
               torch.nextafter(p, torch.tensor(math.inf, dtype=dtype))]
    return torch.stack(values)


def special_pairs(param: float, dtype: torch.dtype):
    """Every (input, target) pair of special values, twice: the second copy shifted by 5 elements so
    that each pair is seen by both the vectorised body and the scalar tail of torch's kernels."""
    v = special_values(param, dtype)
    x = v.repeat_interleave(len(v))
    y = v.repeat(len(v))
    pad = torch.ones(5, dtype=dtype)
    return torch.cat([x, pad, x]), torch.cat([y, pad * 0.25, y])


@pytest.mark.parametrize("grad_kind", ["random", "one"])
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", case_params(ALL_CASES))
def test_special_values(backend, case, reduction, dtype, grad_kind):
    x, y = special_pairs(case.param if case.param else 1.0, dtype)
    xf, yf = leaves(x, y)
    xt, yt = leaves(x, y)
    loss = case.fused(xf, yf, reduction)
    expected = case.torch(xt, yt, reduction)
    if reduction == "none" and dtype in EXACT:
        assert_bitwise(loss, expected, "loss vs torch")
        finite = ~loss.isnan()
        assert torch.equal(loss.signbit()[finite], expected.signbit()[finite]), "sign of zero"
    elif dtype in EXACT:
        assert_close_to_ref(loss, expected, rtol=1e-5, what="reduced loss vs torch")
    else:
        assert loss.dtype == expected.dtype
        assert torch.equal(loss.isnan(), expected.isnan()), "NaN positions"
        assert torch.equal(loss.isinf(), expected.isinf()), "inf positions"
        if reduction == "none":
            assert_ulp(loss, ref_loss64(case.kind, case.param, x, y).to(dtype), 1, "loss vs float64")

    g = grad_output_for(expected, grad_kind)
    gxf, gyf = torch.autograd.grad(loss, (xf, yf), g)
    gxt, gyt = torch.autograd.grad(expected, (xt, yt), g)
    assert_bitwise(gyf, -gxf, "grad target vs -grad input")
    if dtype in EXACT:
        assert_ulp(gxf, gxt, 1, "grad input vs torch")
        assert_ulp(gyf, gyt, 1, "grad target vs torch")
    else:
        assert torch.equal(gxf.isnan(), gxt.isnan()), "NaN positions of grad input"
        assert torch.equal(gxf.isinf(), gxt.isinf()), "inf positions of grad input"
        ref = ref_grad64(case.kind, case.param, x, y, g, reduction)
        assert_ulp(gxf, ref.to(dtype), 1, "grad input vs float64")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", dtype_params(EXACT))
def test_l1_of_negative_zero_difference(backend, dtype, reduction):
    """d = -0.0 - 0.0 = -0.0: torch's abs gives +0.0, so the loss (and e.g. 1 / loss) is +0."""
    x = torch.tensor([-0.0, 0.0, -0.0] * 11, dtype=dtype)
    y = torch.tensor([0.0, -0.0, -0.0] * 11, dtype=dtype)
    for loss in (fusedmtl.l1_loss(x, y, reduction=reduction),
                 fusedmtl.smooth_l1_loss(x, y, reduction=reduction, beta=0.0)):
        expected = F.l1_loss(x, y, reduction=reduction)
        assert torch.equal(loss.signbit(), expected.signbit()), (
            f"signbit of the loss {loss.signbit().int().tolist()}, torch {expected.signbit().int().tolist()}"
        )


@pytest.mark.parametrize("dtype", dtype_params(EXACT))
@pytest.mark.parametrize("case", case_params(CORE_CASES))
def test_boundary_points_exact(backend, case, dtype):
    """At |d| == beta (delta) the linear branch and its gradient are taken, at d == 0 the loss and
    the gradient are 0, as in torch, with values checked explicitly."""
    p = case.param if case.param else 1.0
    x = torch.tensor([p, -p, 0.0, 3.0 + p, 3.0], dtype=dtype, requires_grad=True)
    y = torch.tensor([0.0, 0.0, 0.0, 3.0, 3.0 + p], dtype=dtype)
    loss = case.fused(x, y, "none")
    (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
    expected_loss = {
        "l1": [p, p, 0.0, p, p],
        "mse": [p * p, p * p, 0.0, p * p, p * p],
        "smooth_l1": [0.5 * p] * 2 + [0.0] + [0.5 * p] * 2,
        "huber": [0.5 * p * p] * 2 + [0.0] + [0.5 * p * p] * 2,
    }[case.kind]
    sign = [1.0, -1.0, 0.0, 1.0, -1.0]
    expected_grad = {
        "l1": sign,
        "mse": [2 * p * s for s in sign],
        "smooth_l1": sign,
        "huber": [p * s for s in sign],
    }[case.kind]
    assert_bitwise(loss.detach(), torch.tensor(expected_loss, dtype=dtype), "loss at the boundaries")
    assert_bitwise(grad, torch.tensor(expected_grad, dtype=dtype), "grad at the boundaries")


# --------------------------------------------------------------------------------------------
# Broadcasting


BROADCAST_SHAPES = [
    pytest.param(((4, 1, 5), (3, 5)), id="in4x1x5-tg3x5"),
    pytest.param(((3, 5), (4, 1, 5)), id="in3x5-tg4x1x5"),
    pytest.param(((6, 1), (6,)), id="in6x1-tg6"),
]


@pytest.mark.parametrize("shapes", BROADCAST_SHAPES)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", case_params(CORE_CASES))
def test_broadcast(backend, case, reduction, dtype, shapes):
    x, _ = make_pair(shapes[0], dtype, seed=3)
    _, y = make_pair(shapes[1], dtype, seed=4)
    xf, yf = leaves(x, y)
    xt, yt = leaves(x, y)
    fused_fn = getattr(fusedmtl, f"{case.op}_loss")
    torch_fn = getattr(F, f"{case.op}_loss")
    with pytest.warns(UserWarning, match="target size") as fused_warnings:
        loss = fused_fn(xf, yf, reduction=reduction, **case.kwargs())
    with pytest.warns(UserWarning, match="target size") as torch_warnings:
        expected = torch_fn(xt, yt, reduction=reduction, **case.kwargs())
    assert str(fused_warnings[0].message) == str(torch_warnings[0].message)
    # stacklevel: the warning points at the line that called the loss, like torch's
    assert fused_warnings[0].filename == __file__, fused_warnings[0].filename
    check_loss(case, reduction, x, y, loss, expected)

    g = grad_output_for(expected, "random")
    loss.backward(g)
    expected.backward(g)
    assert xf.grad.shape == x.shape and yf.grad.shape == y.shape
    rtol = {torch.float64: 1e-12, torch.float32: 1e-6}[dtype] if dtype in EXACT else loose_rtol(dtype)
    for got, exp, name in ((xf.grad, xt.grad, "input"), (yf.grad, yt.grad, "target")):
        atol = rtol * float(exp.abs().max())
        assert_close_to_ref(got, exp, rtol=rtol, atol=atol, what=f"grad {name} vs torch")


@pytest.mark.parametrize("case", case_params(DEFAULT_CASES))
def test_no_warning_for_equal_shapes(backend, case):
    x, y = make_layout("n7", torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        case.fused(x, y, "mean")


# --------------------------------------------------------------------------------------------
# beta == 0, empty tensors


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_smooth_l1_beta_zero_is_l1(backend, reduction, dtype):
    x, y = make_layout("n1023", dtype)
    x1, y1 = leaves(x, y)
    x2, y2 = leaves(x, y)
    a = fusedmtl.smooth_l1_loss(x1, y1, reduction=reduction, beta=0.0)
    b = fusedmtl.l1_loss(x2, y2, reduction=reduction)
    assert_bitwise(a.detach(), b.detach(), "smooth_l1(beta=0) vs l1")
    g = grad_output_for(a, "random")
    a.backward(g)
    b.backward(g)
    assert_bitwise(x1.grad, x2.grad, "grad input")
    assert_bitwise(y1.grad, y2.grad, "grad target")


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4, 2)], ids=str)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("case", case_params(ALL_CASES))
def test_empty(backend, case, dtype, shape):
    x, y = leaves(torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype))
    none = case.fused(x, y, "none")
    assert none.shape == shape and none.dtype == dtype
    mean = case.fused(x, y, "mean")
    assert mean.shape == () and mean.dtype == dtype and mean.isnan()
    total = case.fused(x, y, "sum")
    assert total.shape == () and total.dtype == dtype and total.item() == 0.0
    for loss in (none, mean, total):
        gx, gy = torch.autograd.grad(loss, (x, y), torch.ones_like(loss))
        assert gx.shape == shape and gy.shape == shape
        assert gx.dtype == dtype and gy.dtype == dtype


# --------------------------------------------------------------------------------------------
# torch.nn modules


MODULES = [
    pytest.param("SmoothL1Loss", {}, id="SmoothL1Loss"),
    pytest.param("SmoothL1Loss", {"beta": 0.5}, id="SmoothL1Loss-beta0.5"),
    pytest.param("SmoothL1Loss", {"beta": 0.0}, id="SmoothL1Loss-beta0"),
    pytest.param("HuberLoss", {}, id="HuberLoss"),
    pytest.param("HuberLoss", {"delta": 2.5}, id="HuberLoss-delta2.5"),
    pytest.param("L1Loss", {}, id="L1Loss"),
    pytest.param("MSELoss", {}, id="MSELoss"),
]


@pytest.mark.parametrize("dtype", dtype_params(EXACT + (torch.bfloat16,)))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name, kwargs", MODULES)
def test_nn_modules(backend, name, kwargs, reduction, dtype):
    ours = getattr(fusedmtl.nn, name)(reduction=reduction, **kwargs)
    theirs = getattr(torch.nn, name)(reduction=reduction, **kwargs)
    assert isinstance(ours, getattr(torch.nn, name))
    assert repr(ours) == repr(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    op = {"SmoothL1Loss": "smooth_l1", "HuberLoss": "huber", "L1Loss": "l1", "MSELoss": "mse"}[name]
    param = kwargs.get("beta", kwargs.get("delta", 1.0)) if op in ("smooth_l1", "huber") else None
    case = LossCase(op, param)

    x, y = make_layout("n1023", dtype)
    xf, yf = leaves(x, y)
    xt, yt = leaves(x, y)
    loss = ours(xf, yf)
    expected = theirs(xt, yt)
    check_loss(case, reduction, x, y, loss, expected)
    assert_bitwise(loss.detach(), case.fused(x, y, reduction), "module vs functional")
    g = grad_output_for(expected, "random")
    loss.backward(g)
    expected.backward(g)
    check_grad(case, reduction, x, y, g, xf.grad, xt.grad, False, "grad input")


@pytest.mark.parametrize("name", ["SmoothL1Loss", "L1Loss", "MSELoss"])
def test_nn_modules_legacy_arguments(backend, name):
    with pytest.warns(UserWarning):
        ours = getattr(fusedmtl.nn, name)(size_average=False)
    with pytest.warns(UserWarning):
        theirs = getattr(torch.nn, name)(size_average=False)
    assert ours.reduction == theirs.reduction == "sum"
    x, y = make_layout("n7", torch.float64)
    assert_close_to_ref(ours(x, y), theirs(x, y), rtol=1e-12, what="legacy module")


# --------------------------------------------------------------------------------------------
# Errors, same exception type as torch with an informative message


def _raises_like_torch(fused_call, torch_call, match=None):
    with pytest.raises(Exception) as torch_error:
        torch_call()
    with pytest.raises(type(torch_error.value)) as fused_error:
        fused_call()
    assert type(fused_error.value) is type(torch_error.value), (
        f"fusedmtl raised {type(fused_error.value).__name__}, torch {type(torch_error.value).__name__}"
    )
    if match is not None:
        assert match in str(fused_error.value), str(fused_error.value)
    return fused_error.value


@pytest.mark.parametrize("beta", [-1.0, -1e-12, -math.inf])
def test_negative_beta(backend, beta):
    x, y = make_layout("n7", torch.float32)
    _raises_like_torch(
        lambda: fusedmtl.smooth_l1_loss(x, y, beta=beta),
        lambda: F.smooth_l1_loss(x, y, beta=beta),
        match="negative values for beta",
    )


@pytest.mark.parametrize("delta", [0.0, -0.0, -1.0, -math.inf])
def test_non_positive_delta(backend, delta):
    x, y = make_layout("n7", torch.float32)
    _raises_like_torch(
        lambda: fusedmtl.huber_loss(x, y, delta=delta),
        lambda: F.huber_loss(x, y, delta=delta),
        match="non-positive values for delta",
    )


@pytest.mark.parametrize("reduction", ["avg", "", "MEAN", "elementwise_mean_typo"])
@pytest.mark.parametrize("case", case_params(DEFAULT_CASES))
def test_unknown_reduction(backend, case, reduction):
    x, y = make_layout("n7", torch.float32)
    error = _raises_like_torch(
        lambda: case.fused(x, y, reduction), lambda: case.torch(x, y, reduction)
    )
    assert isinstance(error, ValueError)
    assert repr(reduction)[1:-1] in str(error) and "reduction" in str(error)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("int_dtype", [torch.int64, torch.int32, torch.int16], ids=str)
@pytest.mark.parametrize("case", case_params(DEFAULT_CASES))
def test_integer_inputs(backend, case, int_dtype, reduction):
    x = torch.tensor([1, -2, 3, 7], dtype=int_dtype)
    y = torch.tensor([3, 1, -2, 7], dtype=int_dtype)
    if case.op == "l1" and reduction != "mean":
        got, expected = case.fused(x, y, reduction), case.torch(x, y, reduction)
        assert got.dtype == expected.dtype  # int_dtype for 'none', int64 for 'sum'
        assert not got.dtype.is_floating_point
        assert torch.equal(got, expected)
        return
    error = _raises_like_torch(lambda: case.fused(x, y, reduction), lambda: case.torch(x, y, reduction))
    if case.op == "l1":  # mean of integers
        assert isinstance(error, RuntimeError) and "mean" in str(error)
    else:
        assert isinstance(error, NotImplementedError)
        assert "not implemented" in str(error) and case.op in str(error)
        assert "Long" in str(error) or "int" in str(error)


@pytest.mark.parametrize("case", case_params(DEFAULT_CASES))
def test_integer_input_float_target(backend, case):
    """An integer input with a float target: torch promotes for l1/mse/smooth_l1; huber works in
    input's dtype and torch raises RuntimeError (float result cannot be cast to Long)."""
    x = torch.tensor([1, -2, 3, 7])
    y = torch.tensor([0.5, 1.0, -2.0, 7.25])
    if case.op == "huber":
        _raises_like_torch(lambda: case.fused(x, y), lambda: case.torch(x, y))
        return
    got, expected = case.fused(x, y), case.torch(x, y)
    assert got.dtype == expected.dtype
    assert_bitwise(got, expected, "loss of int input and float target")


@pytest.mark.parametrize("case", case_params(DEFAULT_CASES))
def test_device_mismatch(backend, case):
    x = torch.randn(3)
    y = torch.randn(3, device="meta")
    error = _raises_like_torch(lambda: case.fused(x, y), lambda: case.torch(x, y))
    assert isinstance(error, RuntimeError)
    assert "meta" in str(error) and "cpu" in str(error)


@pytest.mark.parametrize("case", case_params(DEFAULT_CASES))
def test_incompatible_shapes(backend, case):
    x, y = torch.randn(4, 2, 5), torch.randn(3, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        error = _raises_like_torch(lambda: case.fused(x, y), lambda: case.torch(x, y))
    assert isinstance(error, RuntimeError) and "size" in str(error)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", case_params(DEFAULT_CASES))
def test_meta_tensors(case, reduction):
    """Both on 'meta' (no native kernels there): the automatic choice falls back and gives torch's
    shape and dtype."""
    x = torch.empty(4, 3, device="meta")
    y = torch.empty(4, 3, device="meta")
    got, expected = case.fused(x, y, reduction), case.torch(x, y, reduction)
    assert got.device.type == "meta" and got.shape == expected.shape and got.dtype == expected.dtype


# --------------------------------------------------------------------------------------------
# Deprecated size_average / reduce


LEGACY = [
    (size_average, reduce)
    for size_average in (None, True, False)
    for reduce in (None, True, False)
    if (size_average, reduce) != (None, None)
]


@pytest.mark.parametrize("size_average, reduce", LEGACY, ids=[f"sa{a}-r{b}" for a, b in LEGACY])
@pytest.mark.parametrize("case", case_params([LossCase("smooth_l1", 1.0), LossCase("smooth_l1", 0.5),
                                              LossCase("l1"), LossCase("mse")]))
def test_legacy_size_average_reduce(backend, case, size_average, reduce):
    x, y = make_layout("n1023", torch.float32)
    # reduction='sum' passed too: the legacy arguments take precedence, as in torch
    with pytest.warns(UserWarning, match="deprecated"):
        got = case.fused(x, y, "sum", size_average=size_average, reduce=reduce)
    with pytest.warns(UserWarning, match="deprecated"):
        expected = case.torch(x, y, "sum", size_average=size_average, reduce=reduce)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    if expected.dim():
        assert_bitwise(got, expected, "legacy reduction none")
    else:
        assert_close_to_ref(got, expected, rtol=1e-5, what="legacy reduction")


# --------------------------------------------------------------------------------------------
# weight=


@pytest.mark.parametrize("dtype", dtype_params(EXACT))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", case_params([LossCase("huber", 1.0), LossCase("huber", 0.5),
                                              LossCase("l1"), LossCase("mse")]))
def test_weight(backend, case, reduction, dtype):
    x, y = make_layout("n1023", dtype)
    w = torch.rand(x.shape, dtype=dtype) * 2
    xf, yf, wf = leaves(x, y, w)
    xt, yt, wt = leaves(x, y, w)
    loss = case.fused(xf, yf, reduction, weight=wf)
    expected = case.torch(xt, yt, reduction, weight=wt)
    assert loss.dtype == expected.dtype and loss.shape == expected.shape
    rtol = 1e-6 if dtype == torch.float32 else 1e-12
    if reduction == "none":
        assert_ulp(loss, expected, 1, "weighted loss")
    else:
        assert_close_to_ref(loss, expected, rtol=rtol, what="weighted loss")
    g = grad_output_for(expected, "random")
    got_grads = torch.autograd.grad(loss, (xf, yf, wf), g)
    expected_grads = torch.autograd.grad(expected, (xt, yt, wt), g)
    for a, b, name in zip(got_grads, expected_grads, ("input", "target", "weight")):
        assert_close_to_ref(a, b, rtol=rtol, atol=rtol * float(b.abs().max()), what=f"grad {name}")


@pytest.mark.parametrize("weight_shape", [(1022,), (1, 1023), (1,)], ids=str)
@pytest.mark.parametrize("case", case_params([LossCase("huber", 1.0), LossCase("l1"), LossCase("mse")]))
def test_weight_of_wrong_size(backend, case, weight_shape):
    x, y = make_layout("n1023", torch.float32)
    w = torch.ones(weight_shape)
    error = _raises_like_torch(lambda: case.fused(x, y, weight=w), lambda: case.torch(x, y, weight=w))
    assert isinstance(error, ValueError) and "same size" in str(error)


# --------------------------------------------------------------------------------------------
# dtype rules


DTYPE_RULES = [
    pytest.param(torch.float32, (5,), torch.float64, (5,), id="f32-f64"),
    pytest.param(torch.float64, (5,), torch.float32, (5,), id="f64-f32"),
    pytest.param(torch.float16, (5,), torch.float32, (5,), id="f16-f32"),
    pytest.param(torch.bfloat16, (5,), torch.float16, (5,), id="bf16-f16"),
    pytest.param(torch.float32, (5,), torch.int64, (5,), id="f32-i64"),
    pytest.param(torch.float32, (5,), torch.float64, (), id="f32-0dim_f64"),
    pytest.param(torch.float64, (), torch.float32, (5,), id="0dim_f64-f32"),
    pytest.param(torch.float16, (5,), torch.float32, (), id="f16-0dim_f32"),
    pytest.param(torch.float32, (), torch.float64, (), id="0dim_f32-0dim_f64"),
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("in_dtype, in_shape, tg_dtype, tg_shape", DTYPE_RULES)
@pytest.mark.parametrize("case", case_params(CORE_CASES))
def test_dtype_rules(backend, case, reduction, in_dtype, in_shape, tg_dtype, tg_shape):
    """The result dtype (and value) of mixed-dtype arguments is torch's: huber computes in input's
    dtype, the others in the promoted dtype of the broadcast arguments."""
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(in_shape, generator=gen, dtype=torch.float64) * 2).to(in_dtype)
    y = (torch.randn(tg_shape, generator=gen, dtype=torch.float64) * 2).to(tg_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the broadcasting warning of the 0-dim cases
        got = case.fused(x, y, reduction)
        expected = case.torch(x, y, reduction)
    assert got.dtype == expected.dtype, f"result dtype {got.dtype}, torch gives {expected.dtype}"
    assert got.shape == expected.shape
    rtol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(expected.dtype, 4 * 2.0**-7)
    assert_close_to_ref(got, expected, rtol=rtol, atol=rtol, what="value")


# --------------------------------------------------------------------------------------------
# gradcheck, gradgradcheck and Hessian-vector products (float64)


def away_from_kinks(case: LossCase, shape, seed=5):
    """float64 (input, target) whose differences are at least 1e-2 * p from 0 and from +-p."""
    p = case.param if case.param else 1.0
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(shape, generator=gen, dtype=torch.float64)
    inside = torch.rand(shape, generator=gen, dtype=torch.float64) * 0.8 + 0.1  # (0.1, 0.9) p
    outside = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 + 1.1  # (1.1, 3.1) p
    magnitude = torch.where(torch.rand(shape, generator=gen) < 0.5, inside, outside) * p
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    return y + sign * magnitude, y


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", case_params(ALL_CASES))
def test_gradcheck(backend, case, reduction):
    x, y = away_from_kinks(case, (3, 4))
    x.requires_grad_()
    y.requires_grad_()
    fn = functools.partial(case.fused, reduction=reduction)
    assert torch.autograd.gradcheck(fn, (x, y))
    assert torch.autograd.gradgradcheck(fn, (x, y))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", case_params(ALL_CASES))
def test_hessian_vector_product(backend, case, reduction):
    """Double backward (create_graph=True) matches torch's, including at random grad_output."""
    x, y = make_layout("n1023", torch.float64)
    xf, yf = leaves(x, y)
    xt, yt = leaves(x, y)
    g = make_grad_output(() if reduction != "none" else x.shape, torch.float64)
    v = make_grad_output(x.shape, torch.float64, seed=9)
    results = []
    for fn, a, b in ((case.fused, xf, yf), (case.torch, xt, yt)):
        grads = torch.autograd.grad(fn(a, b, reduction), (a, b), g, create_graph=True)
        hvp = torch.autograd.grad((grads[0] * v).sum() + (grads[1] * v * 0.5).sum(), (a, b),
                                  allow_unused=True, materialize_grads=True)
        results.append((grads, hvp))
    (grads_f, hvp_f), (grads_t, hvp_t) = results
    for got, exp, name in zip(grads_f + hvp_f, grads_t + hvp_t,
                              ("grad input", "grad target", "hvp input", "hvp target")):
        # differentiable formulas round in another order than torch's double-backward kernels
        atol = 1e-12 * float(exp.abs().max())
        assert_close_to_ref(got.detach(), exp.detach(), rtol=1e-12, atol=atol, what=name)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", case_params(CORE_CASES))
def test_second_derivative_at_zero_difference(backend, case, reduction):
    """At d == 0 exactly the losses are smooth (quadratic) except l1: the second derivative is
    2 (mse), 1 / beta (smooth_l1), 1 (huber), 0 (l1), as torch computes it."""
    x = torch.tensor([0.25, -1.0, 3.0], dtype=torch.float64, requires_grad=True)
    y = x.detach().clone()
    (grad,) = torch.autograd.grad(case.fused(x, y, reduction).sum(), x, create_graph=True)
    (hessian_diagonal,) = torch.autograd.grad(grad.sum(), x)
    curvature = {"l1": 0.0, "mse": 2.0, "smooth_l1": 1.0 / (case.param or 1.0), "huber": 1.0}[case.kind]
    expected = torch.full_like(x, curvature / (3 if reduction == "mean" else 1))
    xt = x.detach().clone().requires_grad_()
    (grad_t,) = torch.autograd.grad(case.torch(xt, y, reduction).sum(), xt, create_graph=True)
    (hessian_t,) = torch.autograd.grad(grad_t.sum(), xt, allow_unused=True, materialize_grads=True)
    assert_close_to_ref(hessian_t, expected, rtol=1e-15, what="torch's second derivative")
    assert_close_to_ref(hessian_diagonal, expected, rtol=1e-15, what="second derivative at d == 0")


# --------------------------------------------------------------------------------------------
# torch.library.opcheck of the compiled ops


OP_KINDS = [("l1", 0.0), ("mse", 0.0), ("smooth_l1", 1.0), ("smooth_l1", 2.5), ("huber", 0.5)]


def _opcheck_inputs(requires_grad=False, dtype=torch.float32):
    x, y = make_pair((5, 7), dtype, seed=11)
    return x.requires_grad_(requires_grad), y.requires_grad_(requires_grad)


@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("kind, param", OP_KINDS)
def test_opcheck_regression_loss(kind, param, reduction):
    x, y = _opcheck_inputs(requires_grad=True)
    torch.library.opcheck(torch.ops.fusedmtl.regression_loss.default, (x, y, kind, param, reduction))


@pytest.mark.parametrize("input_grad, target_grad", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("reduction", [1, 2])
@pytest.mark.parametrize("kind, param", OP_KINDS)
def test_opcheck_regression_loss_with_grad(kind, param, reduction, input_grad, target_grad):
    x, y = _opcheck_inputs()
    torch.library.opcheck(
        torch.ops.fusedmtl.regression_loss_with_grad.default,
        (x, y, kind, param, reduction, input_grad, target_grad),
    )


@pytest.mark.parametrize("input_grad, target_grad", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("kind, param", OP_KINDS)
def test_opcheck_regression_loss_backward(kind, param, reduction, input_grad, target_grad):
    x, y = _opcheck_inputs()
    g = torch.randn(x.shape if reduction == 0 else ())
    torch.library.opcheck(
        torch.ops.fusedmtl.regression_loss_backward.default,
        (g, x, y, kind, param, reduction, input_grad, target_grad),
    )


@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("kind, param", OP_KINDS)
def test_ops_match_functional(kind, param, reduction):
    """The raw ops compute what the functional losses compute (and what torch computes)."""
    x, y = _opcheck_inputs()
    case = LossCase(kind, None if kind in ("l1", "mse") else param)
    name = REDUCTIONS[reduction]
    loss = torch.ops.fusedmtl.regression_loss(x, y, kind, param, reduction)
    with fusedmtl.backend.use("native"), torch.no_grad():
        assert_bitwise(loss, case.fused(x, y, name), "op vs functional")
    if reduction:
        loss2, gx, gy = torch.ops.fusedmtl.regression_loss_with_grad(x, y, kind, param, reduction, True, True)
        assert_bitwise(loss2, loss, "regression_loss_with_grad loss")
        one = torch.ones(())
        bx, by = torch.ops.fusedmtl.regression_loss_backward(one, x, y, kind, param, reduction, True, True)
        assert_bitwise(bx, gx, "backward vs with_grad")
        assert_bitwise(by, gy, "backward vs with_grad")


# --------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.compile
@pytest.mark.parametrize("case", case_params([LossCase("smooth_l1", 0.5), LossCase("huber", 2.5),
                                              LossCase("l1"), LossCase("mse")]))
def test_torch_compile(case):
    torch._dynamo.reset()
    try:
        def fn(a, b):
            return case.fused(a * 1.5, b, "mean")

        compiled = torch.compile(fn, fullgraph=True)
        x, y = make_pair((9, 13), torch.float32, seed=13)
        xc, yc = leaves(x, y)
        xt, yt = leaves(x, y)
        loss = compiled(xc, yc)
        expected = case.torch(xt * 1.5, yt, "mean")
        assert_close_to_ref(loss, expected, rtol=1e-6, what="compiled loss")
        loss.backward()
        expected.backward()
        assert_close_to_ref(xc.grad, xt.grad, rtol=1e-6, atol=1e-9, what="compiled grad input")
        assert_close_to_ref(yc.grad, yt.grad, rtol=1e-6, atol=1e-9, what="compiled grad target")
    finally:
        torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# torch.func


@pytest.mark.parametrize("case", case_params(CORE_CASES))
def test_torch_func_grad(backend, case):
    x, y = make_layout("n1023", torch.float64)
    got = torch.func.grad(lambda a, b: case.fused(a, b, "mean"), argnums=(0, 1))(x, y)
    expected = torch.func.grad(lambda a, b: case.torch(a, b, "mean"), argnums=(0, 1))(x, y)
    assert_ulp(got[0], expected[0], 1, "func.grad input")
    assert_ulp(got[1], expected[1], 1, "func.grad target")


# --------------------------------------------------------------------------------------------
# Determinism across thread counts (native kernels: fixed blocks summed in order)


@functools.lru_cache(maxsize=1)
def _large_pair():
    return make_pair((3_000_017,), torch.float32, seed=17)


def _loss_and_grads(case, reduction, x, y):
    xf, yf = leaves(x, y)
    loss = case.fused(xf, yf, reduction)
    fast = torch.autograd.grad(loss, (xf, yf), retain_graph=True)  # grad_output 1: fast path
    again = torch.autograd.grad(loss, (xf, yf), torch.tensor(0.75))  # recomputed in backward
    return loss.detach(), *fast, *again


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", case_params(CORE_CASES))
def test_thread_count_determinism(case, reduction, restore_num_threads):
    x, y = _large_pair()
    with fusedmtl.backend.use("native"):
        torch.set_num_threads(1)
        one = _loss_and_grads(case, reduction, x, y)
        torch.set_num_threads(2)
        two = _loss_and_grads(case, reduction, x, y)
    for a, b, name in zip(one, two, ("loss", "fast grad input", "fast grad target", "grad input",
                                     "grad target")):
        assert_bitwise(b, a, f"{name}: 2 threads vs 1")
    check_loss(case, reduction, x, y, one[0], case.torch(x, y, reduction))


# --------------------------------------------------------------------------------------------
# Every CPU capability


CAPABILITIES = ("default", "avx2", "avx512")
_CAPABILITY_ORDER = {name: i for i, name in enumerate(CAPABILITIES)}


def _run_all(case, reduction, x, y):
    xf, yf = leaves(x, y)
    loss = case.fused(xf, yf, reduction)
    g = grad_output_for(loss, "random")
    fast = torch.autograd.grad(loss, (xf, yf), torch.ones_like(loss), retain_graph=True)
    again = torch.autograd.grad(loss, (xf, yf), g)
    with torch.no_grad():
        plain = case.fused(x, y, reduction)
    return g, (loss.detach(), plain, *fast, *again)


@pytest.mark.parametrize("n", [37, 100003])
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", case_params(CORE_CASES))
@pytest.mark.parametrize("capability", CAPABILITIES)
def test_cpu_capability_parity(capability, case, reduction, dtype, n, restore_cpu_capability):
    x, y = make_pair((n,), dtype, seed=n)
    with fusedmtl.backend.use("native"):
        assert fusedmtl._C.set_cpu_capability("default") == "default"
        _, baseline = _run_all(case, reduction, x, y)
        actual = fusedmtl._C.set_cpu_capability(capability)
        assert _CAPABILITY_ORDER[actual] <= _CAPABILITY_ORDER[capability]
        assert fusedmtl._C.cpu_capability() == actual
        g, results = _run_all(case, reduction, x, y)
    names = ("loss", "loss without grad", "fast grad input", "fast grad target", "grad input",
             "grad target")
    if dtype in EXACT:
        for a, b, name in zip(results, baseline, names):
            assert_bitwise(a, b, f"{name}: {actual} vs default")
    xt, yt = leaves(x, y)
    expected = case.torch(xt, yt, reduction)
    check_loss(case, reduction, x, y, results[0], expected.detach())
    check_loss(case, reduction, x, y, results[1], expected.detach())
    expected_fast = torch.autograd.grad(expected, (xt, yt), torch.ones_like(expected), retain_graph=True)
    expected_again = torch.autograd.grad(expected, (xt, yt), g)
    check_grad(case, reduction, x, y, torch.ones_like(g), results[2], expected_fast[0],
               case.is_default, "fast grad input")
    check_grad(case, reduction, x, y, g, results[4], expected_again[0], False, "grad input")
    assert_bitwise(results[3], -results[2], "fast grad target")
    assert_bitwise(results[5], -results[4], "grad target")


# --------------------------------------------------------------------------------------------
# Property test


def _elements(dtype):
    width = 32 if dtype == torch.float32 else 64
    return st.one_of(
        st.floats(-8, 8, width=width),
        st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 2.5, -2.5, math.inf, -math.inf, math.nan]),
    )


@st.composite
def _loss_problems(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=3)))
    n = math.prod(shape)
    xs = draw(st.lists(_elements(dtype), min_size=n, max_size=n))
    ys = draw(st.lists(_elements(dtype), min_size=n, max_size=n))
    op = draw(st.sampled_from(["l1", "mse", "smooth_l1", "huber"]))
    param = None
    if op == "smooth_l1":
        param = draw(st.one_of(st.just(0.0), st.floats(1e-3, 4.0)))
    elif op == "huber":
        param = draw(st.floats(1e-3, 4.0))
    reduction = draw(st.sampled_from(REDUCTIONS))
    backend = draw(st.sampled_from(BACKENDS))
    x = torch.tensor(xs, dtype=dtype).reshape(shape)
    y = torch.tensor(ys, dtype=dtype).reshape(shape)
    return LossCase(op, param), reduction, backend, x, y


@settings(max_examples=50, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(_loss_problems())
def test_property_matches_torch(problem):
    case, reduction, backend, x, y = problem
    xf, yf = leaves(x, y)
    xt, yt = leaves(x, y)
    with fusedmtl.backend.use(backend):
        loss = case.fused(xf, yf, reduction)
    expected = case.torch(xt, yt, reduction)
    if reduction == "none":
        assert_bitwise(loss.detach(), expected.detach(), "loss")
    else:
        assert_close_to_ref(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-30, what="loss")
    g = grad_output_for(expected, "random")
    got = torch.autograd.grad(loss, (xf, yf), g)
    exp = torch.autograd.grad(expected, (xt, yt), g)
    assert_ulp(got[0], exp[0], 1, "grad input")
    assert_ulp(got[1], exp[1], 1, "grad target")
    assert_bitwise(got[1], -got[0], "grad target vs -grad input")
