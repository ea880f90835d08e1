"""Homoscedastic uncertainty weighting (Kendall et al. 2018; docs/METHODS.md, section 3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fusedmtl.weighting.base import cast_like
from fusedmtl.weighting.loss_based import LossWeighting


class Uncertainty(LossWeighting):
    """Kendall, Gal, Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics", CVPR 2018: learnable s_i = log sigma_i^2 (nn.Parameters, start at
    ``init``; give them to the optimizer with the model's parameters).

    Per task, kind 'regression' (Gaussian likelihood): 0.5 exp(-s_i) L_i + 0.5 s_i;
    kind 'classification' (softmax with temperature): exp(-s_i) L_i + 0.5 s_i.
    ``kinds``: one kind for all tasks, or one per task.
    """

    KINDS = {"regression": 0.5, "classification": 1.0}

    def __init__(
        self, tasks, kinds: str | Sequence[str] = "regression", init: float = 0.0, **kwargs
    ) -> None:
        super().__init__(tasks, **kwargs)
        kinds = [kinds] * self.num_tasks if isinstance(kinds, str) else list(kinds)
        if len(kinds) != self.num_tasks or any(k not in self.KINDS for k in kinds):
            raise ValueError(
                f"Uncertainty: kinds must be one of {list(self.KINDS)} (or one per task), got "
                f"{kinds!r}"
            )
        self.kinds = kinds
        self.register_buffer(
            "factors", torch.tensor([self.KINDS[k] for k in kinds]), persistent=False
        )
        self.log_vars = nn.Parameter(torch.full((self.num_tasks,), float(init)))

    def total(self, values):
        log_vars = cast_like(self.log_vars, values)
        weights = cast_like(self.factors, values) * torch.exp(-log_vars)
        # <w, L> + 0.5 sum_i s_i: three autograd ops, not four
        return torch.dot(weights, values).add(log_vars.sum(), alpha=0.5), weights
