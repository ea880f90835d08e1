"""MoDo against torchjd 0.18's MoDoWeighting (the oracle) over several steps (its weights carry
over), fed the same float64 Gramians; the simplex projection against torchjd's and its optimality
conditions; degenerate Jacobians; the state_dict round trip; a shared-trunk backward."""

from __future__ import annotations

import pytest
import torch

from fusedmtl import weighting
from fusedmtl.weighting.methods.modo import project_onto_simplex

torchjd_aggregation = pytest.importorskip("torchjd.aggregation")
from torchjd.aggregation._utils.simplex import project_onto_simplex as torchjd_projection  # noqa: E402

G = 20


def _jacobians(k: int, seed: int, steps: int, conflicting: bool, scale=1.0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        jacobian = torch.randn(k, G, generator=gen, dtype=torch.float64)
        jacobian *= scale * torch.logspace(-1, 0.5, k, dtype=torch.float64)[:, None]
        if conflicting:
            jacobian[1:] -= (
                1.5 * jacobian[:1] * jacobian[1:].norm(dim=1, keepdim=True) / jacobian[0].norm()
            )
        out.append(jacobian)
    return out


def _step(method, jacobian):
    for p in method._shared:
        p.grad = None
    coeffs = method.step([[row.clone()] for row in jacobian])
    return method._shared[0].grad.clone(), coeffs


def _method(k, **kwargs):
    return weighting.MoDo([torch.zeros(G, dtype=torch.float64, requires_grad=True)], k, **kwargs)


@pytest.mark.parametrize("k", [2, 3, 6, 64])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("conflicting", [False, True])
@pytest.mark.parametrize("settings", [{}, {"gamma": 0.5, "rho": 0.0}])
def test_agrees_with_torchjd_over_steps(k, seed, conflicting, settings):
    ours, theirs = _method(k, **settings), torchjd_aggregation.MoDoWeighting(**settings)
    for jacobian in _jacobians(k, seed, 5, conflicting, scale=0.3):
        d, coeffs = _step(ours, jacobian)
        expected = theirs(jacobian @ jacobian.T)
        torch.testing.assert_close(coeffs, expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(d, expected @ jacobian, rtol=1e-12, atol=1e-14)
        assert float(coeffs.min()) >= 0 and abs(float(coeffs.sum()) - 1) < 1e-12


@pytest.mark.parametrize("k", [1, 2, 5, 64])
@pytest.mark.parametrize("seed", range(4))
def test_projection_onto_the_simplex(k, seed):
    gen = torch.Generator().manual_seed(seed)
    y = 3 * torch.randn(k, generator=gen, dtype=torch.float64)
    x = project_onto_simplex(y)
    torch.testing.assert_close(x, torchjd_projection(y), rtol=1e-12, atol=1e-14)
    # optimality: x = max(y - theta, 0), sum 1; y - x is theta on the support, >= theta off it
    assert float(x.min()) >= 0 and abs(float(x.sum()) - 1) < 1e-12
    theta = (y - x)[x > 0]
    torch.testing.assert_close(theta, theta[:1].expand_as(theta), rtol=0, atol=1e-12)
    assert bool((y[x == 0] <= theta[0] + 1e-12).all())
    inside = torch.softmax(y, 0)
    torch.testing.assert_close(project_onto_simplex(inside), inside, rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "kind", ["identical", "opposite", "zero_gradient", "all_zero", "k_exceeds_g"]
)
def test_degenerate_gradients_agree_with_torchjd(kind):
    g = _jacobians(1, 4, 1, False)[0][0]
    jacobian = {
        "identical": torch.stack([g, g, g]),
        "opposite": torch.stack([g, -g]),
        "zero_gradient": torch.stack([g, torch.zeros_like(g), -0.5 * g + 0.1]),
        "all_zero": torch.zeros(3, G, dtype=torch.float64),
        "k_exceeds_g": torch.randn(
            30, G, generator=torch.Generator().manual_seed(1), dtype=torch.float64
        ),
    }[kind]
    k = jacobian.shape[0]
    ours, theirs = _method(k), torchjd_aggregation.MoDoWeighting()
    for _ in range(3):
        d, coeffs = _step(ours, jacobian)
        assert torch.isfinite(d).all()
        torch.testing.assert_close(coeffs, theirs(jacobian @ jacobian.T), rtol=1e-12, atol=1e-14)
    if kind == "all_zero":  # only the regulariser moves lambda: it stays uniform
        torch.testing.assert_close(coeffs, torch.full((3,), 1 / 3, dtype=torch.float64))


def test_state_dict_round_trip_continues_identically():
    jacobians = _jacobians(4, 3, 6, conflicting=True)
    method = _method(4)
    for jacobian in jacobians[:3]:
        _step(method, jacobian)
    restored = _method(4)
    restored.load_state_dict(method.state_dict())
    for jacobian in jacobians[3:]:
        assert torch.equal(_step(restored, jacobian)[1], _step(method, jacobian)[1])
    assert not torch.equal(method.weights, torch.full((4,), 0.25, dtype=torch.float64))


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
    coeffs = weighting.MoDo(shared, 3).backward(losses)
    expected = torchjd_aggregation.MoDoWeighting()(jacobian @ jacobian.T)
    torch.testing.assert_close(coeffs, expected, rtol=1e-9, atol=1e-12)
    d = torch.cat([p.grad.reshape(-1) for p in shared])
    torch.testing.assert_close(d, coeffs @ jacobian, rtol=1e-9, atol=1e-12)
