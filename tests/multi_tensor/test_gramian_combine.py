"""fusedmtl.multi_tensor norms, gramian, combine and normalized_sum against the float64 oracle.

The oracle and the precision contract are in multi_tensor_oracle.py."""

from __future__ import annotations

import math

import pytest
import torch
from multi_tensor_oracle import (
    LAYOUTS,
    assert_near,
    assert_rel,
    build_problem,
    check_combine,
    check_gramian,
    check_normalized_sum,
    check_norms,
    layout_problem,
    problem_for,
    random_coeffs,
    reduce_rtol,
    skip_slow_for_triton,
    ulp_in,
    unit_roundoff,
)

import fusedmtl.multi_tensor as mt
from tests.helpers import assert_bitwise, dtype_params

# --------------------------------------------------------------------------------------------
# The helpers themselves


def test_oracle_helpers():
    x = torch.tensor([1.0, 1.5, 0.0, -3.0, 2.0**-30], dtype=torch.float64)
    assert ulp_in(torch.float16, x).tolist() == [2.0**-10, 2.0**-10, 2.0**-24, 2.0**-9, 2.0**-24]
    assert ulp_in(torch.float32, x)[0].item() == 2.0**-23
    assert ulp_in(torch.bfloat16, x)[3].item() == 2.0**-6
    one = torch.tensor([1.0], dtype=torch.float16)
    assert_near(one, torch.tensor([1.0 + 2.0**-10]), 0.0, 1, "one ulp")
    with pytest.raises(AssertionError):
        assert_near(one, torch.tensor([1.0 + 2.0**-8]), 0.0, 1, "four ulps")
    with pytest.raises(AssertionError):
        assert_near(torch.tensor([math.nan]), torch.tensor([1.0]), 1.0, 1, "nan")
    prob = layout_problem("none", torch.float64)
    assert prob.dense64.shape == (4, sum(prob.numels))
    assert prob.reached == [True, True, False, True, True, True]
    assert float(prob.norms64[3]) == 0.0
    noncontig = layout_problem("noncontig", torch.float32)
    assert noncontig.shapes[0] == (45, 37) and noncontig.shapes[3] == (4, 5)


# --------------------------------------------------------------------------------------------
# norms and gramian


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_norms_and_gramian(backend, device, layout, dtype):
    skip_slow_for_triton(backend, layout, device)
    prob = problem_for(layout, dtype, backend, device)
    norms = mt.norms(prob.lists(device=device))
    gram = mt.gramian(prob.lists(device=device))
    assert norms.device.type == gram.device.type == device
    check_norms(prob, norms)
    check_gramian(prob, gram)
    # the diagonal of the gramian is norms**2
    rtol = 2 * reduce_rtol(dtype) + 4 * unit_roundoff(dtype)
    diag = gram.diagonal().double()
    assert_rel(norms.double() ** 2, diag, diag, rtol, "norms**2 vs gramian diagonal")
    if layout == "zero_task":
        assert float(norms[1]) == 0.0
        assert bool((gram[1] == 0).all()) and bool((gram[:, 1] == 0).all())
    if layout == "none":  # task 3 reaches nothing
        assert float(norms[3]) == 0.0 and bool((gram[3] == 0).all())


# --------------------------------------------------------------------------------------------
# combine


@pytest.mark.parametrize("coeff_kind", ["tensor", "list"])
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_combine(backend, device, layout, dtype, coeff_kind):
    skip_slow_for_triton(backend, layout, device)
    prob = problem_for(layout, dtype, backend, device)
    c = random_coeffs(prob.K)
    if coeff_kind == "tensor":
        coeffs = c.to(torch.float32)
        c = coeffs.double()
        coeffs = coeffs.to(device)
    else:
        coeffs = c.tolist()
    outs = mt.combine(prob.lists(device=device), coeffs)
    check_combine(prob, c, outs)


@pytest.mark.parametrize(
    "coeff_kind", ["f16", "bf16", "f32", "f64", "list", "tuple", "ints_as_floats"]
)
@pytest.mark.parametrize("dtype", dtype_params())
def test_combine_coeff_types(backend, dtype, coeff_kind):
    """coeffs: a Tensor[K] of any float dtype, or a sequence of K floats."""
    prob = build_problem([(1,), (3,), (1023,), (2, 5)], 3, dtype, seed=21)
    c = random_coeffs(prob.K, seed=22)
    tensor_dtypes = {
        "f16": torch.float16,
        "bf16": torch.bfloat16,
        "f32": torch.float32,
        "f64": torch.float64,
    }
    if coeff_kind in tensor_dtypes:
        coeffs = c.to(tensor_dtypes[coeff_kind])
        c = coeffs.double()
    elif coeff_kind == "list":
        coeffs = c.tolist()
    elif coeff_kind == "tuple":
        coeffs = tuple(c.tolist())
    else:
        coeffs = [1.0, -2.0, 0.5]
        c = torch.tensor(coeffs, dtype=torch.float64)
    outs = mt.combine(prob.lists(), coeffs)
    check_combine(prob, c, outs)


def test_combine_float64_keeps_float64_coefficients(backend):
    """float64 grads with Python-float coefficients: no rounding of the coefficients to float32."""
    prob = build_problem([(257,)], 2, torch.float64, seed=23)
    coeffs = [1.0 / 3.0, math.pi]
    outs = mt.combine(prob.lists(), coeffs)
    check_combine(prob, torch.tensor(coeffs, dtype=torch.float64), outs)


def test_combine_single_task_is_scaling(backend):
    """K = 1, c = 1: the task's gradient itself (bitwise), for every dtype."""
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        prob = build_problem([(3,), (129,), (2, 2)], 1, dtype, seed=24)
        outs = mt.combine(prob.lists(), [1.0])
        for p, o in enumerate(outs):
            assert_bitwise(o, prob.grads[0][p], f"{dtype}: parameter {p}")
            assert o.data_ptr() != prob.grads[0][p].data_ptr() or o.numel() == 0, (
                "aliases the input"
            )


# --------------------------------------------------------------------------------------------
# Nothing to sum: every entry None, or every tensor empty


DEGENERATE = {
    "all_none": lambda: [[None, None], [None, None]],
    "all_empty": lambda: [[torch.zeros(0), torch.zeros(3, 0)], [torch.zeros(0), None]],
    "empty_and_none": lambda: [[torch.zeros(0)], [None]],
}


@pytest.mark.parametrize("fn", ["norms", "gramian", "combine", "normalized_sum"])
@pytest.mark.parametrize("case", list(DEGENERATE))
def test_nothing_to_sum(backend, case, fn):
    """None entries are zeros and empty tensors are fine, also when they are all there is:
    zero norms and Gramian, None (all tasks None) or empty outputs."""
    task_grads = DEGENERATE[case]()
    K, P = len(task_grads), len(task_grads[0])
    if fn == "combine":
        result = mt.combine(task_grads, [1.0, 2.0])
    else:
        result = getattr(mt, fn)(task_grads)
    if fn in ("norms", "gramian"):
        assert result.is_floating_point() and tuple(result.shape) == (
            (K,) if fn == "norms" else (K, K)
        )
        assert bool((result == 0).all()), result
        if case != "all_none":
            assert result.dtype == torch.float32
        return
    outs = result if fn == "combine" else result[0]
    if fn == "normalized_sum":
        assert bool((result[1] == 0).all()) and tuple(result[1].shape) == (K,), result[1]
    assert len(outs) == P
    for p in range(P):
        reference = next((row[p] for row in task_grads if row[p] is not None), None)
        if reference is None:
            assert outs[p] is None, f"parameter {p}"
        else:
            assert outs[p].shape == reference.shape and outs[p].dtype == reference.dtype


# --------------------------------------------------------------------------------------------
# normalized_sum


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_normalized_sum(backend, device, layout, dtype):
    skip_slow_for_triton(backend, layout, device)
    prob = problem_for(layout, dtype, backend, device)
    result = mt.normalized_sum(prob.lists(device=device))
    check_normalized_sum(prob, result, 1e-8)
    outs, norms = result
    for p, o in enumerate(outs):
        if o is not None:
            assert bool(torch.isfinite(o).all()), f"parameter {p}: not finite"


@pytest.mark.parametrize("eps", [0.5, 1e-3])
@pytest.mark.parametrize("dtype", dtype_params([torch.float64, torch.float32]))
def test_normalized_sum_eps(backend, dtype, eps):
    """eps is added to the norm: c_i = 1 / (norm_i + eps)."""
    prob = build_problem([(3,), (40,), (2, 2)], 3, dtype, seed=25)
    result = mt.normalized_sum(prob.lists(), eps=eps)
    check_normalized_sum(prob, result, eps)


def test_normalized_sum_all_zero(backend):
    """Every task zero: the result is zeros (no NaN), the norms 0."""
    prob = build_problem([(5,), (3, 3)], 2, torch.float32, zero_tasks=(0, 1))
    outs, norms = mt.normalized_sum(prob.lists())
    assert norms.tolist() == [0.0, 0.0]
    for p, o in enumerate(outs):
        assert_bitwise(o, torch.zeros(prob.shapes[p]), f"parameter {p}")
