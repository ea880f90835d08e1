"""The losses under torch.func transforms and the autograd features built on them, and the
differences from torch.nn.functional that issue 19 found (its reproductions, as tests):

- vmap-safe (19.2): torch.autograd.grad(is_grads_batched=True), jacobian(vectorize=True),
  torch.func.jacrev and vmap work through every loss, heteroscedastic_loss and the nn modules, as
  through torch's own losses, with no read of grad_output on the host.
- l1_loss's input or target may be edited in place after forward, as in torch (19.11).
- huber_loss of a float32 input and a float64 target behaves as torch's (its backward raises).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedmtl
import fusedmtl.nn
from tests.helpers import DEFAULT_CASES, REDUCTIONS, assert_ulp, case_params

HETEROSCEDASTIC = ("l2", "l1", "smooth_l1")


def _prelude():
    """The issue's prelude: a trunk, two heads, a batch."""
    torch.manual_seed(0)
    trunk = torch.nn.Linear(4, 8)
    heads = [torch.nn.Linear(8, 1) for _ in range(2)]
    return trunk, heads, torch.randn(16, 4), torch.randn(16, 1)


def _batched_vs_loop(losses, param):
    """Per-task gradients of ``param`` by one batched backward and by a loop of backwards."""
    stacked = torch.stack(losses)
    eye = torch.eye(len(losses))
    (batched,) = torch.autograd.grad(stacked, param, eye, retain_graph=True, is_grads_batched=True)
    loop = torch.stack([torch.autograd.grad(loss, param, retain_graph=True)[0] for loss in losses])
    return batched, loop


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", case_params(DEFAULT_CASES))
def test_is_grads_batched(backend, case, reduction):
    trunk, heads, x, y = _prelude()
    fused = [case.fused(h(trunk(x)), y, reduction) for h in heads]
    batched, loop = _batched_vs_loop(fused, trunk.weight)
    expected = [case.torch(h(trunk(x)), y, reduction) for h in heads]
    _, torch_loop = _batched_vs_loop(expected, trunk.weight)
    torch.testing.assert_close(batched, loop, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loop, torch_loop, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", case_params(DEFAULT_CASES))
def test_jacobian_vectorized_elementwise(backend, case):
    """reduction='none' takes the op path (backward op batched by its vmap rule)."""
    _, _, x, y = _prelude()
    got = torch.autograd.functional.jacobian(lambda a: case.fused(a, y, "none"), x, vectorize=True)
    expected = torch.autograd.functional.jacobian(lambda a: case.torch(a, y, "none"), x)
    assert_ulp(got, expected, 1, "jacobian")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", HETEROSCEDASTIC)
def test_heteroscedastic_batched_and_jacobian(backend, kind, reduction):
    trunk, heads, x, y = _prelude()
    s = torch.randn(16, 1) * 0.5
    module = fusedmtl.nn.HeteroscedasticLoss(kind, beta=0.5, reduction=reduction)
    if reduction != "none":
        losses = [module(h(trunk(x)), y, s) for h in heads]
        batched, loop = _batched_vs_loop(losses, trunk.weight)
        torch.testing.assert_close(batched, loop, rtol=1e-6, atol=1e-7)
    jac = torch.autograd.functional.jacobian(lambda a: module(a, y, s), x[:, :1], vectorize=True)
    plain = torch.autograd.functional.jacobian(lambda a: module(a, y, s), x[:, :1])
    torch.testing.assert_close(jac, plain, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["MSELoss", "L1Loss", "SmoothL1Loss", "HuberLoss"])
def test_nn_modules_batched(backend, name):
    trunk, heads, x, y = _prelude()
    module = getattr(fusedmtl.nn, name)()
    batched, loop = _batched_vs_loop([module(h(trunk(x)), y) for h in heads], trunk.weight)
    torch.testing.assert_close(batched, loop, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", case_params(DEFAULT_CASES))
def test_jacrev_and_vmap(backend, case):
    _, _, x, y = _prelude()
    y = y.expand(16, 4).contiguous()
    got = torch.func.jacrev(lambda a: case.fused(a, y, "mean"))(x)
    expected = torch.func.jacrev(lambda a: case.torch(a, y, "mean"))(x)
    assert_ulp(got, expected, 1, "jacrev")
    per_row = torch.func.vmap(lambda a, b: case.fused(a, b, "sum"))(x, y)
    expected_rows = torch.func.vmap(lambda a, b: case.torch(a, b, "sum"))(x, y)
    assert_ulp(per_row, expected_rows, 1, "vmap")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("edited", ["input", "target"])
def test_l1_loss_input_edited_after_forward(backend, edited, reduction):
    """torch's l1_loss saves d = input - target, so editing input or target in place after forward
    is no error there and the gradient is that of the loss as computed: the same here."""
    results = []
    for fn in (fusedmtl.l1_loss, F.l1_loss):
        leaf = torch.randn(7, requires_grad=True, generator=torch.Generator().manual_seed(1))
        input = leaf * 1.0  # a non-leaf, which may be modified in place
        target = torch.randn(7, generator=torch.Generator().manual_seed(2))
        loss = fn(input, target, reduction=reduction)
        with torch.no_grad():
            (input if edited == "input" else target).add_(10.0)
        loss.backward(torch.tensor(0.75))
        results.append(leaf.grad)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def test_huber_mixed_dtypes_like_torch(backend):
    """float32 input, float64 target: forward in float32, and backward raises, as in torch."""
    x = torch.randn(5, requires_grad=True)
    y = torch.randn(5, dtype=torch.float64)
    got, expected = fusedmtl.huber_loss(x, y), F.huber_loss(x, y)
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError) as expected_error:
        expected.backward()
    with pytest.raises(RuntimeError) as got_error:
        got.backward()
    assert str(got_error.value) == str(expected_error.value)
