"""Initial-loss weighting: each loss relative to where it started (docs/METHODS.md, section 3)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fusedmtl.weighting.loss_based import LossWeighting, weighted_total


class InitialLoss(LossWeighting):
    """w_i = 1 / L_i(init): each loss measured relative to where it started (scale invariant).

    ``initial`` gives the values (see :func:`initial_loss_cross_entropy` and
    :func:`initial_loss_l2` for the theory values at initialisation); otherwise they are the mean
    losses of the first ``steps`` steps (the running mean is used until then; ``steps`` is
    ignored when ``initial`` is given).
    """

    has_step_state = True
    has_host_step_state = True  # (steps_seen)

    def __init__(
        self,
        tasks,
        initial: Sequence[float] | None = None,
        steps: int = 1,
        eps: float = 1e-8,
        **kwargs,
    ) -> None:
        super().__init__(tasks, **kwargs)
        if steps < 1:
            raise ValueError(f"InitialLoss: steps must be at least 1, got {steps}")
        given = initial is not None
        self.steps, self.eps = (1 if given else int(steps)), float(eps)  # given values: frozen
        k = self.num_tasks
        self.register_buffer(
            "loss_sum",
            torch.as_tensor(initial, dtype=torch.float64).flatten()
            if given
            else torch.zeros(k, dtype=torch.float64),
        )
        if self.loss_sum.numel() != k:
            raise ValueError(
                f"InitialLoss: expected {k} initial losses, got {self.loss_sum.numel()}"
            )
        # A Python int: whether this step still counts towards the initial losses is decided on
        # the host (no device read, and no update at all once they are frozen).
        self.steps_seen = 1 if given else 0

    def total(self, values):
        if self.steps_seen < self.steps:
            self.loss_sum += values.to(self.loss_sum)
            self.steps_seen += 1
        initial = self.loss_sum / self.steps_seen
        return weighted_total(values, 1.0 / (initial + self.eps))

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "steps_seen": self.steps_seen}

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        self.steps_seen = int(state["steps_seen"])


def initial_loss_cross_entropy(num_classes: int) -> float:
    """log C: the cross-entropy of a C-class classifier that starts out uniform."""
    return math.log(num_classes)


def initial_loss_l2(targets: Tensor) -> float:
    """E[y^2]: the mean squared error of a regressor that starts out predicting zero."""
    return float(targets.double().square().mean())
