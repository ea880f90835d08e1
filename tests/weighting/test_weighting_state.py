"""Method state: state_dict round trips resume every registered method bit for bit (through
torch.save / torch.load(weights_only=True)); a fresh module shows which methods have state.
"""

from __future__ import annotations

import io

import pytest
import torch
from weighting_cases import (
    METHOD_NAMES,
    SharedTrunkNet,
    build,
    is_gradient_based,
    leaf_losses,
    loss_sequence,
    make_batch,
    model_losses,
)

# The methods whose weights depend on past steps (with their example settings, or the ones given).
STATEFUL = {"initial_loss", "dwa", "rlw", "uncertainty", "famo", "gradnorm", "pcgrad", "db_mtl"}


class LossRun:
    """A loss-based weighting fed a fixed sequence of losses (trained, if it has parameters)."""

    def __init__(self, name, **settings):
        self.name, self.settings = name, settings

    def build(self):
        weighting = build(self.name, **self.settings)
        params = list(weighting.parameters())
        return weighting, {"opt": torch.optim.SGD(params, lr=0.1) if params else None}

    def step(self, weighting, ctx, t):
        if ctx["opt"] is not None:
            ctx["opt"].zero_grad()
        weighting.backward(leaf_losses(loss_sequence(40, seed=3)[t]))
        if ctx["opt"] is not None:
            ctx["opt"].step()
        return weighting.last_weights.clone()

    def save(self, weighting, ctx):
        return {"weighting": weighting.state_dict()}

    def load(self, state):
        weighting, ctx = self.build()
        weighting.load_state_dict(state["weighting"])
        return weighting, ctx


class GradientRun:
    """A gradient-based method training the shared-trunk model with SGD."""

    def __init__(self, name, **settings):
        self.name, self.settings = name, settings

    def build(self, seed=12):
        model = SharedTrunkNet(seed=seed)
        return build(self.name, model, **self.settings), {"model": model, "opt": torch.optim.SGD(model.parameters(), lr=0.02)}

    def step(self, weighting, ctx, t):
        coeffs = weighting.backward(model_losses(ctx["model"], make_batch(t)))
        ctx["opt"].step()
        ctx["opt"].zero_grad()
        return coeffs.clone()

    def save(self, weighting, ctx):
        return {"weighting": weighting.state_dict(), "model": ctx["model"].state_dict()}

    def load(self, state):
        weighting, ctx = self.build(seed=99)
        ctx["model"].load_state_dict(state["model"])
        weighting.load_state_dict(state["weighting"])
        return weighting, ctx


def _run(name, **settings):
    return (GradientRun if is_gradient_based(name) else LossRun)(name, **settings)


def _check_round_trip(run, stateful: bool) -> None:
    before, after = 3, 6
    weighting, ctx = run.build()
    for t in range(before):
        run.step(weighting, ctx, t)
    buf = io.BytesIO()
    torch.save(run.save(weighting, ctx), buf)
    continued = [run.step(weighting, ctx, t) for t in range(before, before + after)]
    buf.seek(0)
    resumed, resumed_ctx = run.load(torch.load(buf, weights_only=True))
    replayed = [run.step(resumed, resumed_ctx, t) for t in range(before, before + after)]
    for t, (a, b) in enumerate(zip(continued, replayed)):
        assert torch.equal(a, b), f"step {before + t}: {a.tolist()} != {b.tolist()}"
    # the check has teeth: a fresh module without the state gives other weights, for the methods
    # that have state; the others are shown stateless
    fresh, fresh_ctx = run.build()
    if isinstance(run, GradientRun):
        fresh_ctx["model"].load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True)["model"])
    unrestored = [run.step(fresh, fresh_ctx, t) for t in range(before, before + after)]
    assert any(not torch.equal(a, b) for a, b in zip(continued, unrestored)) == stateful


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_state_dict_round_trip_resumes_bit_for_bit(name):
    _check_round_trip(_run(name), stateful=name in STATEFUL)


@pytest.mark.parametrize("name, settings", [("initial_loss", {"steps": 5}), ("nash_mtl", {"update_every": 4})],
                         ids=["initial_loss-mid-warmup", "nash_mtl-reused-solution"])
def test_state_dict_round_trip_with_state_of_other_settings(name, settings):
    _check_round_trip(_run(name, **settings), stateful=True)
