"""Real-time loss weighting: the geometric mean's direction (Su 2022; docs/METHODS.md, 3)."""

from __future__ import annotations

from fusedmtl.weighting.loss_based import LossWeighting, weighted_total


class RealTime(LossWeighting):
    """w_i = 1 / (sg(L_i) + eps): every term is 1, and the gradient sum_i grad L_i / L_i is that
    of sum_i log L_i, the direction of the geometric mean of the losses (Su 2022)."""

    def __init__(self, tasks, eps: float = 1e-8, **kwargs) -> None:
        super().__init__(tasks, **kwargs)
        self.eps = float(eps)

    def total(self, values):
        return weighted_total(values, 1.0 / (values + self.eps))
