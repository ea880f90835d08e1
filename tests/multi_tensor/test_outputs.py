"""fusedmtl.multi_tensor with out=, accumulate, combine_into_grad_ and K from 1 to 64.

The oracle and the precision contract are in multi_tensor_oracle.py."""

from __future__ import annotations

import pytest
import torch
from multi_tensor_oracle import (
    Problem,
    _values,
    build_problem,
    check_combine,
    check_gramian,
    check_normalized_sum,
    check_norms,
    problem_for,
    random_coeffs,
)

import fusedmtl.multi_tensor as mt
from tests.helpers import dtype_params

# --------------------------------------------------------------------------------------------
# out= and accumulate=


OUT_LAYOUTS = ("odd", "none", "noncontig", "edge", "tiny")


def _grads_like(prob: Problem, seed=31):
    """Parameters with an existing .grad (contiguous, the grads' dtype) and the .grad objects."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in prob.shapes:
        w = torch.nn.Parameter(torch.zeros(shape, dtype=prob.dtype))
        w.grad = _values(shape, prob.dtype, gen, 0.5)
        params.append(w)
    return params


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("fn", ["combine", "normalized_sum"])
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", OUT_LAYOUTS)
def test_out(backend, layout, dtype, fn, accumulate):
    """out= writes into the given tensors (the parameters' .grad), returns the same objects;
    accumulate=True adds; a parameter no task reaches is zeroed (left unchanged with accumulate)."""
    prob = problem_for(layout, dtype, backend)
    inputs_before = [[None if t is None else t.clone() for t in row] for row in prob.grads]
    params = _grads_like(prob)
    out = [w.grad for w in params]
    base = [g.clone() for g in out]
    if fn == "combine":
        c = random_coeffs(prob.K)
        result = mt.combine(prob.lists(), c, out=out, accumulate=accumulate)
        outs = result
    else:
        result = mt.normalized_sum(prob.lists(), out=out, accumulate=accumulate)
        outs = result[0]
    assert len(outs) == prob.P
    for p in range(prob.P):
        assert outs[p] is out[p], f"parameter {p}: not the out tensor"
        assert params[p].grad is out[p], f"parameter {p}: .grad replaced"
    if fn == "combine":
        check_combine(prob, c, outs, "combine(out=)", base=base, accumulate=accumulate)
    else:
        check_normalized_sum(
            prob, result, 1e-8, "normalized_sum(out=)", base=base, accumulate=accumulate
        )
    # the inputs are not modified
    for i, row in enumerate(inputs_before):
        for p, t in enumerate(row):
            if t is not None:  # (the inputs hold no NaN)
                assert torch.equal(prob.grads[i][p], t), f"input task {i} parameter {p} modified"


@pytest.mark.parametrize("dtype", dtype_params([torch.float32, torch.float16]))
def test_out_twice_accumulates(backend, dtype):
    """Two accumulate=True calls add twice; a following accumulate=False call overwrites."""
    prob = build_problem([(3,), (1023,), (2, 5)], 2, dtype, seed=32)
    c = torch.tensor([0.5, -2.0], dtype=torch.float64)  # exact in every dtype
    out = [torch.zeros(s, dtype=dtype) for s in prob.shapes]
    mt.combine(prob.lists(), c, out=out, accumulate=True)
    mt.combine(prob.lists(), c, out=out, accumulate=True)
    check_combine(prob, 2 * c, out, "combine accumulated twice")
    mt.combine(prob.lists(), c, out=out)
    check_combine(prob, c, out, "combine overwritten")


@pytest.mark.parametrize("dtype", dtype_params([torch.float32, torch.float64]))
@pytest.mark.parametrize("layout", OUT_LAYOUTS)
def test_combine_into_grad_accumulates_like_autograd(backend, layout, dtype):
    """Existing .grad: += the combination (as combine(out=, accumulate=True)); .grad None: set to
    it (as combine()); a parameter no task reaches keeps its .grad, even None."""
    prob = problem_for(layout, dtype, backend)
    params = _grads_like(prob)
    for p in range(0, prob.P, 2):
        params[p].grad = None
    c = random_coeffs(prob.K)
    before = [None if w.grad is None else w.grad.clone() for w in params]
    fresh = mt.combine(prob.lists(), c)
    accumulated = mt.combine(
        prob.lists(),
        c,
        out=[b.clone() if b is not None else torch.zeros_like(w) for b, w in zip(before, params)],
        accumulate=True,
    )
    mt.combine_into_grad_(params, prob.lists(), c)
    for p, w in enumerate(params):
        if fresh[p] is None:  # no task reaches p
            assert (w.grad is None) if before[p] is None else torch.equal(w.grad, before[p]), (
                f"parameter {p}"
            )
        elif before[p] is None:
            assert torch.equal(w.grad, fresh[p]), f"parameter {p} (created)"
        else:
            assert torch.equal(w.grad, accumulated[p]), f"parameter {p} (accumulated)"


# --------------------------------------------------------------------------------------------
# K = 1..9, 40 and 64, tuples as sequences


@pytest.mark.parametrize("K", [*range(1, 10), 40, 64])
def test_task_counts(backend, device, K):
    """K = 1..9 (9: the CUDA Gramian's tiled kernel), 40 and 64 (the most tasks)."""
    dtype = torch.float32
    prob = build_problem([(1,), (3,), (1023,), (5, 7), (4099,)], K, dtype, seed=40 + K)
    task_grads = prob.lists(tuple, device=device)  # any sequence
    check_norms(prob, mt.norms(task_grads))
    check_gramian(prob, mt.gramian(task_grads))
    c = random_coeffs(K, seed=K)
    check_combine(prob, c, mt.combine(task_grads, c.to(device)))
    check_normalized_sum(prob, mt.normalized_sum(task_grads), 1e-8)
