"""End to end: every fusedmtl.weighting method trains a small shared trunk with three heads on a
generated problem with a known ground truth (two regressions four orders of magnitude apart in
loss, one 4-class classification), and every task loss goes down.

The check: the mean of each task's loss over the last STEPS_AVG steps is below DECREASE times its
mean over the first STEPS_AVG steps (full batch, Adam, fixed seeds, so the run is deterministic).
Every registered method runs with its ``example`` settings, and VARIANTS with others.
GeneralizedMean with gamma < 0 is left out: it leans towards the smallest loss by design, and the
other tasks may legitimately get worse; PBI runs with a preference along the initial losses and
MoCo with a larger weight step.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from weighting_cases import METHOD_NAMES, SharedTrunkNet

from fusedmtl import weighting as W

N, IN, HIDDEN, FEAT, CLASSES = 256, 5, 32, 16, 4
STEPS, STEPS_AVG, DECREASE, LR = 100, 5, 0.9, 0.02
NAMES = ["sine", "linear_big", "classes"]


def make_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, IN, generator=gen)
    a, b = torch.randn(IN, 1, generator=gen), torch.randn(IN, 1, generator=gen)
    C = torch.randn(IN, CLASSES, generator=gen)
    y0 = torch.sin(x @ a)
    y1 = 100.0 * (x @ b) + 5.0 * torch.randn(N, 1, generator=gen)
    y2 = (x @ C).argmax(1)
    return x, (y0, y1, y2)


def make_net():
    return SharedTrunkNet(
        seed=0, dtype=torch.float32, in_dim=IN, hidden=HIDDEN, feat=FEAT, out_dims=(1, 1, CLASSES)
    )


def task_losses(outputs, targets):
    (o0, o1, o2), (y0, y1, y2) = outputs, targets
    return [F.mse_loss(o0, y0), F.mse_loss(o1, y1), F.cross_entropy(o2, y2)]


_, (_Y0, _Y1, _Y2) = make_problem()
PRIORS = [W.prior_loss_l2(_Y0), W.prior_loss_l2(_Y1), W.prior_loss_classification(_Y2, CLASSES)]
INITIAL = [W.initial_loss_l2(_Y0), W.initial_loss_l2(_Y1), W.initial_loss_cross_entropy(CLASSES)]


# Settings beyond the examples that take other code paths: name -> (registered method, settings).
VARIANTS = {
    "fixed-given": ("fixed", {"weights": [1.0, 1e-4, 1.0]}),
    "initial_loss-given": ("initial_loss", {"initial": INITIAL}),
    "initial_loss-first-steps": ("initial_loss", {"steps": 3}),
    "prior_loss-from-labels": ("prior_loss", {"priors": PRIORS}),
    "generalized_mean-0.5": ("generalized_mean", {"gamma": 0.5}),
    "uncertainty-kinds": ("uncertainty", {"kinds": ["regression", "regression", "classification"]}),
    "grad_normalization-rescale-batched": (
        "grad_normalization",
        {"rescale": True, "grad_mode": "batched"},
    ),
    "mgda-none": ("mgda", {"normalization": "none"}),
    "mgda-loss": ("mgda", {"normalization": "loss"}),
    "mgda-loss+": ("mgda", {"normalization": "loss+"}),
    # PBI along the initial losses' direction: each loss's share of the total is kept
    "pbi-initial-direction": ("pbi", {"preference": INITIAL}),
    # MoCo with a larger weight step: its tracked gradients are the unit gradients times the
    # losses, four orders apart here, and lambda must move fast to leave the small tasks room
    "moco-gamma-1": ("moco", {"gamma": 1.0}),
}
# Representation mode (features=z): name -> registered method.
REPRESENTATION = {"mgda-ub-l2": "mgda", "grad_normalization-features": "grad_normalization"}


def build(method, net):
    name, settings = VARIANTS.get(method, (REPRESENTATION.get(method, method), {}))
    return W.GRADIENT_BASED.get(name, W.LOSS_BASED.get(name)).example(
        NAMES, net.trunk.parameters(), **settings
    )


def train(method):
    x, targets = make_problem()
    net = make_net()
    weighting = build(method, net)
    optimizer = torch.optim.Adam(list(net.parameters()) + list(weighting.parameters()), lr=LR)
    history = []
    for _ in range(STEPS):
        z, outputs = net(x)
        losses = task_losses(outputs, targets)
        history.append([float(loss.detach()) for loss in losses])
        named = dict(zip(NAMES, losses))
        if method in REPRESENTATION:
            weighting.backward(named, features=z)
        else:
            weighting.backward(named)
        optimizer.step()
        optimizer.zero_grad()
    return torch.tensor(history, dtype=torch.float64), weighting


def _check_every_task_loss_decreases(method):
    history, weighting = train(method)
    assert bool(history.isfinite().all())
    first, last = history[:STEPS_AVG].mean(0), history[-STEPS_AVG:].mean(0)
    ratios = (last / first).tolist()
    # Alternating trains each task on 1/K of the steps: the decrease asked of it is 1/K as large.
    limit = 1 - (1 - DECREASE) / len(NAMES) if method == "alternating" else DECREASE
    assert all(r < limit for r in ratios), dict(zip(NAMES, ratios))
    log = weighting.log()
    assert {f"weight/{n}" for n in NAMES} <= set(log)
    assert all(torch.isfinite(torch.tensor(v)) for v in log.values())


# PBI with its default preference (ones) pulls the losses onto the diagonal ray: with losses four
# orders of magnitude apart it raises the small ones, by design; MoCo's default weight step is too
# slow for such losses in 100 steps (the small tasks fall short of the decrease asked: 0.90, 0.97).
# Their variants above train every task.
@pytest.mark.parametrize("method", [m for m in METHOD_NAMES if m not in ("pbi", "moco")])
def test_every_task_loss_decreases(method):
    _check_every_task_loss_decreases(method)


@pytest.mark.parametrize("variant", list(VARIANTS) + list(REPRESENTATION))
def test_every_task_loss_decreases_with_other_settings(variant):
    _check_every_task_loss_decreases(variant)


def test_training_is_deterministic():
    a, _ = train("gradnorm")
    b, _ = train("gradnorm")
    assert torch.equal(a, b)
