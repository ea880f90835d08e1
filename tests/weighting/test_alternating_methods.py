"""Alternating: the schedule (cyclic, random permutations from the seed), equal weights over each
cycle, the state_dict round trip, skipped steps, and backward on a shared-trunk model."""

from __future__ import annotations

import pytest
import torch

from fusedmtl import weighting


def _tasks_trained(method, steps: int, k: int) -> list[int]:
    out = []
    for _ in range(steps):
        weights = method.backward([torch.ones((), requires_grad=True) for _ in range(k)])
        assert sorted(weights.tolist()) == [0.0] * (k - 1) + [1.0]
        out.append(int(weights.argmax()))
    return out


def test_cyclic_order():
    assert _tasks_trained(weighting.Alternating(3), 7, 3) == [0, 1, 2, 0, 1, 2, 0]


def test_random_order_is_a_permutation_per_cycle_drawn_from_the_seed():
    k, cycles = 5, 4
    trained = _tasks_trained(weighting.Alternating(k, order="random", seed=11), k * cycles, k)
    gen = torch.Generator().manual_seed(11)
    expected = [t for _ in range(cycles) for t in torch.randperm(k, generator=gen).tolist()]
    assert trained == expected
    assert len({tuple(trained[i : i + k]) for i in range(0, k * cycles, k)}) > 1


def test_weights_average_to_equal_weighting_over_cycles():
    k = 4
    method = weighting.Alternating(k, order="random", seed=0)
    values = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    totals, weights = [], []
    for _ in range(3 * k):
        totals.append(method(list(values)))  # (the module's total: L_t)
        weights.append(method.last_weights)
    torch.testing.assert_close(
        torch.stack(weights).mean(0), torch.full((k,), 0.25, dtype=torch.float64)
    )
    torch.testing.assert_close(torch.stack(totals).mean(), values.mean())


def test_state_dict_round_trip_continues_the_schedule():
    k = 4
    method = weighting.Alternating(k, order="random", seed=3)
    _tasks_trained(method, 6, k)  # mid-cycle
    state = method.state_dict()
    ahead = _tasks_trained(method, 9, k)
    restored = weighting.Alternating(k, order="random", seed=99)
    restored.load_state_dict(state)
    assert _tasks_trained(restored, 9, k) == ahead


def test_a_skipped_step_does_not_advance_the_schedule():
    method = weighting.Alternating(3, on_nonfinite="skip")
    _tasks_trained(method, 1, 3)
    bad = [torch.tensor(float("nan"), requires_grad=True)] + [
        torch.ones((), requires_grad=True)
    ] * 2
    with pytest.warns(UserWarning, match="skipping"):
        assert method.backward(bad) is None
    assert _tasks_trained(method, 2, 3) == [1, 2]


def test_rejects_an_unknown_order():
    with pytest.raises(ValueError, match="order"):
        weighting.Alternating(2, order="backwards")


def test_backward_trains_one_task_on_a_shared_trunk():
    torch.manual_seed(0)
    trunk, heads = torch.nn.Linear(4, 6), [torch.nn.Linear(6, 1) for _ in range(3)]
    x, y = torch.randn(8, 4), torch.randn(3, 8, 1)
    method = weighting.Alternating(["a", "b", "c"])
    for step in range(3):
        for p in [*trunk.parameters(), *(q for h in heads for q in h.parameters())]:
            p.grad = None
        z = torch.tanh(trunk(x))
        losses = {
            n: torch.nn.functional.mse_loss(h(z), y[i])
            for i, (n, h) in enumerate(zip("abc", heads))
        }
        method.backward(losses)
        z = torch.tanh(trunk(x))
        expected = torch.autograd.grad(
            torch.nn.functional.mse_loss(heads[step](z), y[step]), list(trunk.parameters())
        )
        for p, e in zip(trunk.parameters(), expected):
            torch.testing.assert_close(p.grad, e)
        # The other heads get zero gradients (weight 0), not their own losses' gradients.
        for i, head in enumerate(heads):
            if i != step:
                assert all(bool((p.grad == 0).all()) for p in head.parameters())
