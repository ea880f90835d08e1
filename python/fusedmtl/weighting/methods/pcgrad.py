"""PCGrad: projecting conflicting gradients (Yu et al. 2020), on the Gramian."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.weighting.gradient_based import GradientWeighting
from fusedmtl.weighting.state import SharedGenerator


class PCGrad(GradientWeighting):
    """Yu, Kumar, Gupta, Levine, Hausman, Finn, "Gradient Surgery for Multi-Task Learning",
    NeurIPS 2020 (Algorithm 1).

    For each task i, g'_i starts as g_i; for each other task j, in a random order drawn per i,
    if <g'_i, g_j> < 0 then g'_i -= <g'_i, g_j> / norm(g_j)^2 g_j. The update is sum_i g'_i.
    Done on the K x K Gramian: with g'_i = sum_k C_ik g_k (C starts as the identity), the dot
    products are (C M)_ij and a projection subtracts <g'_i, g_j> / M_jj from C_ij; the
    coefficients are the column sums of C. A zero g_j (M_jj = 0) projects nothing.

    The orders come from a generator seeded by ``seed`` (default: drawn on rank 0, broadcast), so
    every rank projects in the same order; its state is part of the state_dict.
    """

    def __init__(
        self, shared_params=None, tasks=None, *, seed: int | None = None, **kwargs
    ) -> None:
        super().__init__(shared_params, tasks, **kwargs)
        self._generator = SharedGenerator(seed)

    @classmethod
    def _example_settings(cls, num_tasks, shared_params):
        return {"seed": 0}

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        m = gramian.detach().to("cpu", torch.float64)
        k = m.shape[0]
        projections = torch.eye(k, dtype=torch.float64)
        generator = self._generator.get()
        for i in range(k):
            for j in torch.randperm(k, generator=generator).tolist():
                if j == i or m[j, j] <= 0:
                    continue
                dot = projections[i] @ m[:, j]
                if dot < 0:
                    projections[i, j] -= dot / m[j, j]
        return projections.sum(0).to(gramian.dtype)

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "generator": self._generator.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        self._generator.load_state_dict(state["generator"])
