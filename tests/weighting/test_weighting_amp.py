"""Mixed precision: autocast models and torch.amp.GradScaler with every registered weighting, on
each device of the ``device`` fixture (bfloat16 autocast on the CPU, float16 on CUDA).

The pattern (README): run the model under autocast, pass the unscaled losses and the scaler to
``weighting.backward(losses, grad_scaler=scaler)``, then ``scaler.step(optimizer)`` and
``scaler.update()``. The gradients are computed from scaled losses; the coefficients from the
unscaled Gramian and losses, so after unscaling the update is the method's, scale-invariant
methods included; an overflow makes .grad non-finite, the scaler skips the step and the method's
state stays as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from weighting_cases import METHOD_NAMES, SharedTrunkNet, build, is_gradient_based, snapshot

from fusedmtl import weighting as W

TASKS = 2
AUTOCAST_DTYPE = {"cpu": torch.bfloat16, "cuda": torch.float16}


def _model(device):
    return SharedTrunkNet(
        seed=0, dtype=torch.float32, in_dim=8, hidden=32, feat=16, out_dims=(1, 3)
    ).to(device)


def _losses(model, device, features: bool = False):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 8, generator=g).to(device)
    with torch.autocast(device, dtype=AUTOCAST_DTYPE[device]):
        z, (a, b) = model(x)
    losses = [
        nn.functional.mse_loss(a.float(), x[:, :1]),
        nn.functional.cross_entropy(b.float(), (x[:, 1] > 0).long() + (x[:, 2] > 0).long()),
    ]
    return (losses, z) if features else losses


def _method(name, model):
    return build(name, model, TASKS)


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_scaled_step_equals_unscaled_step(name, device):
    """With a power-of-two scale, scaling and unscaling are exact: after unscale_ the .grad of
    every parameter matches the step taken without a scaler, for a few steps."""
    plain_model, scaled_model = _model(device), _model(device)
    plain, scaled = _method(name, plain_model), _method(name, scaled_model)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**12)
    optimizer = torch.optim.SGD(scaled_model.parameters(), lr=0.01)
    plain_optimizer = torch.optim.SGD(plain_model.parameters(), lr=0.01)
    for _ in range(3):
        plain.backward(_losses(plain_model, device))
        scaled.backward(_losses(scaled_model, device), grad_scaler=scaler)
        scaler.unscale_(optimizer)
        expected, got = _grads(plain_model), _grads(scaled_model)
        assert expected.keys() == got.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-7, msg=key)
        scaler.step(optimizer)
        scaler.update()
        plain_optimizer.step()
        for opt in (optimizer, plain_optimizer):
            opt.zero_grad()


@pytest.mark.parametrize(
    "name",
    [n for n in METHOD_NAMES if is_gradient_based(n) and W.GRADIENT_BASED[n].representation_mode],
)
def test_representation_mode_under_autocast_and_scaler(name, device):
    if name == "db_mtl":
        kwargs = {"beta": 0.0}  # (running averages need the parameter mode)
    else:
        kwargs = {}
    plain_model, scaled_model = _model(device), _model(device)
    plain, scaled = (
        build(name, plain_model, TASKS, **kwargs),
        build(name, scaled_model, TASKS, **kwargs),
    )
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    losses, z = _losses(plain_model, device, features=True)
    plain.backward(losses, features=z)
    losses, z = _losses(scaled_model, device, features=True)
    scaled.backward(losses, features=z, grad_scaler=scaler)
    scaler.unscale_(torch.optim.SGD(scaled_model.parameters(), lr=0.0))
    expected, got = _grads(plain_model), _grads(scaled_model)
    assert expected.keys() == got.keys() == {n for n, _ in plain_model.named_parameters()}
    for key in expected:
        assert bool(got[key].isfinite().all()), key
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_overflow_skips_the_step_and_keeps_method_state(name, device):
    model = _model(device)
    method = _method(name, model)
    optimizer = torch.optim.SGD(list(model.parameters()) + list(method.parameters()), lr=0.1)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    method.backward(_losses(model, device), grad_scaler=scaler)  # a good step first: state exists
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    twin = copy.deepcopy(method)
    if is_gradient_based(name):
        twin._shared = method._shared  # (a deepcopy copies the model's parameters too)
    before_params = copy.deepcopy(model.state_dict())
    before_state = snapshot(method)
    scale = scaler.get_scale()
    overflow = model.trunk[0].weight.register_hook(lambda g: g * float("inf"))  # issue 19's repro
    method.backward(_losses(model, device), grad_scaler=scaler)
    overflow.remove()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() < scale, "the scaler saw no overflow"
    for key, value in model.state_dict().items():
        assert torch.equal(value, before_params[key]), key
    assert snapshot(method) == before_state
    # and the next step is the one the method would have taken without the overflow
    optimizer.zero_grad()
    weights = method.backward(_losses(model, device), grad_scaler=scaler)
    assert torch.equal(weights, twin.backward(_losses(model, device), grad_scaler=scaler))


def test_scale_invariant_method_ignores_the_loss_scale(device):
    """GradNormalization's update does not depend on the scale a scaler applies: two scalers
    with different scales give the same unscaled .grad."""
    results = []
    for scale in (2.0**4, 2.0**16):
        model = _model(device)
        method = W.GradNormalization(list(model.trunk.parameters()), TASKS)
        scaler = torch.amp.GradScaler(device, init_scale=scale)
        method.backward(_losses(model, device), grad_scaler=scaler)
        scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.0))
        results.append(_grads(model))
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], rtol=1e-5, atol=1e-7, msg=key)


def test_db_mtl_recovers_after_one_overflow():
    """Issue 19, point 1: one overflow step used to leave DB-MTL's running averages non-finite
    for good (every later step skipped by the scaler)."""
    trunk, heads = nn.Linear(4, 8), [nn.Linear(8, 1) for _ in range(2)]
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    losses = lambda: [nn.functional.mse_loss(h(trunk(x)), y) for h in heads]  # noqa: E731
    method = W.DBMTL(trunk.parameters(), 2)
    opt = torch.optim.SGD(
        [*trunk.parameters(), *(p for h in heads for p in h.parameters())], lr=0.1
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    hook = trunk.weight.register_hook(lambda g: g * float("inf"))
    method.backward(losses(), grad_scaler=scaler)
    hook.remove()
    scaler.step(opt)
    scaler.update()
    assert int(method.steps_done) == 0
    opt.zero_grad()
    method.backward(losses(), grad_scaler=scaler)
    assert bool(method.grad_ema_0_0.isfinite().all()) and int(method.steps_done) == 1
    assert all(bool(p.grad.isfinite().all()) for p in trunk.parameters())
