"""Mixed precision: autocast models and torch.amp.GradScaler with the weightings.

The pattern (README): run the model under autocast, pass the unscaled losses and the scaler to
``weighting.backward(losses, grad_scaler=scaler)``, then ``scaler.step(optimizer)`` and
``scaler.update()``. The gradients are computed from scaled losses; the coefficients from the
unscaled Gramian and losses, so after unscaling the update is the method's, scale-invariant
methods included; an overflow makes .grad non-finite so the scaler skips the step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fusedmtl import weighting

METHODS = {
    "grad_normalization": lambda p: weighting.GradNormalization(p, 2),
    "grad_normalization_rescaled": lambda p: weighting.GradNormalization(p, 2, rescale=True),
    "gradnorm": lambda p: weighting.GradNorm(p, 2, last_shared_layer=p[-2:]),
    "mgda": lambda p: weighting.MGDA(p, 2),
    "uncertainty": lambda p: weighting.Uncertainty(2),
    "realtime": lambda p: weighting.RealTime(2),
}


def _model():
    torch.manual_seed(0)
    return nn.ModuleDict({
        "trunk": nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16)),
        "a": nn.Linear(16, 1),
        "b": nn.Linear(16, 3),
    })


def _losses(model, scale_a: float = 1.0):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = model["trunk"](x)
        a, b = model["a"](z), model["b"](z)
    return [
        scale_a * nn.functional.mse_loss(a.float(), x[:, :1]),
        nn.functional.cross_entropy(b.float(), (x[:, 1] > 0).long() + (x[:, 2] > 0).long()),
    ]


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", list(METHODS))
def test_scaled_step_equals_unscaled_step(method):
    """With a power-of-two scale, scaling and unscaling are exact: after unscale_ the .grad of
    every parameter matches the step taken without a scaler."""
    plain_model, scaled_model = _model(), _model()
    plain = METHODS[method](list(plain_model["trunk"].parameters()))
    scaled = METHODS[method](list(scaled_model["trunk"].parameters()))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    optimizer = torch.optim.SGD(scaled_model.parameters(), lr=0.0)
    plain.backward(_losses(plain_model))
    scaled.backward(_losses(scaled_model), grad_scaler=scaler)
    scaler.unscale_(optimizer)
    expected, got = _grads(plain_model), _grads(scaled_model)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("method", ["grad_normalization", "mgda", "gradnorm"])
def test_overflow_skips_the_step_and_keeps_method_state(method):
    model = _model()
    method_module = METHODS[method](list(model["trunk"].parameters()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**126)  # scaled gradients overflow fp32
    before_params = copy.deepcopy(model.state_dict())
    before_state = copy.deepcopy(method_module.state_dict())
    method_module.backward(_losses(model, scale_a=1e10), grad_scaler=scaler)
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() < 2.0**126, "the scaler saw no overflow"
    for name, value in model.state_dict().items():
        assert torch.equal(value, before_params[name]), name
    for name, value in method_module.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, before_state[name], rtol=0, atol=0, equal_nan=True, msg=name)


def test_scale_invariant_method_ignores_the_loss_scale():
    """GradNormalization's update does not depend on the scale a scaler applies: two scalers
    with different scales give the same unscaled .grad."""
    results = []
    for scale in (2.0**4, 2.0**16):
        model = _model()
        method = weighting.GradNormalization(list(model["trunk"].parameters()), 2)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        method.backward(_losses(model), grad_scaler=scaler)
        scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.0))
        results.append(_grads(model))
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-5, atol=1e-7, msg=name)
