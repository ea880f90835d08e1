"""End to end: every fusedmtl.weighting method trains a small shared trunk with three heads on a
generated problem with a known ground truth (two regressions four orders of magnitude apart in
loss, one 4-class classification), and every task loss goes down.

The check: the mean of each task's loss over the last STEPS_AVG steps is below DECREASE times its
mean over the first STEPS_AVG steps (full batch, Adam, fixed seeds, so the run is deterministic).
GeneralizedMean with gamma < 0 is left out: it leans towards the smallest loss by design, and the
other tasks may legitimately get worse.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

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


class Net(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, FEAT))
        self.heads = nn.ModuleList([nn.Linear(FEAT, 1), nn.Linear(FEAT, 1), nn.Linear(FEAT, CLASSES)])

    def forward(self, x):
        z = self.trunk(x)
        return z, [head(z) for head in self.heads]


def task_losses(outputs, targets):
    (o0, o1, o2), (y0, y1, y2) = outputs, targets
    return [F.mse_loss(o0, y0), F.mse_loss(o1, y1), F.cross_entropy(o2, y2)]


_, (_Y0, _Y1, _Y2) = make_problem()
PRIORS = [W.prior_loss_l2(_Y0), W.prior_loss_l2(_Y1), W.prior_loss_classification(_Y2, CLASSES)]
INITIAL = [W.initial_loss_l2(_Y0), W.initial_loss_l2(_Y1), W.initial_loss_cross_entropy(CLASSES)]


def _mgda(**kw):
    from fusedmtl.weighting.methods.mgda import MGDA  # needs fusedmtl.weighting.solvers

    return lambda net: MGDA(net.trunk.parameters(), NAMES, **kw)


LOSS_BASED = {
    "fixed": lambda net: W.Fixed(NAMES),
    "fixed-given": lambda net: W.Fixed(NAMES, weights=[1.0, 1e-4, 1.0]),
    "initial-given": lambda net: W.InitialLoss(NAMES, initial=INITIAL),
    "initial-first-steps": lambda net: W.InitialLoss(NAMES, steps=3),
    "prior": lambda net: W.PriorLoss(NAMES, priors=PRIORS),
    "real-time": lambda net: W.RealTime(NAMES),
    "gmean-0": lambda net: W.GeneralizedMean(NAMES, gamma=0.0),
    "gmean-0.5": lambda net: W.GeneralizedMean(NAMES, gamma=0.5),
    "anchor": lambda net: W.AnchorToMain(NAMES, main="classes"),
    "uncertainty": lambda net: W.Uncertainty(NAMES, kinds=["regression", "regression", "classification"]),
    "dwa": lambda net: W.DWA(NAMES, period_steps=5),
    "rlw": lambda net: W.RLW(NAMES, seed=0),
    "famo": lambda net: W.FAMO(NAMES),
}
GRADIENT_BASED = {
    "gradnormalization": lambda net: W.GradNormalization(net.trunk.parameters(), NAMES),
    "gradnormalization-rescale-batched": lambda net: W.GradNormalization(net.trunk.parameters(), NAMES, rescale=True, grad_mode="batched"),
    "gradnorm": lambda net: W.GradNorm(net.trunk.parameters(), NAMES, last_shared_layer=net.trunk[2]),
    "mgda-none": "none",
    "mgda-l2": "l2",
    "mgda-loss": "loss",
    "mgda-loss+": "loss+",
    "pcgrad": lambda net: W.PCGrad(net.trunk.parameters(), NAMES, seed=0),
    "cagrad": lambda net: W.CAGrad(net.trunk.parameters(), NAMES),
    "imtl-g": lambda net: W.IMTLG(net.trunk.parameters(), NAMES),
    "aligned-mtl": lambda net: W.AlignedMTL(net.trunk.parameters(), NAMES),
    "nash-mtl": lambda net: W.NashMTL(net.trunk.parameters(), NAMES),
    "upgrad": lambda net: W.UPGrad(net.trunk.parameters(), NAMES),
    "db-mtl": lambda net: W.DBMTL(net.trunk.parameters(), NAMES),
}
REPRESENTATION = {"mgda-ub-l2", "gradnormalization-features"}


def build(method, net):
    if method in LOSS_BASED:
        return LOSS_BASED[method](net)
    if method == "mgda-ub-l2":
        return _mgda(normalization="l2")(net)
    if method == "gradnormalization-features":
        return W.GradNormalization(net.trunk.parameters(), NAMES)
    spec = GRADIENT_BASED[method]
    return _mgda(normalization=spec)(net) if isinstance(spec, str) else spec(net)


def train(method):
    x, targets = make_problem()
    net = Net()
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


@pytest.mark.parametrize("method", list(LOSS_BASED) + list(GRADIENT_BASED) + sorted(REPRESENTATION))
def test_every_task_loss_decreases(method):
    history, weighting = train(method)
    assert bool(history.isfinite().all())
    first, last = history[:STEPS_AVG].mean(0), history[-STEPS_AVG:].mean(0)
    ratios = (last / first).tolist()
    assert all(r < DECREASE for r in ratios), dict(zip(NAMES, ratios))
    log = weighting.log()
    assert {f"weight/{n}" for n in NAMES} <= set(log)
    assert all(torch.isfinite(torch.tensor(v)) for v in log.values())


def test_training_is_deterministic():
    a, _ = train("gradnorm")
    b, _ = train("gradnorm")
    assert torch.equal(a, b)
