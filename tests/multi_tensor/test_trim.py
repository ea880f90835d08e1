"""fusedmtl.multi_tensor.trim_ (TrimmedMean's masks) against a float64 oracle, on every backend
and device.

The oracle sorts each coordinate's K values with a stable ``torch.sort`` in float64 (an exact
upcast: the same order as in the gradients' dtype): the values ranked in [t, K - t) are kept, the
others multiplied by 0. Results must match it bitwise (NaN where a dropped value was inf or NaN),
and the kept values of every coordinate must be the middle of its sorted values, which is what
makes sum_i g_i / (K - 2t) the coordinate-wise trimmed mean.
"""

from __future__ import annotations

import pytest
import torch

import fusedmtl.multi_tensor as mt
from tests.helpers import dtype_params

# (shapes of the P parameters, which (task, parameter) gradients are None)
LAYOUTS = {
    "plain": ([(5, 3), (7,), (1,)], set()),
    "absent": ([(4, 6), (9,)], {(0, 1), (2, 0)}),
    "chunks": ([(70_001,), (3,)], set()),  # several work items on the CPU (16K elements each)
    "empty": ([(0, 4), (6,)], set()),
}


def _grads(k, layout, dtype, device, values="random", seed=0):
    shapes, absent = LAYOUTS[layout]
    generator = torch.Generator().manual_seed(seed)
    table = []
    for i in range(k):
        row = []
        for p, shape in enumerate(shapes):
            if (i, p) in absent:
                row.append(None)
                continue
            if values == "ties":  # few distinct values: many ties, and -0.0 beside +0.0
                g = torch.randint(-2, 3, shape, generator=generator).double() * 0.5
                g = torch.where(torch.rand(shape, generator=generator) < 0.2, -0.0 * g.abs(), g)
            else:
                g = torch.randn(shape, generator=generator, dtype=torch.float64)
            row.append(g.to(dtype).to(device))
        table.append(row)
    return table


def _oracle(table, trim):
    """The expected masked gradients, from a stable float64 sort per parameter."""
    k = len(table)
    out = []
    for p in range(len(table[0])):
        present = [row[p] for row in table if row[p] is not None]
        if not present:
            out.append([None] * k)
            continue
        like = present[0]
        stack = torch.stack(
            [(row[p] if row[p] is not None else torch.zeros_like(like)).double() for row in table]
        )
        order = torch.sort(stack, dim=0, stable=True).indices
        keep = torch.zeros_like(stack)
        keep.scatter_(0, order[trim : k - trim], 1.0)
        out.append(
            [
                None if row[p] is None else (row[p].double() * keep[i]).to(like.dtype)
                for i, row in enumerate(table)
            ]
        )
    return [[out[p][i] for p in range(len(out))] for i in range(k)]


def _assert_same(got, want, what):
    for i, (row, expected) in enumerate(zip(got, want)):
        for p, (g, e) in enumerate(zip(row, expected)):
            assert (g is None) == (e is None), (what, i, p)
            if g is not None:
                # bitwise, signed zeros included; NaN anywhere a NaN is expected
                torch.testing.assert_close(g, e, rtol=0, atol=0, equal_nan=True, msg=(what, i, p))
                assert torch.equal(g.signbit() & ~g.isnan(), e.signbit() & ~e.isnan()), (what, i, p)


def _copy(table):
    return [[g.clone() if g is not None else None for g in row] for row in table]


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("k,trim", [(3, 1), (4, 1), (5, 2), (17, 3), (64, 31)])
@pytest.mark.parametrize("values", ["random", "ties"])
def test_trim_matches_the_sorted_oracle(backend, device, dtype, layout, k, trim, values):
    if layout == "chunks" and k > 5:
        pytest.skip("several work items need only a few tasks (CPU time)")
    table = _grads(k, layout, dtype, device, values)
    expected = _oracle(table, trim)
    mt.trim_(table, trim)
    _assert_same(table, expected, f"{backend} {values}")
    # the kept values of each coordinate are the middle of its sorted values
    originals = _grads(k, layout, dtype, device, values)
    for p in range(len(table[0])):
        present = [row[p] for row in expected if row[p] is not None]
        if not present or present[0].numel() == 0:
            continue
        stack = torch.stack(
            [o[p] if o[p] is not None else torch.zeros_like(present[0]) for o in originals]
        ).double()
        middle = stack.sort(dim=0).values[trim : k - trim].sum(0)
        masked = torch.stack(
            [row[p] if row[p] is not None else torch.zeros_like(present[0]) for row in table]
        ).double()
        torch.testing.assert_close(masked.sum(0), middle, rtol=1e-12, atol=1e-12)


def test_degenerate_gradients(backend, device):
    """Identical gradients tie everywhere (ranks by task index), zeros, one NaN (sorted last)
    and a dropped inf (NaN, so that the step stays non-finite)."""
    g = torch.randn(10, dtype=torch.float32, device=device)
    identical = [[g.clone()] for _ in range(5)]
    mt.trim_(identical, 2)
    assert [bool((row[0] == g).all()) for row in identical] == [False, False, True, False, False]
    assert all(bool((row[0] == 0).all()) for i, row in enumerate(identical) if i != 2)

    zeros = [[torch.zeros(4, device=device)] for _ in range(3)]
    mt.trim_(zeros, 1)
    assert all(bool((row[0] == 0).all()) for row in zeros)

    values = torch.tensor([[1.0, 5.0], [float("nan"), 2.0], [3.0, float("inf")]], device=device)
    table = [[row.clone()] for row in values]
    mt.trim_(table, 1)
    got = torch.stack([row[0] for row in table]).cpu()
    # column 0: 1 < 3 < NaN: 3 kept; column 1: 2 < 5 < inf: 5 kept, inf * 0 = NaN
    assert got[:, 0].tolist()[0] == 0.0 and got[2, 0] == 3.0 and bool(got[1, 0].isnan())
    assert got[0, 1] == 5.0 and got[1, 1] == 0.0 and bool(got[2, 1].isnan())


def test_trim_zero_and_no_gradients_change_nothing(backend, device):
    table = _grads(3, "plain", torch.float32, device)
    before = _copy(table)
    mt.trim_(table, 0)
    _assert_same(table, before, "trim=0")
    nothing = [[None, None], [None, None], [None, None]]
    mt.trim_(nothing, 1)
    assert nothing == [[None, None], [None, None], [None, None]]


def test_non_contiguous_gradients_are_masked_through_a_copy(backend, device):
    table = [[torch.randn(6, 5, device=device).t()] for _ in range(3)]
    expected = _oracle(table, 1)
    views = [row[0] for row in table]
    mt.trim_(table, 1)
    assert all(row[0] is view for row, view in zip(table, views))  # written into, not replaced
    _assert_same(table, expected, "non-contiguous")


@pytest.mark.parametrize("trim", [-1, 2, 3])
def test_bad_trim_raises(trim):
    with pytest.raises(ValueError, match="trim"):
        mt.trim_(_grads(4, "plain", torch.float32, "cpu"), trim)


def test_shared_memory_raises():
    g = torch.randn(8)
    with pytest.raises(ValueError, match="share memory"):
        mt.trim_([[g], [g], [torch.randn(8)]], 1)


def test_native_op_checks_its_arguments():
    """The op itself (what torch.compile and other callers reach) refuses what it cannot do."""
    op = torch.ops.fusedmtl.multi_tensor_trim_
    grads = [torch.randn(4), torch.randn(4), torch.randn(4)]
    with pytest.raises(RuntimeError, match="trim"):
        op(grads, 3, 2)
    with pytest.raises(RuntimeError, match="contiguous"):
        op([torch.randn(4, 3).t(), torch.randn(3, 4), torch.randn(3, 4)], 3, 1)
