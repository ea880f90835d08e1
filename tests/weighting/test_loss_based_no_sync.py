"""Loss-based steps read no tensor on the host (issue 16's 'loss-based weighting for free', issue
19's GradScaler restore): every registered loss-based method's backward, with and without a
GradScaler, runs with Tensor.item / __bool__ / tolist / __int__ / __float__ raising (a read of a
CUDA tensor there would be a device sync); the restore after an overflow is done on the device
(buffers) or at the next step (host state), and leaves the state as before the step."""

from __future__ import annotations

import copy

import pytest
import torch
from weighting_cases import SharedTrunkNet, make_batch, model_losses, snapshot

from fusedmtl import weighting as W

METHODS = sorted(W.LOSS_BASED)
READS = ("item", "__bool__", "tolist", "__int__", "__float__")


class HostRead(AssertionError):
    pass


def _allowed(method) -> set[int]:
    """CPU tensors torch reads by design: FAMO's Adam step counts (kept on the CPU by torch for
    CUDA parameters too, so their reads are no device sync)."""
    holder = getattr(method, "_optimizer", None)
    optimizer = getattr(holder, "_optimizer", None)
    if optimizer is None:
        return set()
    return {id(s["step"]) for s in optimizer.state.values() if "step" in s}


def _forbid_reads(monkeypatch, allowed: set[int]) -> None:
    for name in READS:
        original = getattr(torch.Tensor, name)

        def guarded(self, *args, _original=original, _name=name, **kwargs):
            if id(self) not in allowed:
                raise HostRead(f"Tensor.{_name} during a step")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, guarded)


def _build(name):
    return W.LOSS_BASED[name].example(3, on_nonfinite="ignore")


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "grad_scaler"])
@pytest.mark.parametrize("name", METHODS)
def test_a_step_reads_no_tensor_on_the_host(name, scaled, monkeypatch):
    model, batch = SharedTrunkNet(seed=0), make_batch(0)
    method = _build(name)
    twin = copy.deepcopy(method)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0) if scaled else None
    for _ in range(3):  # past first-step branches (FAMO's first step, DWA's periods)
        model.zero_grad(set_to_none=True)
        method.backward(model_losses(model, batch), grad_scaler=scaler)
        twin.backward(model_losses(model, batch), grad_scaler=scaler)
        method._resolve_pending_restore()  # (the step boundary: see LossWeighting.backward)
        twin._resolve_pending_restore()
    model.zero_grad(set_to_none=True)
    losses = model_losses(model, batch)
    with monkeypatch.context() as patch:
        _forbid_reads(patch, _allowed(method))
        weights = method.backward(losses, grad_scaler=scaler)
    grads = [p.grad.clone() for p in model.parameters()]
    # the guarded step is the step: the same weights and gradients as an unguarded twin
    model.zero_grad(set_to_none=True)
    assert torch.equal(weights, twin.backward(model_losses(model, batch), grad_scaler=scaler))
    for g, p in zip(grads, model.parameters()):
        assert torch.equal(g, p.grad)
    assert snapshot(method) == snapshot(twin)


@pytest.mark.parametrize("name", [n for n in METHODS if W.LOSS_BASED[n].has_step_state])
def test_overflow_restore_reads_nothing_and_keeps_the_state(name, monkeypatch):
    model, batch = SharedTrunkNet(seed=0), make_batch(0)
    method = _build(name)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        method.backward(model_losses(model, batch), grad_scaler=scaler)
    before = snapshot(method)
    model.zero_grad(set_to_none=True)
    losses = model_losses(model, batch)
    hook = model.trunk[0].weight.register_hook(lambda g: g * float("inf"))
    with monkeypatch.context() as patch:
        _forbid_reads(patch, _allowed(method))
        method.backward(losses, grad_scaler=scaler)
    hook.remove()
    assert not model.trunk[0].weight.grad.isfinite().all()
    assert snapshot(method) == before  # (state_dict puts the host state back first)
    # and a good step after the overflow counts as usual: the state moves
    model.zero_grad(set_to_none=True)
    method.backward(model_losses(model, batch), grad_scaler=scaler)
    if name not in ("initial_loss",):  # (its initial losses are frozen after the first step)
        assert snapshot(method) != before
