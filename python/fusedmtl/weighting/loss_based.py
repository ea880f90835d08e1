"""Loss-based weightings: total = sum_i w_i L_i (../shared/METHODS.md, section 3).

Each is a module whose ``forward(losses)`` returns the total loss (so ``w(losses).backward()``
composes with anything) and whose ``backward(losses)`` backpropagates it.

Every method is written as ``total(values) -> (value, weights)`` on the detached losses: the
total's value, and its derivative w_i = d total / d L_i. The module returns
value + sum_i sg(w_i) (L_i - sg(L_i)): the method's value, and the gradient sum_i w_i grad L_i
(the chain rule, for the nonlinear methods too), while learnable state (uncertainty's
log-variances) gets its gradient through the value. Under data parallelism the values are the
losses averaged across ranks, so every rank uses the same weights and the same state gradient,
and the model's gradients, averaged by DistributedDataParallel as usual, are those of one
process with the whole batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fusedmtl.weighting.base import Losses, SkipStep, Weighting
from fusedmtl.weighting.state import SharedGenerator


class LossWeighting(Weighting):
    """Base class: subclasses implement :meth:`total`."""

    def forward(self, losses: Losses) -> Tensor:
        """The weighted total loss, a 0-dim tensor (a leaf with no effect when the step is skipped)."""
        checked = self._checked_losses(losses)
        dtype = functools.reduce(torch.promote_types, (loss.dtype for loss in checked))
        stacked = torch.stack([loss.to(dtype) for loss in checked])
        try:
            values = self._loss_values(stacked.detach())
        except SkipStep:
            return torch.zeros((), requires_grad=True)
        value, weights = self.total(values)
        weights = weights.detach()
        self.last_weights = weights
        return value.to(dtype) + (weights.to(dtype) * (stacked - values.to(dtype))).sum()

    def backward(self, losses: Losses, grad_scaler: torch.amp.GradScaler | None = None, retain_graph: bool = False) -> Tensor | None:
        """Backpropagates the total (scaled by ``grad_scaler`` if given); returns the weights
        (None if the step was skipped)."""
        total = self(losses)
        if total.grad_fn is None:
            return None
        if grad_scaler is not None:
            total = grad_scaler.scale(total)
        total.backward(retain_graph=retain_graph)
        return self.last_weights

    def total(self, values: Tensor) -> tuple[Tensor, Tensor]:
        """(the total's value, its derivatives w_i = d total / d L_i) at the detached losses
        ``values`` (Tensor[K], float32 or float64, averaged across ranks)."""
        raise NotImplementedError


def _weighted(values: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    weights = weights.to(values)
    return (weights * values).sum(), weights


class Fixed(LossWeighting):
    """Fixed weights w_i: 1/K by default; ``weights=a`` with two tasks means (a, 1 - a)."""

    def __init__(self, tasks, weights: float | Sequence[float] | None = None, **kwargs) -> None:
        super().__init__(tasks, **kwargs)
        k = self.num_tasks
        if weights is None:
            weights = [1.0 / k] * k
        elif isinstance(weights, (int, float)):
            if k != 2:
                raise ValueError(f"Fixed: a single weight a means (a, 1 - a) and needs 2 tasks, not {k}")
            weights = [float(weights), 1.0 - float(weights)]
        weights = torch.as_tensor(weights, dtype=torch.float64).flatten()
        if weights.numel() != k:
            raise ValueError(f"Fixed: expected {k} weights, got {weights.numel()}")
        self.register_buffer("weights", weights)

    def total(self, values):
        return _weighted(values, self.weights)


class InitialLoss(LossWeighting):
    """w_i = 1 / L_i(init): each loss measured relative to where it started (scale invariant).

    ``initial`` gives the values (see :func:`initial_loss_cross_entropy` and
    :func:`initial_loss_l2` for the theory values at initialisation); otherwise they are the mean
    losses of the first ``steps`` steps (the running mean is used until then; ``steps`` is
    ignored when ``initial`` is given).
    """

    def __init__(self, tasks, initial: Sequence[float] | None = None, steps: int = 1, eps: float = 1e-8, **kwargs) -> None:
        super().__init__(tasks, **kwargs)
        if steps < 1:
            raise ValueError(f"InitialLoss: steps must be at least 1, got {steps}")
        given = initial is not None
        self.steps, self.eps = (1 if given else int(steps)), float(eps)  # given values: frozen
        k = self.num_tasks
        self.register_buffer("loss_sum", torch.as_tensor(initial, dtype=torch.float64).flatten() if given else torch.zeros(k, dtype=torch.float64))
        if self.loss_sum.numel() != k:
            raise ValueError(f"InitialLoss: expected {k} initial losses, got {self.loss_sum.numel()}")
        self.register_buffer("steps_seen", torch.tensor(1 if given else 0))

    def total(self, values):
        if int(self.steps_seen) < self.steps:
            self.loss_sum += values.to(self.loss_sum)
            self.steps_seen += 1
        initial = self.loss_sum / self.steps_seen.clamp_min(1)
        return _weighted(values, 1.0 / (initial + self.eps))


class PriorLoss(LossWeighting):
    """w_i = 1 / L_i(prior): each loss measured against the best constant prediction from the
    labels alone. Compute the priors with :func:`prior_loss_classification`,
    :func:`prior_loss_l2` and :func:`prior_loss_l1`."""

    def __init__(self, tasks, priors: Sequence[float], eps: float = 1e-8, **kwargs) -> None:
        super().__init__(tasks, **kwargs)
        priors = torch.as_tensor(priors, dtype=torch.float64).flatten()
        if priors.numel() != self.num_tasks:
            raise ValueError(f"PriorLoss: expected {self.num_tasks} prior losses, got {priors.numel()}")
        self.register_buffer("priors", priors)
        self.eps = float(eps)

    @classmethod
    def _example_settings(cls, num_tasks, shared_params):
        # Made-up priors 1, 2, ..., K (distinct, so the weights are not uniform); real data
        # gives them from its labels (prior_loss_classification & co).
        return {"priors": [float(i + 1) for i in range(num_tasks)]}

    def total(self, values):
        return _weighted(values, 1.0 / (self.priors + self.eps))


class RealTime(LossWeighting):
    """w_i = 1 / (sg(L_i) + eps): every term is 1, and the gradient sum_i grad L_i / L_i is that
    of sum_i log L_i, the direction of the geometric mean of the losses (Su 2022)."""

    def __init__(self, tasks, eps: float = 1e-8, **kwargs) -> None:
        super().__init__(tasks, **kwargs)
        self.eps = float(eps)

    def total(self, values):
        return _weighted(values, 1.0 / (values + self.eps))


class GeneralizedMean(LossWeighting):
    """total = ((1/K) sum_i L_i^gamma)^(1/gamma) (Su 2022): gamma = 1 the arithmetic mean,
    0 the geometric mean (the limit, not a division by zero), +inf the max, -inf the min;
    monotone in gamma. Computed in log space, exp((logsumexp(gamma log L) - log K) / gamma), so
    large gammas do not overflow. Losses must be positive (they are clamped at the smallest
    normal number). Effective weights: dtotal/dL_i = total softmax(gamma log L)_i / L_i."""

    def __init__(self, tasks, gamma: float = 0.0, **kwargs) -> None:
        super().__init__(tasks, **kwargs)
        self.gamma = float(gamma)

    def total(self, values):
        log_values = values.clamp_min(torch.finfo(values.dtype).tiny).log()
        k, gamma = values.numel(), self.gamma
        if gamma == 0:
            shares = torch.full_like(log_values, 1.0 / k)
            value = log_values.mean().exp()
        elif math.isinf(gamma):
            extreme = log_values == (log_values.max() if gamma > 0 else log_values.min())
            shares = extreme.to(log_values) / extreme.sum()
            value = values.max() if gamma > 0 else values.min()
        else:
            shares = torch.softmax(gamma * log_values, 0)
            value = ((torch.logsumexp(gamma * log_values, 0) - math.log(k)) / gamma).exp()
        return value, value * shares / log_values.exp()


class AnchorToMain(LossWeighting):
    """total = L_main + sum_{i != main} L_i / sg(L_i / L_main): every loss rescaled each step to
    the magnitude of the main task's loss."""

    def __init__(self, tasks, main: int | str = 0, eps: float = 1e-8, **kwargs) -> None:
        super().__init__(tasks, **kwargs)
        self.main = self.task_names.index(main) if isinstance(main, str) else int(main)
        if not 0 <= self.main < self.num_tasks:
            raise ValueError(f"AnchorToMain: main task {main!r} is not one of the {self.num_tasks} tasks")
        self.eps = float(eps)

    def total(self, values):
        weights = values[self.main] / (values + self.eps)
        weights[self.main] = 1.0
        return _weighted(values, weights)


class Uncertainty(LossWeighting):
    """Kendall, Gal, Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics", CVPR 2018: learnable s_i = log sigma_i^2 (nn.Parameters, start at
    ``init``; give them to the optimizer with the model's parameters).

    Per task, kind 'regression' (Gaussian likelihood): 0.5 exp(-s_i) L_i + 0.5 s_i;
    kind 'classification' (softmax with temperature): exp(-s_i) L_i + 0.5 s_i.
    ``kinds``: one kind for all tasks, or one per task.
    """

    KINDS = {"regression": 0.5, "classification": 1.0}

    def __init__(self, tasks, kinds: str | Sequence[str] = "regression", init: float = 0.0, **kwargs) -> None:
        super().__init__(tasks, **kwargs)
        kinds = [kinds] * self.num_tasks if isinstance(kinds, str) else list(kinds)
        if len(kinds) != self.num_tasks or any(k not in self.KINDS for k in kinds):
            raise ValueError(f"Uncertainty: kinds must be one of {list(self.KINDS)} (or one per task), got {kinds!r}")
        self.kinds = kinds
        self.register_buffer("factors", torch.tensor([self.KINDS[k] for k in kinds]), persistent=False)
        self.log_vars = nn.Parameter(torch.full((self.num_tasks,), float(init)))

    def total(self, values):
        log_vars = self.log_vars.to(values)
        weights = self.factors.to(values) * torch.exp(-log_vars)
        return (weights * values + 0.5 * log_vars).sum(), weights


class DWA(LossWeighting):
    """Dynamic Weight Average, Liu, Johns, Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019: w_i(t) = K softmax_i(r(t-1) / T), r_i(t-1) = L_i(t-1) / L_i(t-2) over
    period mean losses; w = 1 for the first two periods.

    A period is an epoch: call :meth:`end_period` at the end of each, or give ``period_steps``
    to roll over every that many steps.
    """

    def __init__(self, tasks, temperature: float = 2.0, period_steps: int | None = None, **kwargs) -> None:
        super().__init__(tasks, **kwargs)
        self.temperature = float(temperature)
        self.period_steps = period_steps
        k = self.num_tasks
        self.register_buffer("period_sum", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("period_count", torch.tensor(0))
        self.register_buffer("history", torch.zeros(2, k, dtype=torch.float64))  # t-2, t-1 means
        self.register_buffer("periods_done", torch.tensor(0))
        self.register_buffer("weights", torch.ones(k, dtype=torch.float64))

    @classmethod
    def _example_settings(cls, num_tasks, shared_params):
        return {"period_steps": 2}  # the weights move within a few steps

    def end_period(self) -> None:
        """Closes the current period: its mean losses enter the history, the weights update."""
        if int(self.period_count) == 0:
            return
        self.history[0] = self.history[1]
        self.history[1] = self.period_sum / self.period_count
        self.period_sum.zero_()
        self.period_count.zero_()
        self.periods_done += 1
        if int(self.periods_done) >= 2:
            rates = self.history[1] / self.history[0]
            self.weights.copy_(self.num_tasks * torch.softmax(rates / self.temperature, 0))

    def total(self, values):
        result = _weighted(values, self.weights.clone())  # end_period below updates the buffer
        self.period_sum += values.to(self.period_sum)
        self.period_count += 1
        if self.period_steps is not None and int(self.period_count) >= self.period_steps:
            self.end_period()
        return result


class RLW(LossWeighting):
    """Random Loss Weighting, Lin et al., "Reasonable Effectiveness of Random Weighting",
    TMLR 2022: w = softmax(z), z ~ N(0, I) drawn afresh each step. The draws come from a CPU
    generator seeded by ``seed`` (default: a seed drawn on rank 0 and broadcast), so every rank
    draws the same weights; its state is part of the state_dict."""

    def __init__(self, tasks, seed: int | None = None, **kwargs) -> None:
        super().__init__(tasks, **kwargs)
        self._generator = SharedGenerator(seed)

    @classmethod
    def _example_settings(cls, num_tasks, shared_params):
        return {"seed": 0}

    def total(self, values):
        z = torch.randn(self.num_tasks, generator=self._generator.get(), dtype=torch.float64)
        return _weighted(values, torch.softmax(z, 0))

    def get_extra_state(self) -> dict:
        return {"generator": self._generator.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self._generator.load_state_dict(state["generator"])


# -- prior losses from labels ------------------------------------------------------------------


def initial_loss_cross_entropy(num_classes: int) -> float:
    """log C: the cross-entropy of a C-class classifier that starts out uniform."""
    return math.log(num_classes)


def initial_loss_l2(targets: Tensor) -> float:
    """E[y^2]: the mean squared error of a regressor that starts out predicting zero."""
    return float(targets.double().square().mean())


def prior_loss_classification(labels: Tensor, num_classes: int | None = None) -> float:
    """H(p) = -sum_c p_c log p_c of the label frequencies: the cross-entropy of predicting the
    class prior. labels: integer class indices of any shape."""
    counts = torch.bincount(labels.flatten().long(), minlength=num_classes or 0).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def prior_loss_l2(targets: Tensor) -> float:
    """Var(y) = E[(y - mean y)^2]: the mean squared error of predicting the mean. targets:
    (N,) or (N, D), the mean taken per output over the N samples."""
    y = targets.double().reshape(targets.shape[0], -1)
    return float((y - y.mean(0)).square().mean())


def prior_loss_l1(targets: Tensor) -> float:
    """E[abs(y - median y)]: the mean absolute error of predicting the median. targets: (N,) or
    (N, D), the median taken per output over the N samples."""
    y = targets.double().reshape(targets.shape[0], -1)
    return float((y - y.median(0).values).abs().mean())
