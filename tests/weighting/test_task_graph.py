"""The autograd graph walks of fusedmtl.weighting.task_gradients: the C++ reachable_leaves against
the Python one, and split_shared_edges (one backward pass of sum_i L_i whose per-task parts are
scaled where they enter the shared part) against a float64 oracle of K separate gradients, on
graph shapes that split and on those that must not (then it installs nothing)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusedmtl import backend
from fusedmtl.weighting import task_gradients as tg

pytestmark = pytest.mark.skipif(backend._C is None, reason="the C++ walks need the extension")


class Net(nn.Module):
    """A trunk (z = tanh(W1 x)), three heads on z; ``shape`` adds what makes graphs differ."""

    def __init__(self, shape: str = "heads"):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh())
            self.heads = nn.ModuleList(nn.Linear(5, d) for d in (1, 2, 3))
            self.scale = nn.Parameter(torch.tensor(1.5))  # a shared leaf one head reads itself
            self.both = nn.Linear(5, 1)  # a non-shared leaf two losses read
        self.shape = shape
        self.double()

    @property
    def shared(self):
        shared = list(self.trunk.parameters())
        return shared + [self.scale] if self.shape == "shared_leaf_in_head" else shared

    def losses(self, x):
        z = self.trunk(x)
        outs = [head(z) for head in self.heads]
        if self.shape == "shared_leaf_in_head":
            outs[1] = outs[1] * self.scale
        if self.shape == "specific_behind_shared":
            common = self.both(z)
            outs = [outs[0] + common, outs[1] + common, outs[2]]
        losses = [(o - 0.3).pow(2).mean() for o in outs]
        if self.shape == "loss_of_a_loss":
            losses[2] = losses[2] + 2.0 * losses[0]
        if self.shape == "same_loss_twice":
            losses[1] = losses[0]
        return z, losses


def _x():
    return torch.randn(7, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _oracle(model, coeffs, stops=False):
    """float64: shared leaves sum_i c_i dL_i/dp, every other leaf sum_i dL_i/dp."""
    z, losses = model.losses(_x())
    shared = {id(p) for p in model.shared}
    params = [p for p in model.parameters()]
    out = {id(p): torch.zeros_like(p) for p in params}
    for c, loss in zip(coeffs, losses):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        for p, g in zip(params, grads):
            if g is not None:
                out[id(p)] += (float(c) if id(p) in shared else 1.0) * g
    return out


def _one_pass(model, coeffs, features=False):
    z, losses = model.losses(_x())
    split = tg.split_shared_edges(losses, coeffs, model.shared, [z] if features else [])
    if split is None:
        return None
    specific, token = split
    inputs = [*model.shared, *specific]
    grads = torch.autograd.grad(sum(losses), inputs, allow_unused=True)
    del token
    return {id(p): g for p, g in zip(inputs, grads) if g is not None}


COEFFS = [
    torch.tensor([0.2, 1.3, 0.5], dtype=torch.float64),
    torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64),  # zero coefficients: heads still learn
    torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64),
    torch.tensor([-1.0, 2.0, 0.25], dtype=torch.float32),  # another dtype than the gradients
]


@pytest.mark.parametrize("shape", ["heads", "shared_leaf_in_head"])
@pytest.mark.parametrize("features", [False, True], ids=["params", "features"])
@pytest.mark.parametrize("coeffs", COEFFS, ids=["mixed", "zeros", "all_zero", "float32"])
def test_one_pass_is_the_weighted_trunk_and_the_unweighted_heads(shape, features, coeffs):
    model = Net(shape)
    got = _one_pass(model, coeffs, features)
    assert got is not None
    expected = _oracle(model, coeffs)
    for p in model.parameters():
        e = expected[id(p)]
        g = got.get(id(p), torch.zeros_like(p))
        torch.testing.assert_close(
            g, e, rtol=1e-6 if coeffs.dtype == torch.float32 else 1e-12, atol=1e-14
        )
    assert set(got) <= {id(p) for p in model.parameters()}


@pytest.mark.parametrize("shape", ["specific_behind_shared", "loss_of_a_loss", "same_loss_twice"])
def test_graphs_that_do_not_split_install_nothing(shape):
    model = Net(shape)
    z, losses = model.losses(_x())
    params, total = list(model.parameters()), sum(losses)
    before = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
    assert tg.split_shared_edges(losses, COEFFS[0], model.shared, []) is None
    after = torch.autograd.grad(total, params, allow_unused=True)  # no hook left behind
    assert [g is None for g in before] == [g is None for g in after]
    for a, b in zip(before, after):
        assert a is None or torch.equal(a, b)


def test_leaf_losses_and_too_many_tasks_do_not_split():
    leaf = torch.tensor(1.0, requires_grad=True)
    assert tg.split_shared_edges([leaf], torch.ones(1), [], []) is None
    w = torch.randn(3, requires_grad=True)
    losses = [(w * i).sum() for i in range(65)]
    assert tg.split_shared_edges(losses, torch.ones(65), [w], []) is None


@pytest.mark.parametrize("drop_token_first", [False, True])
def test_a_retained_graph_is_unweighted_after_the_pass(drop_token_first):
    """The hooks fire once, and not at all once their token is gone: later passes through a
    retained graph are those of plain autograd."""
    model = Net()
    coeffs = torch.tensor([0.2, 1.3, 0.5], dtype=torch.float64)
    z, losses = model.losses(_x())
    params = [*model.trunk.parameters(), *model.heads.parameters()]
    plain = torch.autograd.grad(sum(losses), params, retain_graph=True)
    specific, token = tg.split_shared_edges(losses, coeffs, model.shared, [])
    if drop_token_first:
        del token
    total = sum(losses)
    first = torch.autograd.grad(total, params, retain_graph=True)
    changed = any(not torch.equal(a, b) for a, b in zip(first, plain))
    assert changed != drop_token_first
    for a, b in zip(torch.autograd.grad(total, params), plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def _graphs():
    model = Net("specific_behind_shared")
    z, losses = model.losses(_x())
    yield losses[0], [], "a loss"
    yield sum(losses), [z], "stopped at the features"
    yield sum(losses), list(model.trunk[2].parameters()), "leaf stops (no grad_fn) are no stops"
    yield z, [], "the trunk"
    yield torch.tensor(2.0, requires_grad=True), [], "a leaf root"
    yield torch.tensor(2.0), [], "no grad"
    yield (z.detach() * 2).sum(), [], "detached"


@pytest.mark.parametrize("case", range(7))
def test_reachable_leaves_is_the_python_walk(case):
    root, stops, _ = list(_graphs())[case]
    leaves, stopped = tg.reachable_leaves(root, stops)
    ref_leaves, ref_stopped = tg.reachable_leaves_reference(root, stops)
    assert stopped == ref_stopped
    assert [id(t) for t in leaves] == [id(t) for t in ref_leaves]  # the same objects, in order


# -- watch_finite: each gradient read for inf/NaN as the pass produces it -----------------------


def _watched(leaves, loss, use_grad=True):
    token = tg.watch_finite(leaves)
    assert token is not None
    if use_grad:
        torch.autograd.grad(loss, leaves, allow_unused=True)
    else:
        loss.backward()
    return tg.watched_finite(token)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [None, "inf", "-inf", "nan"])
@pytest.mark.parametrize("use_grad", [True, False], ids=["autograd.grad", "backward"])
def test_watch_finite_reads_every_gradient(dtype, bad, use_grad):
    """Against torch.isfinite of the gradients themselves: a non-finite element anywhere in any
    leaf's gradient (a transposed one among them: Linear's weight) is seen."""
    lin = nn.Linear(7, 5).to(dtype)
    scale = torch.ones(5, dtype=dtype, requires_grad=True)
    x = torch.randn(3, 7).to(dtype)
    out = lin(x) * scale
    if bad is not None:
        out = out * torch.tensor([1.0, 1.0, float(bad), 1.0, 1.0]).to(dtype)
    leaves = [lin.weight, lin.bias, scale]
    expected = all(
        bool(g.isfinite().all()) for g in torch.autograd.grad(out.sum(), leaves, retain_graph=True)
    )
    assert expected == (bad is None)
    assert _watched(leaves, out.sum(), use_grad) is expected


def test_watch_finite_after_user_hooks_and_removed_with_its_token():
    """It sees the gradient a user's hook returns, and releasing the token removes its own hook
    only (the user's, registered before or after, still runs once)."""
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(2, 4)
    calls = []
    before = w.register_hook(lambda g: calls.append("before") or g * float("inf"))
    token = tg.watch_finite([w])
    after = w.register_hook(lambda g: calls.append("after"))
    torch.autograd.grad((x @ w).sum(), [w])
    assert tg.watched_finite(token) is False and calls == ["before", "after"]
    del token
    before.remove()
    calls.clear()
    (x @ w).sum().backward()
    assert calls == ["after"] and bool(w.grad.isfinite().all())
    after.remove()


def test_watch_finite_when_the_first_user_hook_comes_during_the_watch():
    """Registering a tensor's first Python hook clears its hooks, the watch's with them: the
    watch then answers None (read after the pass), and releasing it leaves the user's hook."""
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(2, 4)
    calls = []
    token = tg.watch_finite([w])
    handle = w.register_hook(lambda g: calls.append(1))
    torch.autograd.grad((x @ w).sum(), [w])
    assert tg.watched_finite(token) is None
    del token
    torch.autograd.grad((x @ w).sum(), [w])
    assert calls == [1, 1]
    handle.remove()


def test_watch_finite_cannot_watch_everything():
    w = torch.randn(3, requires_grad=True)
    inner = w * 2
    token = tg.watch_finite([inner])  # a non-leaf: its gradient is captured at its grad_fn
    torch.autograd.grad(inner.sum(), [inner])
    assert tg.watched_finite(token) is None
    assert tg.watch_finite([torch.randn(3, device="meta", requires_grad=True)]) is None
    untouched = tg.watch_finite([w])  # no pass: nothing seen, nothing non-finite
    assert tg.watched_finite(untouched) is True
