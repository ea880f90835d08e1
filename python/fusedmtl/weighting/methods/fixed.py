"""Fixed task weights (docs/METHODS.md, section 3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fusedmtl.weighting.loss_based import LossWeighting, weighted_total


class Fixed(LossWeighting):
    """Fixed weights w_i: 1/K by default; ``weights=a`` with two tasks means (a, 1 - a)."""

    def __init__(self, tasks, weights: float | Sequence[float] | None = None, **kwargs) -> None:
        super().__init__(tasks, **kwargs)
        k = self.num_tasks
        if weights is None:
            weights = [1.0 / k] * k
        elif isinstance(weights, (int, float)):
            if k != 2:
                raise ValueError(
                    f"Fixed: a single weight a means (a, 1 - a) and needs 2 tasks, not {k}"
                )
            weights = [float(weights), 1.0 - float(weights)]
        weights = torch.as_tensor(weights, dtype=torch.float64).flatten()
        if weights.numel() != k:
            raise ValueError(f"Fixed: expected {k} weights, got {weights.numel()}")
        self.register_buffer("weights", weights)

    def constants(self, like):
        return (self.weights.to(like),)

    def total(self, values):
        return weighted_total(values, *self._constants(values))
