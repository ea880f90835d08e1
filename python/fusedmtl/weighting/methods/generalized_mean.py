"""The generalized mean of the losses (Su 2022; docs/METHODS.md, section 3)."""

from __future__ import annotations

import math

import torch

from fusedmtl.weighting.loss_based import LossWeighting


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
