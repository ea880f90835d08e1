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
STATEFUL = {
    "initial_loss",
    "dwa",
    "rlw",
    "uncertainty",
    "famo",
    "gradnorm",
    "pcgrad",
    "db_mtl",
    "stch",
    "imtl_l",
    "gradvac",
    "modo",
    "sdmgrad",
    "crmogm",
    "pcd",
    "excess_mtl",
    "moco",
}


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
        return build(self.name, model, **self.settings), {
            "model": model,
            "opt": torch.optim.SGD(model.parameters(), lr=0.02),
        }

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
        fresh_ctx["model"].load_state_dict(
            torch.load(io.BytesIO(buf.getvalue()), weights_only=True)["model"]
        )
    unrestored = [run.step(fresh, fresh_ctx, t) for t in range(before, before + after)]
    assert any(not torch.equal(a, b) for a, b in zip(continued, unrestored)) == stateful


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_state_dict_round_trip_resumes_bit_for_bit(name):
    _check_round_trip(_run(name), stateful=name in STATEFUL)


@pytest.mark.parametrize(
    "name, settings",
    [("initial_loss", {"steps": 5}), ("nash_mtl", {"update_every": 4})],
    ids=["initial_loss-mid-warmup", "nash_mtl-reused-solution"],
)
def test_state_dict_round_trip_with_state_of_other_settings(name, settings):
    _check_round_trip(_run(name, **settings), stateful=True)


# -- the tasks in the state (issue 19, point 4) -------------------------------------------------


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_state_of_other_tasks_is_refused_before_anything_loads(name):
    model = SharedTrunkNet()
    source = build(name, model, 2)
    target = build(name, model, 5)
    before = {k: v.clone() for k, v in target.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match="2 tasks"):
        target.load_state_dict(source.state_dict())
    for key, value in target.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, before[key]) or bool(value.isnan().all()), key
    with pytest.raises(ValueError, match=r"\['a', 'b'\]"):
        build(name, model, ["b", "a"]).load_state_dict(build(name, model, ["a", "b"]).state_dict())


def test_uncertainty_refuses_swapped_task_names_and_unnamed_tasks_adopt_the_names():
    from fusedmtl import weighting as W

    saved = W.Uncertainty(["a", "b"], init=0.0)
    with torch.no_grad():
        saved.log_vars.copy_(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="tasks"):
        W.Uncertainty(["b", "a"]).load_state_dict(saved.state_dict())
    unnamed = W.Uncertainty(2)
    unnamed.load_state_dict(torch.load(_saved(saved), weights_only=True))
    assert unnamed.task_names == ["a", "b"] and unnamed.log_vars.tolist() == [1.0, 2.0]


def _saved(module) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    return buf


# -- optimizer state of FAMO and GradNorm (issue 19, point 9) -----------------------------------


def _adam_state(method):
    return method._optimizer.state_dict()["state"][0]


@pytest.mark.parametrize("with_optimizer", ["famo", "gradnorm"])
def test_loaded_optimizer_state_is_a_copy_and_survives_dtype_moves(with_optimizer):
    run = _run(with_optimizer)
    a, ctx = run.build()
    for t in range(3):
        run.step(a, ctx, t)
    b, b_ctx = run.build()
    b.load_state_dict(a.state_dict())
    steps = float(_adam_state(a)["step"])
    run.step(a, ctx, 3)  # a steps on: b's state must not move with it
    run.step(b, b_ctx, 3)
    assert float(_adam_state(a)["step"]) == float(_adam_state(b)["step"]) == steps + 1
    steps = float(_adam_state(a)["step"])
    a.double()
    run.step(a, ctx, 4)
    state = _adam_state(a)
    assert float(state["step"]) == steps + 1
    assert state["exp_avg"].dtype == torch.float64


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_buffer_optimizer_runs_the_fused_adam_kernel_as_adam_step_would(weight_decay, monkeypatch):
    """The default weight optimizer (a fused torch.optim.Adam) steps through torch's kernel
    directly after its first step: bitwise the update and state Adam.step gives (an Adam subclass
    takes Adam.step itself), also after its options change, and Adam.step is not called again."""
    from fusedmtl.weighting.state import BufferOptimizer, adam

    class Owner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("logits", torch.zeros(5))

    class SubclassedAdam(torch.optim.Adam):  # (not the fast path: the reference)
        pass

    calls = []
    original = torch.optim.Adam.step
    monkeypatch.setattr(
        torch.optim.Adam, "step", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    fast, slow = Owner(), Owner()
    fast_optimizer = BufferOptimizer(fast, "logits", adam(lr=0.025, weight_decay=weight_decay))
    slow_optimizer = BufferOptimizer(
        slow,
        "logits",
        lambda params: SubclassedAdam(params, lr=0.025, weight_decay=weight_decay, fused=True),
    )
    generator = torch.Generator().manual_seed(0)
    for step in range(6):
        if step == 4:  # a scheduler's change of the options reaches the kernel's cached arguments
            for holder in (fast_optimizer, slow_optimizer):
                holder._optimizer.param_groups[0].update(lr=0.01, betas=(0.8, 0.99))
        grad = torch.randn(5, generator=generator, dtype=torch.float64)  # (cast like a method's)
        fast_optimizer.step(grad)
        slow_optimizer.step(grad)
        assert torch.equal(fast.logits, slow.logits)
        assert fast.logits.grad is None
    assert len(calls) == 1 + 6  # the fast one's first step only, the reference's every step
    fast_state = fast_optimizer.state_dict()["state"][0]
    slow_state = slow_optimizer.state_dict()["state"][0]
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(fast_state[key], slow_state[key]), key
