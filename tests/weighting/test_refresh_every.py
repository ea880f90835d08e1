"""Amortized coefficients (``refresh_every=n``, issue 16) for every registered gradient-based
method: n = 1 is the exact method bit for bit; with n = 4 steps 1, 5, 9 are those of the method
stepped only on them, and the steps between are the float64 sum_i c_i g_i of the last
coefficients (each head: its own loss's gradient, unweighted), in the parameter and the
representation mode, in one backward pass and in the two of a graph that does not split; a
resume mid-period continues bit for bit; zero coefficients, non-finite gradients, GradScaler
overflow."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from weighting_cases import SharedTrunkNet, make_batch, model_losses

from fusedmtl import weighting as W
from fusedmtl.weighting import gradient_based

METHODS = sorted(W.GRADIENT_BASED)
# (method, representation mode) for every method, in both modes where it has the second
MODES = [
    (name, representation)
    for name in METHODS
    for representation in (False, True)
    if not representation or W.GRADIENT_BASED[name].representation_mode
]
MODE_IDS = [f"{name}-{'features' if rep else 'params'}" for name, rep in MODES]
STEPS = 10
PERIOD = 4


def _build(name, model, **overrides):
    if name == "db_mtl" and overrides.pop("representation", False):
        overrides["beta"] = 0.0  # (representation mode needs it)
    overrides.pop("representation", None)
    return W.GRADIENT_BASED[name].example(3, model.shared, **overrides)


def _grads(model) -> list[torch.Tensor]:
    return [
        p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()
    ]


def _step(method, model, batch, representation=False, **kwargs):
    model.zero_grad(set_to_none=True)
    losses, z = model_losses(model, batch, features=True)
    return method.backward(losses, features=z if representation else None, **kwargs)


def _sgd(model, lr=0.05):
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(lr * p.grad)


def _oracle(model, batch, weights) -> list[torch.Tensor]:
    """float64: the shared parameters' sum_i w_i g_i from K separate gradients, every head the
    gradient of its own loss."""
    losses = model_losses(model, batch)
    shared = model.shared
    out = {id(p): torch.zeros_like(p, dtype=torch.float64) for p in model.parameters()}
    for i, loss in enumerate(losses):
        head = list(model.heads[i].parameters())
        grads = torch.autograd.grad(loss, shared + head, retain_graph=True, allow_unused=True)
        for p, g in zip(shared, grads[: len(shared)]):
            if g is not None:
                out[id(p)] += float(weights[i]) * g.double()
        for p, g in zip(head, grads[len(shared) :]):
            out[id(p)] += g.double()
    return [out[id(p)] for p in model.parameters()]


def _loss_weights(name, coeffs, model, batch):
    """What the reused coefficients weigh each loss by (DB-MTL's apply to grad log L_i)."""
    if name != "db_mtl":
        return coeffs.double()
    values = torch.stack([loss.detach() for loss in model_losses(model, batch)]).double()
    return coeffs.double() / values.clamp_min(1e-8)


@pytest.mark.parametrize(("name", "representation"), MODES, ids=MODE_IDS)
def test_refresh_every_one_is_the_exact_method_bitwise(name, representation):
    exact_model, model = SharedTrunkNet(seed=0), SharedTrunkNet(seed=0)
    exact = _build(name, exact_model, representation=representation)
    method = _build(name, model, refresh_every=1, representation=representation)
    batch = make_batch(0)
    for _ in range(4):
        a = _step(exact, exact_model, batch, representation)
        b = _step(method, model, batch, representation)
        assert torch.equal(a, b)
        for ga, gb in zip(_grads(exact_model), _grads(model)):
            assert torch.equal(ga, gb)
        _sgd(exact_model)
        _sgd(model)


@pytest.fixture(params=["one_pass", "two_passes"])
def between_refreshes(request, monkeypatch):
    """A step between refreshes as one pass (the graph split at the shared part) or, as where it
    does not split, two."""
    if request.param == "two_passes":
        monkeypatch.setattr(gradient_based, "split_shared_edges", lambda *args: None)
    return request.param


@pytest.mark.parametrize(("name", "representation"), MODES, ids=MODE_IDS)
def test_refresh_steps_are_the_method_and_the_others_reuse_its_coefficients(
    name, representation, between_refreshes
):
    model, reference_model = SharedTrunkNet(seed=0), SharedTrunkNet(seed=0)
    method = _build(name, model, refresh_every=PERIOD, representation=representation)
    reference = _build(name, reference_model, representation=representation)  # refresh steps only
    batch = make_batch(0)
    last = None
    for step in range(STEPS):
        coeffs = _step(method, model, batch, representation)
        if step % PERIOD == 0:  # steps 1, 5, 9
            reference_model.load_state_dict(model.state_dict())
            expected = _step(reference, reference_model, batch, representation)
            assert torch.equal(coeffs, expected)
            for g, e in zip(_grads(model), _grads(reference_model)):
                assert torch.equal(g, e)
            last = coeffs.clone()
        else:
            assert torch.equal(coeffs, last)
            assert torch.equal(method.last_weights, last)
            weights = _loss_weights(name, last, model, batch)
            for g, e in zip(_grads(model), _oracle(model, batch, weights)):
                torch.testing.assert_close(g.double(), e, rtol=1e-10, atol=1e-12)
        _sgd(model)


class _Constant(W.GradientWeighting):
    """Fixed coefficients, some zero (a test method)."""

    needs_full_gramian = False

    def __init__(self, shared_params, tasks, values, **kwargs):
        super().__init__(shared_params, tasks, **kwargs)
        self.values = torch.tensor(values, dtype=torch.float64)

    def coefficients(self, gramian, losses=None):
        return self.values.to(gramian)


def test_zero_coefficients_leave_the_heads_their_own_gradient(between_refreshes):
    model = SharedTrunkNet(seed=0)
    method = _Constant(model.shared, 3, [0.0, 2.0, 0.0], refresh_every=3)
    batch = make_batch(0)
    for step in range(5):
        _step(method, model, batch)
        got = _grads(model)
        assert all(g.isfinite().all() for g in got)
        for g, e in zip(got, _oracle(model, batch, [0.0, 2.0, 0.0])):
            torch.testing.assert_close(g.double(), e, rtol=1e-10, atol=1e-12)
        # every head is reached with its full gradient, the zero-weighted ones too
        assert all(p.grad.abs().sum() > 0 for p in model.heads.parameters())
        _sgd(model)


def test_all_zero_coefficients_give_no_shared_update(between_refreshes):
    model = SharedTrunkNet(seed=0)
    method = _Constant(model.shared, 3, [0.0, 0.0, 0.0], refresh_every=2)
    batch = make_batch(0)
    for _ in range(2):
        _step(method, model, batch)
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.shared)
        assert all(p.grad.abs().sum() > 0 for p in model.heads.parameters())


@pytest.mark.parametrize("name", METHODS)
def test_resume_mid_period_continues_bitwise(name):
    model = SharedTrunkNet(seed=0)
    method = _build(name, model, refresh_every=PERIOD)
    batch = make_batch(0)
    for _ in range(PERIOD + 2):  # stopped two steps into the second period
        _step(method, model, batch)
        _sgd(model)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "method": method.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = SharedTrunkNet(seed=1)
    resumed_model.load_state_dict(saved["model"])
    resumed = _build(name, resumed_model, refresh_every=PERIOD)
    resumed.load_state_dict(saved["method"])
    for _ in range(PERIOD + 1):  # across the next refresh
        a = _step(method, model, batch)
        b = _step(resumed, resumed_model, batch)
        assert torch.equal(a, b)
        _sgd(model)
        _sgd(resumed_model)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def test_loaded_coefficients_are_a_copy():
    model = SharedTrunkNet(seed=0)
    a = W.MGDA(model.shared, 3, refresh_every=2)
    _step(a, model, make_batch(0))
    b = W.MGDA(model.shared, 3, refresh_every=2)
    b.load_state_dict(a.state_dict())
    b._refresh_coeffs.zero_()
    assert a._refresh_coeffs.abs().sum() > 0


def test_refresh_every_is_checked():
    model = SharedTrunkNet(seed=0)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="refresh_every"):
            W.MGDA(model.shared, 3, refresh_every=bad)


def _poison(model, where="trunk"):
    """A hook that makes the next trunk (or first head) gradient infinite (an AMP overflow)."""
    weight = (model.trunk[0] if where == "trunk" else model.heads[0]).weight
    return weight.register_hook(lambda g: g * float("inf"))


@pytest.fixture(params=["as_they_arrive", "after_the_pass"])
def finiteness_check(request, monkeypatch, between_refreshes):
    """Where a step between refreshes reads the gradients' finiteness: as the one pass produces
    them (task_gradients.watch_finite) or after it (base.grads_finite). Returns a function that
    runs a step between refreshes and checks it read them where it should."""
    if request.param == "after_the_pass":
        monkeypatch.setattr(gradient_based, "watch_finite", lambda leaves: None)
    reads = []
    checked = gradient_based.grads_finite
    monkeypatch.setattr(gradient_based, "grads_finite", lambda g: reads.append(1) or checked(g))
    read_after = request.param == "after_the_pass" or between_refreshes == "two_passes"

    def step_between(method, losses):
        before = len(reads)
        try:
            return method.backward(losses)
        finally:
            assert (len(reads) > before) == read_after

    return step_between


@pytest.mark.parametrize("where", ["trunk", "head"])
def test_nonfinite_between_refreshes_follows_the_policy(where, finiteness_check):
    model = SharedTrunkNet(seed=0)
    batch = make_batch(0)
    method = W.MGDA(model.shared, 3, refresh_every=4, on_nonfinite="skip")
    _step(method, model, batch)
    model.zero_grad(set_to_none=True)
    assert finiteness_check(method, model_losses(model, batch)) is not None  # finite: taken
    assert method._refresh_steps == 2
    handle = _poison(model, where)
    model.zero_grad(set_to_none=True)
    with pytest.warns(UserWarning, match="skipping"):
        assert finiteness_check(method, model_losses(model, batch)) is None
    handle.remove()
    assert all(p.grad is None for p in model.parameters())  # .grad untouched
    assert method._refresh_steps == 2  # the skipped step does not count
    raising = W.MGDA(model.shared, 3, refresh_every=4)
    _step(raising, model, batch)
    handle = _poison(model, where)
    with pytest.raises(ValueError, match="non-finite"):
        finiteness_check(raising, model_losses(model, batch))
    handle.remove()


def test_grad_scaler_overflow_between_refreshes_is_not_counted():
    model = SharedTrunkNet(seed=0)
    batch = make_batch(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    method = W.UPGrad(model.shared, 3, refresh_every=3)
    exact = W.UPGrad(model.shared, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    c = _step(method, model, batch, grad_scaler=scaler)
    torch.testing.assert_close(c, _step(exact, model, batch))
    _step(method, model, batch, grad_scaler=scaler)
    # the update unscales to sum_i c_i g_i (heads unweighted)
    expected = _oracle(model, batch, c.double())
    for g, e in zip(_grads(model), expected):
        torch.testing.assert_close(g.double() / 8.0, e, rtol=1e-10, atol=1e-12)
    handle = _poison(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step(method, model, batch, grad_scaler=scaler)
    handle.remove()
    assert not all(p.grad.isfinite().all() for p in model.shared)  # the scaler sees it
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 4.0  # skipped
    assert method._refresh_steps == 2  # not counted: the next step still reuses c
    assert torch.equal(_step(method, model, batch, grad_scaler=scaler), c)
    assert method._refresh_steps == 3
    refreshed = _step(method, model, batch, grad_scaler=scaler)  # the 4th counted step: a refresh
    assert method._refresh_steps == 4
    torch.testing.assert_close(refreshed, _step(exact, model, batch))


def test_retain_graph_between_refreshes(between_refreshes):
    model = SharedTrunkNet(seed=0)
    method = W.IMTLG(model.shared, 3, refresh_every=2)
    batch = make_batch(0)
    _step(method, model, batch)
    model.zero_grad(set_to_none=True)
    losses = model_losses(model, batch)
    method.backward(losses, retain_graph=True)
    first = _grads(model)
    method._refresh_steps -= 1  # the same reuse step again, on the retained graph
    model.zero_grad(set_to_none=True)
    method.backward(losses)
    for a, b in zip(first, _grads(model)):
        assert torch.equal(a, b)
