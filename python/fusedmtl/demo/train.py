"""The demo's model and training loop: one run per weighting method, same data, same
initialisation, same batch order, so the methods differ only in how they weigh the tasks."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fusedmtl
from fusedmtl import weighting as W
from fusedmtl.demo.data import Problem

# "name@n": the gradient-based method with refresh_every=n (amortized coefficients), next to
# the exact method, so the metrics show what the approximation costs.
DEFAULT_METHODS = (
    "fixed",
    "real_time",
    "uncertainty",
    "grad_normalization",
    "grad_normalization@16",
    "mgda",
    "mgda@16",
)
REGRESSION_LOSSES = ("mse", "l1", "smooth_l1")


@dataclass
class Config:
    """Everything a demo run depends on (recorded in the JSON)."""

    seed: int = 0
    steps: int = 3000
    n_train: int = 8192
    n_test: int = 4096
    batch_size: int = 256
    lr: float = 3e-3
    hidden: int = 64
    beta: float = 0.25  # smooth-L1's beta for the outlier task, about its clean noise scale
    methods: tuple[str, ...] = DEFAULT_METHODS
    compare_losses: tuple[str, ...] = REGRESSION_LOSSES  # the sensor task's loss comparison
    compare_method: str = "grad_normalization"  # the weighting the loss comparison runs under
    eval_every: int = 100
    threads: int = 1
    quick: bool = False


def all_methods() -> dict[str, type]:
    return {**W.LOSS_BASED, **W.GRADIENT_BASED}


def split_method(spec: str) -> tuple[str, int]:
    """'mgda@16' -> ('mgda', 16): a registry name and its refresh_every (1 without '@')."""
    name, marked, every = spec.partition("@")
    if not marked:
        return name, 1
    return name, int(every) if every.isdigit() else 0  # (0: not a valid spec)


def is_method(spec: str) -> bool:
    """A registry name, or a gradient-based one with '@n' (n >= 1)."""
    name, every = split_method(spec)
    return name in all_methods() and (every == 1 or (every > 1 and name in W.GRADIENT_BASED))


class MultiTaskNet(nn.Module):
    """A shared MLP trunk (in -> hidden -> hidden) and one small MLP head per task."""

    def __init__(self, in_dim: int, out_dims: dict[str, int], hidden: int = 64) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.heads = nn.ModuleDict(
            {
                name: nn.Sequential(
                    nn.Linear(hidden, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, out)
                )
                for name, out in out_dims.items()
            }
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z = self.trunk(x)
        return {name: head(z) for name, head in self.heads.items()}


def loss_fn(kind: str, beta: float) -> Callable[[Tensor, Tensor], Tensor]:
    """The training loss of a task: fusedmtl's fused regression losses, or cross-entropy."""
    if kind == "mse":
        return fusedmtl.mse_loss
    if kind == "l1":
        return fusedmtl.l1_loss
    if kind == "smooth_l1":
        return lambda pred, target: fusedmtl.smooth_l1_loss(pred, target, beta=beta)
    if kind == "cross_entropy":
        return F.cross_entropy
    raise ValueError(
        f"unknown loss {kind!r}; expected one of {REGRESSION_LOSSES + ('cross_entropy',)}"
    )


def make_weighting(
    name: str, model: MultiTaskNet, problem: Problem, losses: dict[str, str], config: Config
) -> W.Weighting:
    """The weighting ``name`` (a registry key) from its ``example``, with the settings this
    problem supplies: priors and kinds from the labels, an epoch as DWA's period, the seed."""
    methods = all_methods()
    if not is_method(name):
        raise ValueError(f"unknown weighting method {name!r}; choose from {sorted(methods)}")
    name, every = split_method(name)
    tasks = problem.task_names
    settings = {
        "uncertainty": lambda: {
            "kinds": [
                "classification" if t.kind == "classification" else "regression"
                for t in problem.tasks
            ]
        },
        "prior_loss": lambda: {
            "priors": [
                _prior_loss(problem.y_train[t.name], losses[t.name], config.beta)
                for t in problem.tasks
            ]
        },
        "initial_loss": lambda: {"steps": 10},  # the mean of the first 10 minibatch losses
        "dwa": lambda: {"period_steps": max(1, config.n_train // config.batch_size)},  # one epoch
        "rlw": lambda: {"seed": config.seed},
        "pcgrad": lambda: {"seed": config.seed},
    }.get(name, dict)()
    if every > 1:
        settings["refresh_every"] = every
    return methods[name].example(tasks, model.trunk.parameters(), **settings)


def _prior_loss(y: Tensor, kind: str, beta: float) -> float:
    """The loss of the best constant prediction from the labels alone."""
    if kind == "cross_entropy":
        return W.prior_loss_classification(y)
    if kind == "mse":
        return W.prior_loss_l2(y)
    if kind == "l1":
        return W.prior_loss_l1(y)
    return float(loss_fn(kind, beta)(y.median(0).values.expand_as(y), y))


@torch.no_grad()
def evaluate(model: MultiTaskNet, problem: Problem) -> dict[str, dict[str, float]]:
    """Test metrics against the clean labels: RMSE and MAE per regression task, accuracy per
    classification task."""
    model.eval()
    out = model(problem.x_test)
    model.train()
    metrics: dict[str, dict[str, float]] = {}
    for task in problem.tasks:
        pred, y = out[task.name], problem.y_test[task.name]
        if task.kind == "classification":
            metrics[task.name] = {"accuracy": float((pred.argmax(1) == y).double().mean())}
        else:
            err = (pred - y).double()
            metrics[task.name] = {
                "rmse": float(err.square().mean().sqrt()),
                "mae": float(err.abs().mean()),
            }
    return metrics


@dataclass
class RunResult:
    """One training run: its final test metrics and what happened on the way."""

    method: str
    losses: dict[str, str]
    metrics: dict[str, dict[str, float]]
    wall_time: float  # seconds in the training steps (periodic evaluation excluded)
    train_losses: Tensor  # (steps, K) float64, each task's minibatch loss per step
    weights: Tensor  # (steps, K) float64, weighting.last_weights per step (nan before the first)
    evals: list[tuple[int, dict[str, dict[str, float]]]] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[Tensor]:
    """Index batches of shuffled epochs, forever (the last incomplete batch of an epoch dropped)."""
    per_epoch = max(1, n // batch_size)
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(per_epoch):
            yield perm[i * batch_size : (i + 1) * batch_size]


def train_method(
    method: str,
    problem: Problem,
    config: Config,
    losses: dict[str, str] | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> RunResult:
    """Trains a fresh model with weighting ``method``. ``losses`` overrides the task losses (task
    name -> 'mse' | 'l1' | 'smooth_l1' | 'cross_entropy'). ``on_step(step, last losses)`` is called
    every few steps (progress display)."""
    losses = {t.name: t.loss for t in problem.tasks} | dict(losses or {})
    fns = {name: loss_fn(kind, config.beta) for name, kind in losses.items()}
    names = problem.task_names
    torch.manual_seed(config.seed)  # the same initialisation for every method
    model = MultiTaskNet(problem.in_dim, {t.name: t.out_dim for t in problem.tasks}, config.hidden)
    weighting = make_weighting(method, model, problem, losses, config)
    groups = [{"params": list(model.parameters())}]
    own = [p for p in weighting.parameters() if p.requires_grad]  # Uncertainty's log-variances
    if own:
        groups.append({"params": own, "lr": 10 * config.lr})
    optimizer = torch.optim.Adam(groups, lr=config.lr)
    batches = _batches(
        problem.x_train.shape[0], config.batch_size, torch.Generator().manual_seed(config.seed + 1)
    )

    k = len(names)
    train_losses = torch.full((config.steps, k), math.nan, dtype=torch.float64)
    weights = torch.full((config.steps, k), math.nan, dtype=torch.float64)
    evals, elapsed = [], 0.0
    report_every = max(1, config.steps // 100)
    for step in range(config.steps):
        start = time.perf_counter()
        idx = next(batches)
        out = model(problem.x_train[idx])
        task_losses = {name: fns[name](out[name], problem.y_train[name][idx]) for name in names}
        weighting.backward(task_losses)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed += time.perf_counter() - start
        train_losses[step] = torch.stack([task_losses[n].detach().double() for n in names])
        if weighting.last_weights is not None:
            weights[step] = weighting.last_weights.detach().double().cpu()
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            evals.append((step + 1, evaluate(model, problem)))
        if on_step is not None and ((step + 1) % report_every == 0 or step + 1 == config.steps):
            on_step(step + 1, dict(zip(names, train_losses[step].tolist())))
    extra = {}
    if method == "uncertainty":
        extra["log_vars"] = weighting.log_vars.detach().tolist()
    return RunResult(method, losses, evals[-1][1], elapsed, train_losses, weights, evals, extra)


@contextlib.contextmanager
def deterministic(threads: int) -> Iterator[None]:
    """Fixed thread count and deterministic algorithms for the duration; restored afterwards."""
    old_threads = torch.get_num_threads()
    old_det, old_warn = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
