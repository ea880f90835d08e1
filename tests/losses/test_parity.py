"""Parity of fusedmtl's regression losses (python/fusedmtl/losses/functional.py) with
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

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from loss_helpers import (
    CUDA_LAYOUTS,
    EXACT,
    LAYOUTS,
    NONCONTIGUOUS,
    check_grad,
    check_loss,
    grad_output_for,
    leaves,
    loose_rtol,
    make_layout,
)

import fusedmtl
import fusedmtl.nn
from tests.helpers import (
    ALL_CASES,
    CORE_CASES,
    DEFAULT_CASES,
    REDUCTIONS,
    assert_bitwise,
    assert_close_to_ref,
    assert_ulp,
    case_params,
    dtype_params,
    make_pair,
    ref_grad64,
    ref_loss64,
    smallest_subnormal,
    ulp_diff,
)


@pytest.mark.parametrize("dtype", dtype_params())
def test_ulp_diff_helper(dtype):
    """The comparison helper itself: distances in ulps across zero, subnormals, inf and NaN."""
    info = torch.finfo(dtype)
    one = torch.tensor([1.0], dtype=dtype)
    up = torch.nextafter(one, torch.tensor([2.0], dtype=dtype))
    tiny = torch.tensor([smallest_subnormal(dtype)], dtype=dtype)
    cases = [
        (one, one, 0),
        (one, up, 1),
        (up, one, 1),
        (-one, -up, 1),
        (torch.tensor([0.0], dtype=dtype), torch.tensor([-0.0], dtype=dtype), 0),
        (tiny, -tiny, 2),
        (tiny, torch.tensor([0.0], dtype=dtype), 1),
        (torch.tensor([info.max], dtype=dtype), torch.tensor([math.inf], dtype=dtype), 1),
        (torch.tensor([math.nan], dtype=dtype), torch.tensor([-math.nan], dtype=dtype), 0),
    ]
    for a, b, expected in cases:
        assert int(ulp_diff(a, b)) == expected, (a, b)
    assert int(ulp_diff(torch.tensor([math.nan], dtype=dtype), one)) > 2**60
    assert (
        int(ulp_diff(torch.tensor([-math.inf], dtype=dtype), torch.tensor([math.inf], dtype=dtype)))
        > 1000
    )


# --------------------------------------------------------------------------------------------
# Forward and backward parity over op x parameter x reduction x dtype x layout x backend x device
# (on CUDA the core cases over CUDA_LAYOUTS: every kernel path, a fraction of the CPU's matrix)


@pytest.mark.cuda_subset(case=CORE_CASES, layout=CUDA_LAYOUTS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", case_params(ALL_CASES))
def test_forward_parity(backend, device, case, reduction, dtype, layout):
    x, y = (t.to(device) for t in make_layout(layout, dtype))
    got = case.fused(x, y, reduction)
    check_loss(case, reduction, x, y, got, case.torch(x, y, reduction))


@pytest.mark.cuda_subset(case=CORE_CASES, layout=CUDA_LAYOUTS)
@pytest.mark.parametrize("grad_kind", ["random", "one"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", case_params(ALL_CASES))
def test_backward_parity(backend, device, case, reduction, dtype, layout, grad_kind):
    """Gradients w.r.t. input and target; grad_output random or exactly 1 (for mean/sum, 1 is the
    eager fast path that hands the gradient computed in forward to autograd). On every device."""
    x, y = (t.to(device) for t in make_layout(layout, dtype))
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
def test_gradient_of_one_argument(backend, device, case, reduction, dtype, which):
    """Only one of input and target requires grad (the kernels that compute one gradient)."""
    x, y = (t.to(device) for t in make_layout("n1023", dtype))
    xf, yf = (
        (x.detach().requires_grad_(), y) if which == "input" else (x, y.detach().requires_grad_())
    )
    xt, yt = (
        (x.detach().requires_grad_(), y) if which == "input" else (x, y.detach().requires_grad_())
    )
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
# Edge cases, on every device (on CUDA the core cases: the other parameter values take the same
# kernel paths): special values, signed zeros, the branch boundaries, broadcasting, beta == 0,
# empty tensors

# Special values: |d| == beta, d == 0, NaN and +-inf, in input and target


def special_values(param: float, dtype: torch.dtype) -> torch.Tensor:
    p = torch.tensor(param, dtype=dtype)
    values = [
        torch.tensor(v, dtype=dtype)
        for v in (
            0.0,
            -0.0,
            param,
            -param,
            0.5 * param,
            -0.5 * param,
            2 * param,
            1.0,
            -3.0,
            1e-30,
            math.inf,
            -math.inf,
            math.nan,
        )
    ]
    values += [
        torch.nextafter(p, torch.tensor(0.0, dtype=dtype)),
        torch.nextafter(p, torch.tensor(math.inf, dtype=dtype)),
    ]
    return torch.stack(values)


def special_pairs(param: float, dtype: torch.dtype):
    """Every (input, target) pair of special values, twice: the second copy shifted by 5 elements so
    that each pair is seen by both the vectorised body and the scalar tail of torch's kernels."""
    v = special_values(param, dtype)
    x = v.repeat_interleave(len(v))
    y = v.repeat(len(v))
    pad = torch.ones(5, dtype=dtype)
    return torch.cat([x, pad, x]), torch.cat([y, pad * 0.25, y])


@pytest.mark.cuda_subset(case=CORE_CASES)
@pytest.mark.parametrize("grad_kind", ["random", "one"])
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", case_params(ALL_CASES))
def test_special_values(backend, device, case, reduction, dtype, grad_kind):
    x, y = (t.to(device) for t in special_pairs(case.param if case.param else 1.0, dtype))
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
            assert_ulp(
                loss, ref_loss64(case.kind, case.param, x, y).to(dtype), 1, "loss vs float64"
            )

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
def test_l1_of_negative_zero_difference(backend, device, dtype, reduction):
    """d = -0.0 - 0.0 = -0.0: torch's abs gives +0.0, so the loss (and e.g. 1 / loss) is +0."""
    x = torch.tensor([-0.0, 0.0, -0.0] * 11, dtype=dtype, device=device)
    y = torch.tensor([0.0, -0.0, -0.0] * 11, dtype=dtype, device=device)
    for loss in (
        fusedmtl.l1_loss(x, y, reduction=reduction),
        fusedmtl.smooth_l1_loss(x, y, reduction=reduction, beta=0.0),
    ):
        expected = F.l1_loss(x, y, reduction=reduction)
        assert torch.equal(loss.signbit(), expected.signbit()), (
            f"signbit of the loss {loss.signbit().int().tolist()}, torch "
            f"{expected.signbit().int().tolist()}"
        )


@pytest.mark.parametrize("dtype", dtype_params(EXACT))
@pytest.mark.parametrize("case", case_params(CORE_CASES))
def test_boundary_points_exact(backend, device, case, dtype):
    """At |d| == beta (delta) the linear branch and its gradient are taken, at d == 0 the loss and
    the gradient are 0, as in torch, with values checked explicitly."""
    p = case.param if case.param else 1.0
    x = torch.tensor([p, -p, 0.0, 3.0 + p, 3.0], dtype=dtype, device=device, requires_grad=True)
    y = torch.tensor([0.0, 0.0, 0.0, 3.0, 3.0 + p], dtype=dtype, device=device)
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
    assert_bitwise(
        loss.detach(), torch.tensor(expected_loss, dtype=dtype), "loss at the boundaries"
    )
    assert_bitwise(grad, torch.tensor(expected_grad, dtype=dtype), "grad at the boundaries")


# --------------------------------------------------------------------------------------------
# Broadcasting


BROADCAST_SHAPES = [
    pytest.param(((4, 1, 5), (3, 5)), id="in4x1x5-tg3x5"),
    pytest.param(((3, 5), (4, 1, 5)), id="in3x5-tg4x1x5"),
    pytest.param(((6, 1), (6,)), id="in6x1-tg6"),
]


# (broadcasting happens in Python, before the kernels: on CUDA one pair of shapes, default cases)
@pytest.mark.cuda_subset(case=DEFAULT_CASES, shapes=BROADCAST_SHAPES[0].values)
@pytest.mark.parametrize("shapes", BROADCAST_SHAPES)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", case_params(CORE_CASES))
def test_broadcast(backend, device, case, reduction, dtype, shapes):
    x = make_pair(shapes[0], dtype, seed=3)[0].to(device)
    y = make_pair(shapes[1], dtype, seed=4)[1].to(device)
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
    rtol = (
        {torch.float64: 1e-12, torch.float32: 1e-6}[dtype] if dtype in EXACT else loose_rtol(dtype)
    )
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
def test_smooth_l1_beta_zero_is_l1(backend, device, reduction, dtype):
    x, y = (t.to(device) for t in make_layout("n1023", dtype))
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


@pytest.mark.cuda_subset(case=CORE_CASES)
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4, 2)], ids=str)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("case", case_params(ALL_CASES))
def test_empty(backend, device, case, dtype, shape):
    """Nothing to compute: on CUDA a launch over no element (a grid of 0 blocks is an error)."""
    empty = [torch.empty(shape, dtype=dtype, device=device) for _ in range(2)]
    x, y = leaves(*empty)
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
