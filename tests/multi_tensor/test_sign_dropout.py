"""fusedmtl.multi_tensor.sign_dropout_ (GradDrop's masks, f the identity) on every backend and
device, against the formula of docs/METHODS.md computed here with torch operations in the
accumulation dtype (the contract: those bits), and against properties that follow from it alone:
leak 1 changes nothing, a coordinate whose values share a sign keeps them all, a mixed one keeps
exactly one sign, the positive one where P > U.
"""

from __future__ import annotations

import pytest
import torch

import fusedmtl.multi_tensor as mt
from tests.helpers import dtype_params

LAYOUTS = {
    "plain": ([(5, 3), (7,), (1,)], set()),
    "absent": ([(4, 6), (9,)], {(0, 1), (2, 0)}),
    "chunks": ([(70_001,), (3,)], set()),  # several work items on the CPU (16K elements each)
    "empty": ([(0, 4), (6,)], set()),
}


def _problem(k, layout, dtype, device, seed=0):
    shapes, absent = LAYOUTS[layout]
    generator = torch.Generator().manual_seed(seed)
    table = [
        [
            None
            if (i, p) in absent
            else torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).to(device)
            for p, shape in enumerate(shapes)
        ]
        for i in range(k)
    ]
    # uniforms in (0, 1): U = 0 would drop an all-negative coordinate (P = 0 is not < 0)
    uniforms = [
        torch.rand(shape, generator=generator).clamp(1e-3, 1 - 1e-3).to(dtype).to(device)
        for shape in shapes
    ]
    return table, uniforms


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _expected(table, uniforms, leak):
    """The formula, per parameter, in the accumulation dtype, each operation rounded."""
    out = [list(row) for row in table]
    for p, u in enumerate(uniforms):
        present = [row[p] for row in table if row[p] is not None]
        if not present:
            continue
        acc = _acc(present[0].dtype)
        values = [
            (row[p] if row[p] is not None else torch.zeros_like(present[0])).to(acc)
            for row in table
        ]
        total, magnitude = torch.zeros_like(values[0]), torch.zeros_like(values[0])
        for v in values:
            total = total + v
            magnitude = magnitude + v.abs()
        purity = (1.0 + total / magnitude) * 0.5
        draw = u.to(acc)
        for i, v in enumerate(values):
            if table[i][p] is None:
                continue
            kept = ((purity > draw) & (v > 0)) | ((purity < draw) & (v < 0))
            keep_leak = leak[i].to(acc)
            factor = keep_leak + (1 - keep_leak) * kept.to(acc)
            out[i][p] = (v * factor).to(present[0].dtype)
    return out


def _assert_same(got, want, what, rtol=0.0):
    for i, (row, expected) in enumerate(zip(got, want)):
        for p, (g, e) in enumerate(zip(row, expected)):
            assert (g is None) == (e is None), (what, i, p)
            if g is not None:
                torch.testing.assert_close(
                    g, e, rtol=rtol, atol=0, equal_nan=True, msg=(what, i, p)
                )


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("k", [2, 3, 9, 64])
@pytest.mark.parametrize("leaky", [False, True])
def test_sign_dropout_matches_the_formula(backend, device, dtype, layout, k, leaky):
    if layout == "chunks" and k > 3:
        pytest.skip("several work items need only a few tasks (CPU time)")
    table, uniforms = _problem(k, layout, dtype, device)
    leak = (torch.linspace(0.0, 0.7, k, dtype=torch.float64) if leaky else torch.zeros(k)).to(
        device
    )
    expected = _expected(table, uniforms, leak)
    mt.sign_dropout_(table, uniforms, leak)
    # The Triton interpreter truncates float32 to bfloat16 when storing (its cast_impl ignores
    # the rounding mode): one bf16 ulp where the factor is inexact (a leak); bitwise elsewhere.
    interpreted_bf16 = backend == "triton" and device == "cpu" and dtype == torch.bfloat16
    _assert_same(table, expected, backend, rtol=2.0**-7 if interpreted_bf16 and leaky else 0.0)


def test_sign_dropout_properties(backend, device):
    k, n = 5, 257
    generator = torch.Generator().manual_seed(3)
    values = torch.randn(k, n, generator=generator, dtype=torch.float64)
    values[:, :20] = values[:, :20].abs()  # all positive: every value kept
    values[:, 20:40] = -values[:, 20:40].abs()  # all negative: every value kept
    uniform = torch.rand(n, generator=generator, dtype=torch.float64).clamp(1e-3, 1 - 1e-3)
    table = [[row.clone().to(device)] for row in values]
    mt.sign_dropout_(table, [uniform.to(device)], torch.zeros(k, device=device))
    got = torch.stack([row[0].cpu() for row in table])
    assert torch.equal(got[:, :40], values[:, :40])
    kept = got != 0
    assert torch.equal(got[kept], values[kept])  # a value is kept whole or dropped
    purity = (1 + values.sum(0) / values.abs().sum(0)) / 2
    positive_kept = (kept & (values > 0)).any(0)
    negative_kept = (kept & (values < 0)).any(0)
    assert not bool((positive_kept & negative_kept).any())  # one sign per coordinate
    assert torch.equal(positive_kept, purity > uniform)
    assert torch.equal(negative_kept, purity < uniform)

    table = [[row.clone().to(device)] for row in values]
    mt.sign_dropout_(table, [uniform.to(device)], torch.ones(k, device=device))
    assert torch.equal(torch.stack([row[0].cpu() for row in table]), values)  # leak 1: the sum


def test_zeros_and_non_finite_values(backend, device):
    """A coordinate of zeros (P = NaN) keeps nothing and stays zero; a dropped inf becomes NaN,
    so that a non-finite step stays visible."""
    table = [
        [torch.tensor([0.0, 1.0, float("inf")], device=device)],
        [torch.tensor([0.0, -2.0, -1.0], device=device)],
    ]
    uniform = torch.tensor([0.5, 0.99, 0.5], device=device)  # P = (1 - 1/3) / 2 < 0.99
    mt.sign_dropout_(table, [uniform], torch.zeros(2, device=device))
    first, second = (row[0].cpu() for row in table)
    assert first[0] == 0 and second[0] == 0
    assert first[1] == 0 and second[1] == -2.0  # the negative sign kept
    assert bool(first[2].isnan() | second[2].isnan())  # P = NaN (inf / inf): both dropped


def test_non_contiguous_and_absent(backend, device):
    table = [[torch.randn(6, 5, device=device).t(), None] for _ in range(3)]
    table[1][1] = torch.randn(4, device=device)
    uniforms = [torch.rand(5, 6, device=device), torch.rand(4, device=device)]
    expected = _expected(table, uniforms, torch.zeros(3))
    views = [row[0] for row in table]
    mt.sign_dropout_(table, uniforms, torch.zeros(3, device=device))
    assert all(row[0] is view for row, view in zip(table, views))
    _assert_same(table, expected, "non-contiguous")


def test_bad_arguments_raise():
    table, uniforms = _problem(3, "plain", torch.float32, "cpu")
    with pytest.raises(ValueError, match="uniform"):
        mt.sign_dropout_(table, uniforms[:2], torch.zeros(3))
    with pytest.raises(ValueError, match="leaks"):
        mt.sign_dropout_(table, uniforms, torch.zeros(2))
    with pytest.raises(ValueError, match="uniforms 0"):
        mt.sign_dropout_(table, [uniforms[0].double(), *uniforms[1:]], torch.zeros(3))
    g = torch.randn(4)
    with pytest.raises(ValueError, match="share memory"):
        mt.sign_dropout_([[g], [g]], [torch.rand(4)], torch.zeros(2))
