"""Prior-loss weighting: each loss relative to the best constant prediction (docs/METHODS.md,
section 3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fusedmtl.weighting.loss_based import LossWeighting, weighted_total


class PriorLoss(LossWeighting):
    """w_i = 1 / L_i(prior): each loss measured against the best constant prediction from the
    labels alone. Compute the priors with :func:`prior_loss_classification`,
    :func:`prior_loss_l2` and :func:`prior_loss_l1`."""

    def __init__(self, tasks, priors: Sequence[float], eps: float = 1e-8, **kwargs) -> None:
        super().__init__(tasks, **kwargs)
        priors = torch.as_tensor(priors, dtype=torch.float64).flatten()
        if priors.numel() != self.num_tasks:
            raise ValueError(
                f"PriorLoss: expected {self.num_tasks} prior losses, got {priors.numel()}"
            )
        self.register_buffer("priors", priors)
        self.eps = float(eps)

    @classmethod
    def _example_settings(cls, num_tasks, shared_params):
        # Made-up priors 1, 2, ..., K (distinct, so the weights are not uniform); real data
        # gives them from its labels (prior_loss_classification & co).
        return {"priors": [float(i + 1) for i in range(num_tasks)]}

    def constants(self, like):
        return ((1.0 / (self.priors + self.eps)).to(like),)

    def total(self, values):
        return weighted_total(values, *self._constants(values))


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
