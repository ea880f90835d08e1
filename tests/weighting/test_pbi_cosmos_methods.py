"""PBI and COSMOS against torchjd 0.18's scalarizers (the oracle): the total's value and its
gradient with respect to every loss (torch.autograd through torchjd's formula, float64), on
random losses of different scales, with given preferences and reference points, and degenerate
ones (losses on the preference ray, zero losses, one task, K = 64); a model's gradient."""

from __future__ import annotations

import pytest
import torch

from fusedmtl import weighting

scalarization = pytest.importorskip("torchjd.scalarization")


def _losses(k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(k, generator=gen, dtype=torch.float64) * torch.logspace(-2, 2, k).double()


def _ours(method, values):
    leaves = [torch.tensor(float(v), dtype=torch.float64, requires_grad=True) for v in values]
    total = method(leaves)
    total.backward()
    return total.detach(), torch.stack([leaf.grad for leaf in leaves])


def _theirs(scalarizer, values):
    leaf = values.clone().requires_grad_(True)
    total = scalarizer(leaf)
    total.backward()
    return total.detach(), leaf.grad


def _assert_same(method, scalarizer, values):
    value, grad = _ours(method, values)
    expected_value, expected_grad = _theirs(scalarizer, values)
    torch.testing.assert_close(value, expected_value, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(method.last_weights, expected_grad, rtol=1e-10, atol=1e-12)


def _preference(k, seed):
    return torch.rand(k, generator=torch.Generator().manual_seed(100 + seed)).double() + 0.1


@pytest.mark.parametrize("k", [1, 2, 3, 7, 64])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("theta", [0.0, 5.0, 0.3])
def test_pbi_agrees_with_torchjd(k, seed, theta):
    values = _losses(k, seed)
    _assert_same(
        weighting.PBI(k, theta=theta),
        scalarization.PBI(theta=theta, weights=torch.ones(k, dtype=torch.float64)),
        values,
    )
    preference, reference = _preference(k, seed), -0.1 * _losses(k, seed + 7)
    _assert_same(
        weighting.PBI(k, theta=theta, preference=preference, reference=reference),
        scalarization.PBI(theta=theta, weights=preference, reference=reference),
        values,
    )


@pytest.mark.parametrize("k", [1, 2, 3, 7, 64])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("lambda_", [0.0, 1.0, 8.0])
def test_cosmos_agrees_with_torchjd(k, seed, lambda_):
    values = _losses(k, seed)
    _assert_same(
        weighting.COSMOS(k, lambda_=lambda_),
        scalarization.COSMOS(lambda_=lambda_, weights=torch.full((k,), 1.0 / k).double()),
        values,
    )
    preference = _preference(k, seed)
    _assert_same(
        weighting.COSMOS(k, lambda_=lambda_, preference=preference),
        scalarization.COSMOS(lambda_=lambda_, weights=preference),
        values,
    )


@pytest.mark.parametrize("kind", ["on_the_ray", "zero", "tiny"])
def test_degenerate_losses_agree_with_torchjd(kind):
    preference = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    values = {
        "on_the_ray": 0.5 * preference,  # PBI's d2 = 0
        "zero": torch.zeros(3, dtype=torch.float64),  # COSMOS's norm(L) under its floor
        "tiny": torch.full((3,), 1e-10, dtype=torch.float64),
    }[kind]
    _assert_same(
        weighting.PBI(3, preference=preference),
        scalarization.PBI(theta=5.0, weights=preference),
        values,
    )
    cosmos = weighting.COSMOS(3, lambda_=2.0, preference=preference)
    if kind != "tiny":
        _assert_same(cosmos, scalarization.COSMOS(lambda_=2.0, weights=preference), values)
        return
    # norm(L) under the 1e-8 floor: the value is torchjd's; the gradient the floored formula's,
    # r - lambda r / (norm(r) 1e-8) (torch's cosine_similarity clamps its norms in place, out of
    # autograd's sight, and backpropagates through the unclamped norm there)
    value, grad = _ours(cosmos, values)
    expected_value, _ = _theirs(scalarization.COSMOS(lambda_=2.0, weights=preference), values)
    torch.testing.assert_close(value, expected_value, rtol=1e-12, atol=1e-14)
    expected = preference - 2.0 * preference / (preference.norm() * 1e-8)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=0)


def test_pbi_on_the_ray_is_the_projection():
    preference = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)
    value, grad = _ours(weighting.PBI(3, theta=5.0, preference=preference), 0.3 * preference)
    torch.testing.assert_close(value, torch.tensor(0.9, dtype=torch.float64) + 5e-6)
    # (rounding leaves perpendicular ~1e-16, divided by d2 = 1e-6)
    torch.testing.assert_close(grad, preference / 3, rtol=0, atol=1e-8)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="theta"):
        weighting.PBI(3, theta=-1.0)
    with pytest.raises(ValueError, match="preference"):
        weighting.PBI(3, preference=torch.tensor([1.0, -1.0, 0.0]))
    with pytest.raises(ValueError, match="reference"):
        weighting.PBI(3, reference=torch.zeros(2))
    with pytest.raises(ValueError, match="lambda_"):
        weighting.COSMOS(3, lambda_=-0.5)
    with pytest.raises(ValueError, match="preference"):
        weighting.COSMOS(2, preference=torch.ones(3))


@pytest.mark.parametrize("name", ["pbi", "cosmos"])
def test_model_gradient_is_the_chain_rule(name):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    losses = list((model(x) ** 2).mean(0) * torch.tensor([1.0, 10.0, 100.0]).double())
    method = weighting.PBI(3) if name == "pbi" else weighting.COSMOS(3, lambda_=2.0)
    scalarizer = (
        scalarization.PBI(theta=5.0, weights=torch.ones(3).double())
        if name == "pbi"
        else scalarization.COSMOS(lambda_=2.0, weights=torch.full((3,), 1 / 3).double())
    )
    method.backward(losses)
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    scalarizer(
        torch.stack(list((model(x) ** 2).mean(0) * torch.tensor([1.0, 10.0, 100.0]).double()))
    ).backward()
    for a, p in zip(ours, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-10, atol=1e-13)
