"""The full IMTL (IMTL-L with IMTL-G) against the paper's formulas computed in float64 (LibMTL's
IMTL): the shared update is IMTL-G's closed form a_{2..K} = g'_1 U^T (D U^T)^-1 on the gradients
g'_i of the scaled losses exp(s_i) L_i, the heads get their scaled loss's gradient, s gets
exp(s_i) L_i - 1; with a GradScaler, step(), training s to balance the scaled losses, state."""

from __future__ import annotations

import pytest
import torch

from fusedmtl import weighting

K = 3


def _problem(seed=0):
    torch.manual_seed(seed)
    trunk = torch.nn.Linear(6, 8).double()
    heads = [torch.nn.Linear(8, 1).double() for _ in range(K)]
    x = torch.randn(16, 6, dtype=torch.float64)
    y = (
        torch.randn(K, 16, 1, dtype=torch.float64)
        * torch.tensor([1.0, 10.0, 0.1]).double()[:, None, None]
    )

    def losses():
        z = torch.tanh(trunk(x))
        return [torch.nn.functional.mse_loss(h(z), y[i]) for i, h in enumerate(heads)]

    return trunk, heads, losses


def _paper_alpha(grads: torch.Tensor) -> torch.Tensor:
    """IMTL-G's closed form, equation (the paper's Algorithm 1, lines 6-8)."""
    units = grads / grads.norm(dim=1, keepdim=True)
    D = grads[:1] - grads[1:]
    U = units[:1] - units[1:]
    alpha = grads[0] @ U.T @ torch.linalg.inv(D @ U.T)
    return torch.cat([1 - alpha.sum(0, keepdim=True), alpha])


@pytest.mark.parametrize("log_scales", [[0.0, 0.0, 0.0], [0.3, -1.0, 2.0]])
def test_backward_matches_the_paper_in_float64(log_scales):
    trunk, heads, losses = _problem()
    method = weighting.IMTL(trunk.parameters(), K)
    with torch.no_grad():
        method.log_scales.copy_(torch.tensor(log_scales))
    s = method.log_scales.detach().double()  # (a float32 parameter)
    coeffs = method.backward(losses())
    shared = list(trunk.parameters())
    values = torch.stack([loss.detach() for loss in losses()])
    grads = torch.stack(
        [
            torch.cat(
                [
                    g.reshape(-1)
                    for g in torch.autograd.grad(s[i].exp() * loss, shared, retain_graph=True)
                ]
            )
            for i, loss in enumerate(losses())
        ]
    )
    alpha = _paper_alpha(grads)
    torch.testing.assert_close(coeffs, alpha, rtol=1e-9, atol=1e-12)
    d = torch.cat([p.grad.reshape(-1) for p in shared])
    torch.testing.assert_close(d, alpha @ grads, rtol=1e-9, atol=1e-12)
    # the projections of d onto the unit scaled gradients are equal (the impartiality)
    projections = grads @ d / grads.norm(dim=1)
    torch.testing.assert_close(projections, projections[:1].expand(K), rtol=1e-9, atol=0)
    for i, head in enumerate(heads):
        own = torch.autograd.grad(s[i].exp() * losses()[i], list(head.parameters()))
        for p, e in zip(head.parameters(), own):
            torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        method.log_scales.grad.double(), s.exp() * values - 1, rtol=1e-6, atol=1e-6
    )


def test_training_the_scales_balances_the_scaled_losses():
    """With fixed losses L, gradient descent on s drives exp(s_i) L_i to 1: s_i -> -log L_i."""
    params = [torch.zeros(4, dtype=torch.float64, requires_grad=True)]
    method = weighting.IMTL(params, K)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.2)
    values = torch.tensor([0.5, 20.0, 0.01], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for _ in range(400):
        grads = [[torch.randn(4, generator=gen, dtype=torch.float64)] for _ in range(K)]
        method.step(grads, values)
        optimizer.step()
        optimizer.zero_grad()
    torch.testing.assert_close(
        method.log_scales.detach().double(), -values.log(), rtol=0, atol=1e-4
    )


def test_step_is_imtl_g_on_the_given_gradients():
    gen = torch.Generator().manual_seed(3)
    jacobian = torch.randn(K, 12, generator=gen, dtype=torch.float64)
    params = [torch.zeros(12, dtype=torch.float64, requires_grad=True)]
    coeffs = weighting.IMTL(params, K).step([[row.clone()] for row in jacobian])
    torch.testing.assert_close(coeffs, _paper_alpha(jacobian), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(params[0].grad, coeffs @ jacobian, rtol=1e-12, atol=1e-14)


def test_grad_scaler_scales_the_scale_gradient_like_the_model_gradients():
    trunk, _, losses = _problem(1)
    plain = weighting.IMTL(trunk.parameters(), K)
    plain.backward(losses())
    expected = plain.log_scales.grad.clone()
    trunk.zero_grad()
    scaled = weighting.IMTL(trunk.parameters(), K)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    optimizer = torch.optim.SGD(list(trunk.parameters()) + list(scaled.parameters()), lr=0.0)
    scaled.backward(losses(), grad_scaler=scaler)
    scaler.unscale_(optimizer)
    torch.testing.assert_close(scaled.log_scales.grad, expected, rtol=1e-6, atol=1e-7)


def test_skipped_steps_leave_the_scale_gradient_alone():
    trunk, _, losses = _problem(2)
    method = weighting.IMTL(trunk.parameters(), K, on_nonfinite="skip")
    bad = losses()
    bad[1] = bad[1] * float("nan")
    with pytest.warns(UserWarning, match="skipping"):
        assert method.backward(bad) is None
    assert method.log_scales.grad is None


def test_state_dict_holds_the_scales():
    method = weighting.IMTL([torch.zeros(2, requires_grad=True)], K, init=0.5)
    with torch.no_grad():
        method.log_scales.add_(torch.tensor([0.1, 0.2, 0.3]))
    restored = weighting.IMTL([torch.zeros(2, requires_grad=True)], K)
    restored.load_state_dict(method.state_dict())
    assert torch.equal(restored.log_scales, method.log_scales)
