"""Gradients of the regression losses beyond first-order parity: gradcheck, gradgradcheck,
Hessian-vector products, torch.func, torch.compile."""

from __future__ import annotations

import functools

import pytest
import torch
from loss_helpers import (
    leaves,
    make_layout,
)

from tests.helpers import (
    ALL_CASES,
    CORE_CASES,
    REDUCTIONS,
    LossCase,
    assert_close_to_ref,
    assert_ulp,
    case_params,
    make_grad_output,
    make_pair,
)

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
        hvp = torch.autograd.grad(
            (grads[0] * v).sum() + (grads[1] * v * 0.5).sum(),
            (a, b),
            allow_unused=True,
            materialize_grads=True,
        )
        results.append((grads, hvp))
    (grads_f, hvp_f), (grads_t, hvp_t) = results
    for got, exp, name in zip(
        grads_f + hvp_f, grads_t + hvp_t, ("grad input", "grad target", "hvp input", "hvp target")
    ):
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
    curvature = {"l1": 0.0, "mse": 2.0, "smooth_l1": 1.0 / (case.param or 1.0), "huber": 1.0}[
        case.kind
    ]
    expected = torch.full_like(x, curvature / (3 if reduction == "mean" else 1))
    xt = x.detach().clone().requires_grad_()
    (grad_t,) = torch.autograd.grad(case.torch(xt, y, reduction).sum(), xt, create_graph=True)
    (hessian_t,) = torch.autograd.grad(grad_t.sum(), xt, allow_unused=True, materialize_grads=True)
    assert_close_to_ref(hessian_t, expected, rtol=1e-15, what="torch's second derivative")
    assert_close_to_ref(hessian_diagonal, expected, rtol=1e-15, what="second derivative at d == 0")


# --------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.compile
@pytest.mark.parametrize(
    "case",
    case_params(
        [LossCase("smooth_l1", 0.5), LossCase("huber", 2.5), LossCase("l1"), LossCase("mse")]
    ),
)
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
