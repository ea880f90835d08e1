"""The registries (fusedmtl.weighting.LOSS_BASED, GRADIENT_BASED) are complete, every method builds
through its ``example``, and the shared tests run every registered method: adding a method is its
module, one registry line and, where it has a closed form or a peer, one test of its own."""

from __future__ import annotations

import inspect

import pytest
import test_weighting_amp
import test_weighting_contracts
import test_weighting_e2e
import test_weighting_state
import torch
from weighting_cases import METHOD_NAMES, K, SharedTrunkNet, build, is_gradient_based, model_losses

from fusedmtl import weighting as W

# Shared tests that leave a method out on purpose, and why.
EXCLUDED = {
    # random projection orders; PCD's first task is its primary one
    "test_permuting_the_tasks_permutes_the_coefficients": {"pcgrad", "gradvac", "pcd"},
    # GradNorm: state of its layer W; ExcessMTL: excess risks from the gradients element-wise
    "test_coefficients_alone_without_shared_params_or_tasks": {"gradnorm", "excess_mtl"},
    # no representation mode: state per shared parameter (ExcessMTL, MoCo)
    "test_representation_mode_under_autocast_and_scaler": {
        n for n, cls in W.GRADIENT_BASED.items() if not cls.representation_mode
    },
    # PBI's default ray raises losses far below the others, MoCo's default weight step is slow for
    # losses orders apart (their e2e variants train every task)
    "test_every_task_loss_decreases": {"pbi", "moco"},
}


def test_every_public_method_is_registered_once_in_its_family():
    classes = {
        obj for obj in vars(W).values() if inspect.isclass(obj) and issubclass(obj, W.Weighting)
    }
    methods = {c for c in classes if c not in (W.Weighting, W.LossWeighting, W.GradientWeighting)}
    assert methods == set(W.LOSS_BASED.values()) | set(W.GRADIENT_BASED.values())
    assert all(issubclass(c, W.LossWeighting) for c in W.LOSS_BASED.values())
    assert all(issubclass(c, W.GradientWeighting) for c in W.GRADIENT_BASED.values())
    assert len(set(W.LOSS_BASED.values())) == len(W.LOSS_BASED)
    assert len(set(W.GRADIENT_BASED.values())) == len(W.GRADIENT_BASED)
    assert not set(W.LOSS_BASED) & set(W.GRADIENT_BASED)


def _family(names) -> str | None:
    names = set(names)
    if names >= set(W.GRADIENT_BASED) - set().union(*EXCLUDED.values()) and not names & set(
        W.LOSS_BASED
    ):
        return "gradient"
    if names >= set(W.LOSS_BASED) and not names & set(W.GRADIENT_BASED):
        return "loss"
    if names >= set(METHOD_NAMES) - set().union(*EXCLUDED.values()):
        return "all"
    return None


def _method_parametrizations(module):
    """(test name, the method names it is parametrized over) for every test of ``module``
    parametrized over 'name' or 'method'."""
    for test_name, func in vars(module).items():
        if not test_name.startswith("test_"):
            continue
        for mark in getattr(func, "pytestmark", []):
            if mark.name == "parametrize" and mark.args[0] in ("name", "method"):
                values = [v.values[0] if hasattr(v, "values") else v for v in mark.args[1]]
                yield test_name, [v for v in values if v in METHOD_NAMES]


@pytest.mark.parametrize(
    "module",
    [test_weighting_contracts, test_weighting_state, test_weighting_amp, test_weighting_e2e],
    ids=lambda m: m.__name__,
)
def test_shared_tests_run_every_registered_method(module):
    """Every test parametrized over methods runs a whole family (all loss-based, all
    gradient-based, or all), less the exclusions above: no hand-kept list of a few methods."""
    found = list(_method_parametrizations(module))
    assert found, f"{module.__name__} has no test parametrized over the methods"
    for test_name, names in found:
        expected = set(names) | EXCLUDED.get(test_name, set())
        assert _family(expected) is not None, f"{test_name} runs only {sorted(names)}"
        assert not set(names) & EXCLUDED.get(test_name, set())


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_example_builds_a_method_ready_to_step(name, batch):
    model = SharedTrunkNet(seed=1)
    weighting = build(name, model, ["a", "b", "c"])
    assert isinstance(weighting, W.LOSS_BASED.get(name) or W.GRADIENT_BASED[name])
    assert weighting.task_names == ["a", "b", "c"]
    weights = weighting.backward(model_losses(model, batch))
    assert weights.shape == (K,) and bool(weights.isfinite().all())
    assert all(
        p.grad is not None and bool(p.grad.isfinite().all()) for p in model.trunk.parameters()
    )
    assert build(name, model, 2).num_tasks == 2
    assert (
        build(name, model, on_nonfinite="skip").on_nonfinite == "skip"
    )  # overrides reach the constructor


@pytest.mark.parametrize("name", [n for n in METHOD_NAMES if is_gradient_based(n)])
def test_gradient_based_example_needs_shared_params(name):
    with pytest.raises(ValueError, match="shared_params"):
        W.GRADIENT_BASED[name].example(K)


@pytest.mark.parametrize(
    "name", [n for n, cls in W.GRADIENT_BASED.items() if not cls.representation_mode]
)
def test_features_raise_without_a_representation_mode(name, batch):
    model = SharedTrunkNet(seed=1)
    weighting = build(name, model, K)
    losses, z = model_losses(model, batch, features=True)
    with pytest.raises(ValueError, match="no representation mode"):
        weighting.backward(losses, features=z)
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated


def test_example_settings_are_the_documented_ones():
    model = SharedTrunkNet()
    assert W.PriorLoss.example(3).priors.tolist() == [1.0, 2.0, 3.0]
    gradnorm = W.GradNorm.example(K, model.shared)
    assert [model.shared[i] for i in gradnorm._layer_columns] == list(model.trunk[2].parameters())
    assert W.DWA.example(K).period_steps == 2
    first, second = W.RLW.example(K), W.RLW.example(K)  # seeded: the same draws
    values = [torch.tensor(float(v), requires_grad=True) for v in (1.0, 2.0, 3.0)]
    assert torch.equal(first(values), second(values))
