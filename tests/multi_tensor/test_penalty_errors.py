"""fusedmtl.multi_tensor.l1_l2_penalty_ and the errors of every op.

The oracle and the precision contract are in multi_tensor_oracle.py."""

from __future__ import annotations

import pytest
import torch
from multi_tensor_oracle import (
    assert_near,
    assert_rel,
    build_problem,
    check_combine,
    check_normalized_sum,
    penalty_params,
    random_coeffs,
    reduce_rtol,
    result_dtype,
    ulp_in,
    unit_roundoff,
)

import fusedmtl.multi_tensor as mt
from tests.helpers import assert_bitwise, dtype_params

# --------------------------------------------------------------------------------------------
# l1_l2_penalty_


PENALTY_COEFFS = [(0.01, 0.0), (0.0, 0.003), (0.25, 1.5), (0.0, 0.0)]


@pytest.mark.parametrize("grads", ["all", "none", "mixed"])
@pytest.mark.parametrize("l1, l2", PENALTY_COEFFS, ids=lambda v: f"{v:g}")
@pytest.mark.parametrize("dtype", dtype_params())
def test_l1_l2_penalty(backend, dtype, l1, l2, grads):
    params = penalty_params(dtype, grads)
    values = [w.detach().clone() for w in params]
    old = [None if w.grad is None else w.grad.clone() for w in params]
    old_objects = [w.grad for w in params]
    value = mt.l1_l2_penalty_(params, l1=l1, l2=l2)

    assert isinstance(value, torch.Tensor) and value.dim() == 0, f"value {value!r}"
    assert value.dtype == result_dtype(dtype), f"value dtype {value.dtype}"
    w64 = [v.double() for v in values]
    ref = l1 * sum(float(w.abs().sum()) for w in w64) + l2 * sum(float((w * w).sum()) for w in w64)
    ref = torch.tensor(ref, dtype=torch.float64)
    assert_rel(value, ref, ref, reduce_rtol(dtype), "penalty value")

    u = unit_roundoff(dtype)
    for k, (w, v, g0) in enumerate(zip(params, values, old)):
        what = f"param {k} {tuple(v.shape)}"
        assert_bitwise(w.detach(), v, f"{what}: weights modified")
        assert w.grad is not None, f"{what}: .grad not created"
        assert w.grad.dtype == dtype and w.grad.shape == v.shape, f"{what}: .grad {w.grad.dtype}"
        if g0 is not None:
            assert w.grad is old_objects[k], f"{what}: .grad replaced instead of added into"
        v64 = v.double()
        addend = l1 * torch.sign(v64) + 2 * l2 * v64
        slack = 4 * u * addend.abs()
        ref_g = addend
        if g0 is not None:
            ref_g = g0.double() + addend
            # the gradient may be rounded to the dtype once before it is added
            slack = slack + 4 * u * g0.double().abs() + ulp_in(dtype, addend)
        assert_near(w.grad, ref_g, slack, 1, f"{what}: .grad")
        # sign(0) == 0: where w == 0 nothing is added
        zero = v == 0
        if g0 is not None:
            assert_bitwise(w.grad[zero], g0[zero], f"{what}: .grad where w == 0")
        else:
            assert_bitwise(
                w.grad[zero], torch.zeros_like(w.grad[zero]), f"{what}: .grad where w == 0"
            )
    assert sum(int((v == 0).sum()) for v in values) > 100  # the w == 0 case occurs


def test_l1_l2_penalty_l1_only_gradient_is_sign(backend):
    """float32, l1 only, .grad None: .grad is exactly l1 * sign(w)."""
    params = penalty_params(torch.float32, "none", seed=51)
    mt.l1_l2_penalty_(params, l1=0.125)
    for w in params:
        assert_bitwise(w.grad, 0.125 * torch.sign(w.detach()), "l1 * sign(w)")


# --------------------------------------------------------------------------------------------
# Errors


def _error_problem():
    shapes = [(3,), (2, 2), (5,), (1,), (4,), (6,), (2, 3)]
    return build_problem(shapes, 4, torch.float32, seed=60)


def _bad_lists(case):
    g = _error_problem().lists()
    if case == "dtype":
        g[2][5] = g[2][5].double()
    elif case == "dtype_half":
        g[2][5] = g[2][5].half()
    elif case == "device":
        g[2][5] = g[2][5].to("meta")
    elif case == "shape":
        g[2][5] = torch.zeros(7)
    elif case == "shape_same_numel":  # (2, 3) instead of (6,)
        g[2][5] = torch.zeros(2, 3)
    elif case == "shorter":
        g[2] = g[2][:-1]
    elif case == "longer":
        g[2] = g[2] + [torch.zeros(3)]
    elif case == "no_tasks":
        g = []
    else:
        raise ValueError(case)
    return g


ERROR_CASES = {  # case -> words the message must contain
    "dtype": ("task 2", "parameter 5"),
    "dtype_half": ("task 2", "parameter 5"),
    "device": ("task 2", "parameter 5"),
    "shape": ("task 2", "parameter 5"),
    "shape_same_numel": ("task 2", "parameter 5"),
    "shorter": ("task 2",),
    "longer": ("task 2",),
    "no_tasks": (),
}


def _call(fn, task_grads, K=None):
    if fn == "combine":
        return mt.combine(task_grads, [0.5] * (len(task_grads) if K is None else K))
    return getattr(mt, fn)(task_grads)


@pytest.mark.parametrize("fn", ["norms", "gramian", "combine", "normalized_sum"])
@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors(backend, case, fn):
    with pytest.raises((ValueError, RuntimeError)) as excinfo:
        _call(fn, _bad_lists(case))
    message = str(excinfo.value)
    for word in ERROR_CASES[case]:
        assert word in message, f"{word!r} not in the message {message!r}"


def test_errors_with_none_entries(backend):
    """The reference tensor of a parameter is the first task that reaches it."""
    g = _error_problem().lists()
    g[0][5] = None
    g[1][5] = None
    g[3][5] = torch.zeros(7)  # task 2 has (6,)
    with pytest.raises((ValueError, RuntimeError)) as excinfo:
        mt.gramian(g)
    assert "task 3" in str(excinfo.value) and "parameter 5" in str(excinfo.value), str(
        excinfo.value
    )


@pytest.mark.parametrize("fn", ["combine", "normalized_sum"])
def test_valid_call_after_error(backend, fn):
    """A valid call after a failed one works (no state left behind by the error)."""
    with pytest.raises((ValueError, RuntimeError)):
        _call(fn, _bad_lists("shape"))
    prob = _error_problem()
    if fn == "combine":
        c = random_coeffs(prob.K)
        check_combine(prob, c, mt.combine(prob.lists(), c))
    else:
        check_normalized_sum(prob, mt.normalized_sum(prob.lists()), 1e-8)


@pytest.mark.parametrize(
    "coeffs", ["short_list", "long_list", "short_tensor", "long_tensor", "matrix"]
)
def test_combine_coeffs_length_error(backend, coeffs):
    g = _error_problem().lists()  # K = 4
    bad = {
        "short_list": [1.0, 2.0, 3.0],
        "long_list": [1.0] * 5,
        "short_tensor": torch.ones(3),
        "long_tensor": torch.ones(5),
        "matrix": torch.ones(4, 4),
    }[coeffs]
    with pytest.raises((ValueError, RuntimeError)):
        mt.combine(g, bad)


# --------------------------------------------------------------------------------------------
