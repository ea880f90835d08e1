"""MoCo against the paper's recursions computed in float64 on explicit Jacobians (LibMTL's MoCo,
the only peer that has it): y_i <- y_i - beta_t (y_i - L_i g_i / (norm(g_i) + 1e-8)),
lambda <- softmax(lambda - gamma_t (Y Y^T + rho I) lambda), d = Y^T lambda, over several steps;
degenerate Jacobians; skipped steps and the state_dict round trip; a shared-trunk backward in
both gradient modes; what it refuses."""

from __future__ import annotations

import pytest
import torch

from fusedmtl import weighting

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


class Oracle:
    """The paper's Algorithm 1 (LibMTL's code) on K x G float64 matrices."""

    def __init__(self, k, beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0):
        self.y = torch.zeros(k, G, dtype=torch.float64)
        self.lambd = torch.full((k,), 1.0 / k, dtype=torch.float64)
        self.t, self.settings = 0, (beta, beta_sigma, gamma, gamma_sigma, rho)

    def __call__(self, jacobian, losses):
        beta, beta_sigma, gamma, gamma_sigma, rho = self.settings
        self.t += 1
        rescaled = jacobian / (jacobian.norm(dim=1, keepdim=True) + 1e-8) * losses[:, None]
        self.y = self.y - beta / self.t**beta_sigma * (self.y - rescaled)
        k = len(losses)
        step = (self.y @ self.y.T + rho * torch.eye(k, dtype=torch.float64)) @ self.lambd
        self.lambd = torch.softmax(self.lambd - gamma / self.t**gamma_sigma * step, -1)
        return self.y.T @ self.lambd, self.lambd


def _losses(k, step):
    return torch.linspace(0.5, 3.0, k, dtype=torch.float64) / (1 + step)


def _step(method, jacobian, losses):
    for p in method._shared:
        p.grad = None
    coeffs = method.step(_rows(jacobian), losses)
    return torch.cat([p.grad.reshape(-1) for p in method._shared]), coeffs


@pytest.mark.parametrize("k", [2, 3, 6, 64])
@pytest.mark.parametrize("conflicting", [False, True])
@pytest.mark.parametrize(
    "settings",
    [{}, {"beta": 0.9, "beta_sigma": 0.0, "gamma": 1.0, "gamma_sigma": 0.2, "rho": 0.5}],
)
def test_agrees_with_the_paper_in_float64(k, conflicting, settings):
    ours, oracle = weighting.MoCo(_params(), k, **settings), Oracle(k, **settings)
    for t, jacobian in enumerate(_jacobians(k, k, 6, conflicting)):
        d, coeffs = _step(ours, jacobian, _losses(k, t))
        expected_d, expected_lambda = oracle(jacobian, _losses(k, t))
        torch.testing.assert_close(coeffs, expected_lambda, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(d, expected_d, rtol=1e-10, atol=1e-13)
    y0 = torch.cat([ours.tracked_0_0.reshape(-1), ours.tracked_0_1.reshape(-1)])
    torch.testing.assert_close(y0, oracle.y[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["identical", "opposite", "zero_gradient", "all_zero"])
def test_degenerate_gradients_agree_with_the_paper(kind):
    g = _jacobians(1, 4, 1, False)[0][0]
    jacobian = {
        "identical": torch.stack([g, g, g]),
        "opposite": torch.stack([g, -g]),
        "zero_gradient": torch.stack([g, torch.zeros_like(g), -0.5 * g + 0.1]),
        "all_zero": torch.zeros(3, G, dtype=torch.float64),
    }[kind]
    k = jacobian.shape[0]
    ours, oracle = weighting.MoCo(_params(), k), Oracle(k)
    for t in range(3):
        d, coeffs = _step(ours, jacobian, _losses(k, t))
        assert torch.isfinite(d).all()
        expected_d, expected_lambda = oracle(jacobian, _losses(k, t))
        torch.testing.assert_close(coeffs, expected_lambda, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(d, expected_d, rtol=1e-10, atol=1e-13)


def test_skipped_steps_and_the_state_dict_round_trip_continue_identically():
    jacobians = _jacobians(4, 3, 6, conflicting=True)
    method = weighting.MoCo(_params(), 4)
    for t, jacobian in enumerate(jacobians[:3]):
        _step(method, jacobian, _losses(4, t))
    restored = weighting.MoCo(_params(), 4, on_nonfinite="skip")
    restored.load_state_dict(method.state_dict())
    bad = jacobians[3].clone()
    bad[2, 5] = float("inf")
    with pytest.warns(UserWarning, match="skipping"):
        assert restored.step(_rows(bad), _losses(4, 3)) is None
    for t, jacobian in enumerate(jacobians[3:], start=3):
        a = _step(restored, jacobian, _losses(4, t))
        b = _step(method, jacobian, _losses(4, t))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert method.steps_done == 6


@pytest.mark.parametrize("grad_mode", ["loop", "batched"])
def test_backward_on_a_shared_trunk(grad_mode):
    torch.manual_seed(0)
    trunk = torch.nn.Linear(6, 3).double()
    heads = [torch.nn.Linear(3, 1).double() for _ in range(3)]
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randn(3, 16, 1, dtype=torch.float64)
    shared = list(trunk.parameters())
    method = weighting.MoCo(shared, 3, grad_mode=grad_mode)
    oracle = Oracle(3)
    oracle.y = torch.zeros(3, sum(p.numel() for p in shared), dtype=torch.float64)
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
        values = torch.stack([loss.detach() for loss in losses])
        for p in shared:
            p.grad = None
        method.backward(losses)
        d = torch.cat([p.grad.reshape(-1) for p in shared])
        expected, _ = oracle(jacobian, values)
        torch.testing.assert_close(d, expected, rtol=1e-10, atol=1e-13)
        with torch.no_grad():
            for p in shared:
                p -= 0.1 * p.grad


def test_refuses_missing_losses_and_representation_mode():
    jacobian = _jacobians(3, 1, 1, False)[0]
    with pytest.raises(ValueError, match="needs the losses"):
        weighting.MoCo(_params(), 3).step(_rows(jacobian))
    trunk = torch.nn.Linear(4, 3)
    z = trunk(torch.randn(8, 4))
    losses = [z[:, i].pow(2).mean() for i in range(3)]
    with pytest.raises(ValueError, match="representation"):
        weighting.MoCo(trunk.parameters(), 3).backward(losses, features=z)
