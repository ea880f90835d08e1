"""ExcessMTL against torchjd 0.18's ExcessMTL (the oracle) over several steps (its squared-gradient
sums, baseline and weights carry over), on the same float64 Jacobians split over two parameters,
with and without warm-up; a task missing from a parameter; degenerate Jacobians; skipped steps and
the state_dict round trip; a shared-trunk backward; what it refuses."""

from __future__ import annotations

import pytest
import torch

from fusedmtl import weighting

torchjd_aggregation = pytest.importorskip("torchjd.aggregation")

G = 20


def _params():
    return [
        torch.zeros(5, 2, dtype=torch.float64, requires_grad=True),
        torch.zeros(G - 10, dtype=torch.float64, requires_grad=True),
    ]


def _rows(jacobian):
    return [[row[:10].reshape(5, 2).clone(), row[10:].clone()] for row in jacobian]


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


def _step(method, jacobian, rows=None):
    for p in method._shared:
        p.grad = None
    coeffs = method.step(_rows(jacobian) if rows is None else rows)
    return torch.cat([p.grad.reshape(-1) for p in method._shared]), coeffs


@pytest.mark.parametrize("k", [2, 3, 6, 64])
@pytest.mark.parametrize("conflicting", [False, True])
@pytest.mark.parametrize(
    "settings", [{}, {"n_warmup_steps": 2}, {"robust_step_size": 0.1, "n_warmup_steps": 1}]
)
def test_agrees_with_torchjd_over_steps(k, conflicting, settings):
    ours = weighting.ExcessMTL(_params(), k, **settings)
    theirs = torchjd_aggregation.ExcessMTL(**settings)
    for jacobian in _jacobians(k, k, 6, conflicting):
        d, coeffs = _step(ours, jacobian)
        expected = theirs(jacobian)
        torch.testing.assert_close(d, coeffs @ jacobian, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(d, expected, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(coeffs, theirs.weighting._weights, rtol=1e-10, atol=1e-13)


def test_the_excess_risk_formula_in_float64():
    """Step 2 (no warm-up): E_i = sum g_i^2 / sqrt(S_i + 1e-7), S_i = g1_i^2 + g2_i^2, divided by
    the first step's E; w = softmax(log w1 + E), w1 = softmax(log(1/K) + E1)."""
    j1, j2 = _jacobians(3, 9, 2, True)
    method = weighting.ExcessMTL(_params(), 3)
    _step(method, j1)
    _, coeffs = _step(method, j2)
    e1 = (j1**2 / (j1**2 + 1e-7).sqrt()).sum(1)
    e2 = (j2**2 / (j1**2 + j2**2 + 1e-7).sqrt()).sum(1) / (e1 + 1e-7)
    w1 = torch.softmax(torch.full((3,), 1 / 3, dtype=torch.float64).log() + e1, 0)
    expected = torch.softmax(w1.log() + e2, 0)
    torch.testing.assert_close(coeffs, expected, rtol=1e-12, atol=1e-15)


def test_a_task_missing_from_a_parameter_counts_as_zeros():
    jacobians = _jacobians(3, 5, 3, True)
    ours, theirs = weighting.ExcessMTL(_params(), 3), torchjd_aggregation.ExcessMTL()
    for jacobian in jacobians:
        rows = _rows(jacobian)
        rows[2][1] = None
        full = jacobian.clone()
        full[2, 10:] = 0
        d, _ = _step(ours, full, rows)
        torch.testing.assert_close(d, theirs(full), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kind", ["identical", "opposite", "zero_gradient", "all_zero"])
def test_degenerate_gradients_agree_with_torchjd(kind):
    g = _jacobians(1, 4, 1, False)[0][0]
    jacobian = {
        "identical": torch.stack([g, g, g]),
        "opposite": torch.stack([g, -g]),
        "zero_gradient": torch.stack([g, torch.zeros_like(g), -0.5 * g + 0.1]),
        "all_zero": torch.zeros(3, G, dtype=torch.float64),
    }[kind]
    k = jacobian.shape[0]
    ours, theirs = weighting.ExcessMTL(_params(), k), torchjd_aggregation.ExcessMTL()
    for _ in range(3):
        d, coeffs = _step(ours, jacobian)
        assert torch.isfinite(coeffs).all()
        torch.testing.assert_close(d, theirs(jacobian), rtol=1e-10, atol=1e-13)


def test_skipped_steps_and_the_state_dict_round_trip_continue_identically():
    jacobians = _jacobians(4, 3, 6, conflicting=True)
    method = weighting.ExcessMTL(_params(), 4, n_warmup_steps=1)
    for jacobian in jacobians[:3]:
        _step(method, jacobian)
    restored = weighting.ExcessMTL(_params(), 4, n_warmup_steps=1, on_nonfinite="skip")
    restored.load_state_dict(method.state_dict())
    bad = jacobians[3].clone()
    bad[1, 4] = float("inf")
    with pytest.warns(UserWarning, match="skipping"):
        assert restored.step(_rows(bad)) is None
    for jacobian in jacobians[3:]:
        assert torch.equal(_step(restored, jacobian)[1], _step(method, jacobian)[1])
    assert bool((method.sq_grad_sum_0_1 > 0).all()) and method.steps_done == 6


def test_refuses_the_gramian_alone_and_representation_mode():
    jacobian = _jacobians(3, 1, 1, False)[0]
    with pytest.raises(ValueError, match="not from the Gramian"):
        weighting.ExcessMTL().coefficients(jacobian @ jacobian.T)
    trunk = torch.nn.Linear(4, 3)
    x = torch.randn(8, 4)
    z = trunk(x)
    losses = [z[:, i].pow(2).mean() for i in range(3)]
    with pytest.raises(ValueError, match="representation"):
        weighting.ExcessMTL(trunk.parameters(), 3).backward(losses, features=z)
    with pytest.raises(ValueError, match="robust_step_size"):
        weighting.ExcessMTL(trunk.parameters(), 3, robust_step_size=0.0)


def test_backward_on_a_shared_trunk():
    torch.manual_seed(0)
    trunk = torch.nn.Linear(6, 8).double()
    heads = [torch.nn.Linear(8, 1).double() for _ in range(3)]
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randn(3, 16, 1, dtype=torch.float64)
    shared = list(trunk.parameters())
    method, theirs = weighting.ExcessMTL(shared, 3), torchjd_aggregation.ExcessMTL()
    for _ in range(3):
        z = torch.tanh(trunk(x))
        losses = [torch.nn.functional.mse_loss(h(z), y[i]) for i, h in enumerate(heads)]
        jacobian = torch.stack(
            [
                torch.cat(
                    [g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)]
                )
                for loss in losses
            ]
        )
        for p in shared:
            p.grad = None
        method.backward(losses)
        d = torch.cat([p.grad.reshape(-1) for p in shared])
        torch.testing.assert_close(d, theirs(jacobian), rtol=1e-10, atol=1e-13)
        with torch.no_grad():
            for p in shared:
                p -= 0.1 * p.grad
