"""IMTL-L against its formula in float64: the total, the gradients it sends to the model and to
its scales, convergence of the scaled losses to 1, the state_dict, and a shared-trunk backward."""

from __future__ import annotations

import torch

from fusedmtl import weighting


def test_total_and_gradients_are_the_formula():
    k = 4
    method = weighting.IMTLL(k).double()
    with torch.no_grad():
        method.log_scales.copy_(torch.tensor([-1.0, 0.0, 0.5, 2.0], dtype=torch.float64))
    losses = torch.tensor([0.3, 1.0, 2.0, 7.0], dtype=torch.float64, requires_grad=True)
    total = method(list(losses))
    s = method.log_scales.detach().clone().requires_grad_()
    expected = (s.exp() * losses - s).sum()
    torch.testing.assert_close(total, expected, rtol=1e-14, atol=0)
    grads = torch.autograd.grad(total, [losses, method.log_scales])
    oracle = torch.autograd.grad(expected, [losses, s])
    for g, o in zip(grads, oracle):
        torch.testing.assert_close(g, o, rtol=1e-14, atol=0)
    torch.testing.assert_close(method.last_weights, s.detach().exp())


def test_descent_on_the_scales_equalises_the_scaled_losses():
    losses = torch.tensor([0.01, 1.0, 50.0], dtype=torch.float64)
    method = weighting.IMTLL(3).double()
    optimizer = torch.optim.SGD(method.parameters(), lr=0.02)
    for _ in range(4000):
        optimizer.zero_grad()
        method(list(losses.clone().requires_grad_())).backward()
        optimizer.step()
    scaled = method.log_scales.detach().exp() * losses
    torch.testing.assert_close(scaled, torch.ones(3, dtype=torch.float64), rtol=1e-3, atol=0)


def test_state_dict_round_trip():
    method = weighting.IMTLL(["a", "b"], init=0.25)
    restored = weighting.IMTLL(["a", "b"])
    restored.load_state_dict(method.state_dict())
    torch.testing.assert_close(restored.log_scales, torch.full((2,), 0.25))


def test_backward_on_a_shared_trunk():
    torch.manual_seed(0)
    trunk, heads = (
        torch.nn.Linear(4, 6).double(),
        [torch.nn.Linear(6, 1).double() for _ in range(2)],
    )
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(2, 8, 1, dtype=torch.float64)
    method = weighting.IMTLL(2, init=0.3).double()
    params = [*trunk.parameters(), *(p for h in heads for p in h.parameters()), method.log_scales]

    def losses():
        z = torch.tanh(trunk(x))
        return [torch.nn.functional.mse_loss(h(z), y[i]) for i, h in enumerate(heads)]

    method.backward(losses())
    s = method.log_scales
    expected = torch.autograd.grad(
        sum(s[i].exp() * loss - s[i] for i, loss in enumerate(losses())), params
    )
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=1e-14)
