"""GradVac against torchjd 0.18's GradVac over several steps (its targets carry over), on the same
float64 Jacobians and the same random orders; degenerate inputs; the state_dict round trip; a
shared-trunk backward."""

from __future__ import annotations

import pytest
import torch

from fusedmtl import weighting

torchjd_aggregation = pytest.importorskip("torchjd.aggregation")

G = 20


def _jacobians(k: int, seed: int, steps: int, conflicting: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        jacobian = torch.randn(k, G, generator=gen, dtype=torch.float64)
        jacobian *= torch.logspace(-1, 1, k, dtype=torch.float64)[:, None]
        if conflicting:
            jacobian[1:] -= (
                1.5 * jacobian[:1] * jacobian[1:].norm(dim=1, keepdim=True) / jacobian[0].norm()
            )
        out.append(jacobian)
    return out


def _step(method, jacobian):
    params = method._shared
    for p in params:
        p.grad = None
    coeffs = method.step([[row.clone()] for row in jacobian])
    return params[0].grad.clone(), coeffs


@pytest.mark.parametrize("k", [2, 3, 6])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("conflicting", [False, True])
def test_agrees_with_torchjd_over_steps(k, seed, conflicting):
    ours = weighting.GradVac(
        [torch.zeros(G, dtype=torch.float64, requires_grad=True)], k, seed=seed
    )
    theirs = torchjd_aggregation.GradVac()
    torch.manual_seed(seed)  # torchjd draws its orders from the global generator
    for jacobian in _jacobians(k, seed + 10, 4, conflicting):
        d, coeffs = _step(ours, jacobian)
        expected = theirs(jacobian)
        torch.testing.assert_close(d, coeffs @ jacobian, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(d, expected, rtol=1e-10, atol=1e-12)


def test_state_dict_round_trip_continues_identically():
    jacobians = _jacobians(4, 3, 5, conflicting=True)
    method = weighting.GradVac([torch.zeros(G, dtype=torch.float64, requires_grad=True)], 4, seed=5)
    for jacobian in jacobians[:2]:
        _step(method, jacobian)
    restored = weighting.GradVac(
        [torch.zeros(G, dtype=torch.float64, requires_grad=True)], 4, seed=77
    )
    restored.load_state_dict(method.state_dict())
    for jacobian in jacobians[2:]:
        torch.testing.assert_close(_step(restored, jacobian)[1], _step(method, jacobian)[1])
    assert bool((method.targets != 0).any())


@pytest.mark.parametrize(
    "kind", ["identical", "opposite", "zero_gradient", "all_zero", "k_exceeds_g"]
)
def test_degenerate_gradients_agree_with_torchjd(kind):
    g = _jacobians(1, 4, 1, False)[0][0]
    jacobian = {
        "identical": torch.stack([g, g, g]),
        "opposite": torch.stack([g, -g]),
        "zero_gradient": torch.stack([g, torch.zeros_like(g), -0.5 * g + 1.0]),
        "all_zero": torch.zeros(3, G, dtype=torch.float64),
        "k_exceeds_g": torch.randn(
            30, G, generator=torch.Generator().manual_seed(1), dtype=torch.float64
        ),
    }[kind]
    k = jacobian.shape[0]
    ours = weighting.GradVac([torch.zeros(G, dtype=torch.float64, requires_grad=True)], k, seed=2)
    theirs = torchjd_aggregation.GradVac()
    torch.manual_seed(2)
    for _ in range(2):
        d, _ = _step(ours, jacobian)
        assert torch.isfinite(d).all()
        torch.testing.assert_close(d, theirs(jacobian), rtol=1e-9, atol=1e-12)


def test_backward_on_a_shared_trunk():
    torch.manual_seed(0)
    trunk = torch.nn.Linear(6, 8).double()
    heads = [torch.nn.Linear(8, 1).double() for _ in range(3)]
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randn(3, 16, 1, dtype=torch.float64)
    z = torch.tanh(trunk(x))
    losses = [torch.nn.functional.mse_loss(h(z), y[i]) for i, h in enumerate(heads)]
    shared = list(trunk.parameters())
    jacobian = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)])
            for loss in losses
        ]
    )
    method = weighting.GradVac(shared, 3, seed=4)
    coeffs = method.backward(losses)
    oracle = weighting.GradVac([torch.zeros(1, requires_grad=True)], 3, seed=4)
    torch.testing.assert_close(
        coeffs, oracle.coefficients(jacobian @ jacobian.T), rtol=1e-9, atol=1e-12
    )
    d = torch.cat([p.grad.reshape(-1) for p in shared])
    torch.testing.assert_close(d, coeffs @ jacobian, rtol=1e-9, atol=1e-12)
