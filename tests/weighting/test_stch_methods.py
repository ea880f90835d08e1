"""STCH against its formula in float64 (value and, through autograd, the weights), its warm-up and
nadir schedule, the state_dict round trip, and backward on a shared-trunk model."""

from __future__ import annotations

import pytest
import torch

from fusedmtl import weighting


def _formula(losses: torch.Tensor, nadir, preference, mu: float, eps: float = 1e-20):
    """The paper's code: K mu log sum_i exp(p_i log(L_i / n_i + eps) / mu)."""
    k = losses.shape[0]
    return k * mu * torch.log(torch.exp(preference * torch.log(losses / nadir + eps) / mu).sum())


@pytest.mark.parametrize("mu", [0.1, 1.0, 5.0])
@pytest.mark.parametrize("k", [2, 3, 7])
def test_total_and_weights_are_the_formula_and_its_gradient(mu, k):
    gen = torch.Generator().manual_seed(k)
    nadir = torch.rand(k, generator=gen, dtype=torch.float64) + 0.5
    preference = torch.rand(k, generator=gen, dtype=torch.float64) + 0.5
    method = weighting.STCH(k, mu=mu, nadir=nadir, preference=preference)
    losses = (torch.rand(k, generator=gen, dtype=torch.float64) * 3 + 0.1).requires_grad_()
    total = method(list(losses))
    expected = _formula(losses, nadir, preference, mu)
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=0)
    (oracle_weights,) = torch.autograd.grad(expected, losses)
    torch.testing.assert_close(method.last_weights, oracle_weights, rtol=1e-10, atol=0)
    (weights,) = torch.autograd.grad(total, losses)
    torch.testing.assert_close(weights, oracle_weights, rtol=1e-10, atol=0)


def test_small_mu_is_the_tchebycheff_max():
    losses = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    method = weighting.STCH(3, mu=1e-3, nadir=torch.ones(3))
    total, weights = method.total(losses)
    torch.testing.assert_close(total, 3 * losses.log().max(), rtol=1e-3, atol=0)
    torch.testing.assert_close(weights, torch.tensor([0.0, 3 / 2.0, 0.0], dtype=torch.float64))


def test_warm_up_then_the_nadir_point_is_the_mean_of_the_nadir_phase():
    method = weighting.STCH(2, warmup_steps=2, nadir_steps=3)
    steps = [
        torch.tensor(v, dtype=torch.float64)
        for v in ([9.0, 9.0], [8.0, 8.0], [1.0, 2.0], [2.0, 4.0], [3.0, 6.0], [1.0, 1.0])
    ]
    for values in steps[:5]:  # log-loss phases
        total, weights = method.total(values)
        torch.testing.assert_close(total, values.log().sum())
        torch.testing.assert_close(weights, 1 / values)
    torch.testing.assert_close(method.nadir, torch.tensor([2.0, 4.0], dtype=torch.float64))
    total, _ = method.total(steps[5])
    torch.testing.assert_close(total, _formula(steps[5], method.nadir, torch.ones(2), 1.0))


def test_state_dict_round_trip_mid_nadir_phase():
    values = [torch.tensor([1.0 + i, 2.0 * (i + 1)], dtype=torch.float64) for i in range(6)]
    method = weighting.STCH(2, warmup_steps=1, nadir_steps=3)
    for v in values[:2]:
        method.total(v)
    restored = weighting.STCH(2, warmup_steps=1, nadir_steps=3)
    restored.load_state_dict(method.state_dict())
    for v in values[2:]:
        torch.testing.assert_close(restored.total(v), method.total(v))
    torch.testing.assert_close(restored.nadir, method.nadir)


def test_skipped_steps_count_for_nothing():
    method = weighting.STCH(2, nadir_steps=2, on_nonfinite="skip")
    method(torch.tensor([1.0, 2.0], dtype=torch.float64).unbind())
    with pytest.warns(UserWarning, match="skipping"):
        method(torch.tensor([float("inf"), 2.0], dtype=torch.float64).unbind())
    method(torch.tensor([3.0, 4.0], dtype=torch.float64).unbind())
    torch.testing.assert_close(method.nadir, torch.tensor([2.0, 3.0], dtype=torch.float64))


def test_rejects_bad_settings():
    for kwargs in (
        {"mu": 0.0},
        {"nadir_steps": 0},
        {"nadir": torch.tensor([1.0, -1.0])},
        {"preference": torch.ones(3)},
    ):
        with pytest.raises(ValueError, match="STCH"):
            weighting.STCH(2, **kwargs)


def test_backward_on_a_shared_trunk():
    torch.manual_seed(0)
    trunk, heads = (
        torch.nn.Linear(4, 6).double(),
        [torch.nn.Linear(6, 1).double() for _ in range(3)],
    )
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(3, 8, 1, dtype=torch.float64)
    params = [*trunk.parameters(), *(p for h in heads for p in h.parameters())]

    def losses():
        z = torch.tanh(trunk(x))
        return [torch.nn.functional.mse_loss(h(z), y[i]) for i, h in enumerate(heads)]

    nadir = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    method = weighting.STCH(3, mu=0.5, nadir=nadir)
    method.backward(losses())
    expected = torch.autograd.grad(
        _formula(torch.stack(losses()), nadir, torch.ones(3), 0.5), params
    )
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-14)
