"""PCD against torchjd 0.18's PCD (the oracle) over several steps (its moving average carries
over), on the same float64 Jacobians: direction and scale; the QP's KKT conditions checked on the
normalised gradients; the special cases (zero primary gradient, infeasible constraints, identical
and wide Jacobians); the state_dict round trip; a shared-trunk backward."""

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


def _method(k, **kwargs):
    return weighting.PCD([torch.zeros(G, dtype=torch.float64, requires_grad=True)], k, **kwargs)


def _step(method, jacobian):
    for p in method._shared:
        p.grad = None
    coeffs = method.step([[row.clone()] for row in jacobian])
    return method._shared[0].grad.clone(), coeffs


def _close(d, expected, jacobian):
    tolerance = 1e-9 * float(expected.norm()) + 1e-12 * float(jacobian.norm(dim=1).max())
    assert float((d - expected).norm()) <= tolerance, (d, expected)


@pytest.mark.parametrize("k", [2, 3, 5, 8])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("conflicting", [False, True])
@pytest.mark.parametrize("settings", [{}, {"tau": 0.5, "beta": 0.5}, {"tau": "vector"}])
def test_agrees_with_torchjd_over_steps(k, seed, conflicting, settings):
    if settings.get("tau") == "vector":
        settings = {"tau": torch.linspace(0.0, 0.9, k - 1, dtype=torch.float64)}
    ours, theirs = _method(k, **settings), torchjd_aggregation.PCD(**settings)
    for jacobian in _jacobians(k, seed, 4, conflicting):
        d, coeffs = _step(ours, jacobian)
        torch.testing.assert_close(d, coeffs @ jacobian, rtol=1e-12, atol=1e-14)
        _close(d, theirs(jacobian), jacobian)


@pytest.mark.parametrize("seed", range(3))
def test_kkt_conditions_on_the_normalised_gradients(seed):
    """With beta = 0 the scales are 1 / sqrt(norm(g_i)^2 + eps): d~ = d norm(d~) / norm(g_0)
    satisfies every constraint, d~ - g~_0 = sum_j mu_j g~_j with mu >= 0, and mu_j > 0 only
    where constraint j is tight; norm(d) = norm(g_0)."""
    jacobian = _jacobians(6, 20 + seed, 1, True)[0]
    tau = 0.3
    d, coeffs = _step(_method(6, tau=tau, beta=0.0, eps=0.0), jacobian)
    scales = 1 / jacobian.norm(dim=1)
    unit = jacobian * scales[:, None]
    torch.testing.assert_close(d.norm(), jacobian[0].norm(), rtol=1e-12, atol=0)
    w = coeffs / scales
    w = w / w[0]  # (1, mu)
    direction = w @ unit
    assert bool((w[1:] >= 0).all())
    slacks = unit[1:] @ direction - tau
    assert bool((slacks >= -1e-10).all())
    assert bool((slacks[w[1:] > 1e-12].abs() <= 1e-10).all())
    assert bool((slacks < -1e-10).any() or (w[1:] > 1e-12).any())  # some constraint binds


@pytest.mark.parametrize(
    "kind", ["zero_primary", "infeasible", "identical", "all_zero", "k_exceeds_g", "opposite"]
)
def test_special_cases_agree_with_torchjd(kind):
    g, h = _jacobians(2, 4, 1, False)[0]
    jacobian = {
        "zero_primary": torch.stack([torch.zeros_like(g), g, h]),
        "infeasible": torch.stack([g, h, -h]),  # opposite secondaries: no d helps both
        "identical": torch.stack([g, g, g]),
        "all_zero": torch.zeros(3, G, dtype=torch.float64),
        "k_exceeds_g": torch.randn(
            30, G, generator=torch.Generator().manual_seed(1), dtype=torch.float64
        ),
        "opposite": torch.stack([g, -g]),
    }[kind]
    k = jacobian.shape[0]
    ours, theirs = _method(k), torchjd_aggregation.PCD()
    for _ in range(2):
        d, _ = _step(ours, jacobian)
        assert torch.isfinite(d).all()
        _close(d, theirs(jacobian), jacobian)
    if kind in ("zero_primary", "all_zero"):
        assert bool((d == 0).all())
    if kind == "opposite":  # d~ = (1 - mu) g~ with -(1 - mu) >= tau: -tau g~, rescaled
        torch.testing.assert_close(d, -g, rtol=1e-12, atol=1e-14)
    if kind in ("infeasible", "identical"):
        torch.testing.assert_close(d, jacobian[0], rtol=1e-12, atol=1e-14)


def test_state_dict_round_trip_continues_identically():
    jacobians = _jacobians(4, 3, 6, conflicting=True)
    method = _method(4, beta=0.5)
    for jacobian in jacobians[:3]:
        _step(method, jacobian)
    restored = _method(4, beta=0.5)
    restored.load_state_dict(method.state_dict())
    for jacobian in jacobians[3:]:
        assert torch.equal(_step(restored, jacobian)[1], _step(method, jacobian)[1])
    assert int(method.steps_done) == 6


def test_settings_are_checked():
    with pytest.raises(ValueError, match="tau"):
        _method(3, tau=1.5)
    with pytest.raises(ValueError, match="2 values"):
        _method(3, tau=torch.ones(3))
    with pytest.raises(ValueError, match="beta"):
        _method(3, beta=1.0)


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
    weighting.PCD(shared, 3, tau=0.3).backward(losses)
    d = torch.cat([p.grad.reshape(-1) for p in shared])
    _close(d, torchjd_aggregation.PCD(tau=0.3)(jacobian), jacobian)
