"""Krum and Multi-Krum: the gradients closest to their neighbours (docs/METHODS.md, section 4)."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.weighting.gradient_based import GradientWeighting


class Krum(GradientWeighting):
    """Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent", NeurIPS 2017 (Krum; Multi-Krum with ``n_selected`` > 1).

    Each gradient's score is the sum of its distances to its K - f - 2 nearest other gradients
    (f = ``n_byzantine``); the update is the mean of the ``n_selected`` gradients of lowest
    score. Distances come from the Gramian, ||g_i - g_j||^2 = M_ii + M_jj - 2 M_ij, clamped at 0
    against rounding, and (as in the paper and torchjd) it is their square roots that are summed.
    Ties are broken by task index. No host synchronisation: topk and one_hot on the device.

    With n_byzantine = 0 and K < 3 there are fewer than one neighbour to score by, so the update
    is the mean of the K gradients (torchjd raises; a multi-task model with one or two tasks
    should still train). With n_byzantine > 0, fewer than n_byzantine + 3 tasks is an error.

    Args:
        shared_params, tasks: see :class:`~fusedmtl.weighting.gradient_based.GradientWeighting`;
            K must be at least ``n_byzantine + 3``.
        n_byzantine: f >= 0, the number of gradients that may be adversarial.
        n_selected: how many gradients are averaged, 1 <= n_selected <= K.
        **kwargs: the options of :class:`~fusedmtl.weighting.gradient_based.GradientWeighting`.
    """

    def __init__(
        self, shared_params=None, tasks=None, *, n_byzantine: int = 0, n_selected: int = 1, **kwargs
    ) -> None:
        super().__init__(shared_params, tasks, **kwargs)
        k = self.num_tasks
        if n_byzantine < 0 or (n_byzantine > 0 and k is not None and k < n_byzantine + 3):
            raise ValueError(
                f"Krum: needs n_byzantine >= 0 and at least n_byzantine + 3 tasks, got n_byzantine="
                f"{n_byzantine} with {self.num_tasks} tasks"
            )
        if n_selected < 1 or (k is not None and n_selected > k):
            raise ValueError(f"Krum: n_selected must be in [1, {self.num_tasks}], got {n_selected}")
        self.n_byzantine = int(n_byzantine)
        self.n_selected = int(n_selected)

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        M = gramian.detach()
        k = M.shape[0]
        if k < self.n_byzantine + 3:  # (n_byzantine = 0, K < 3: see the class docstring)
            return torch.full((k,), 1.0 / k, dtype=gramian.dtype, device=gramian.device)
        sq_norms = M.diagonal()
        distances = (sq_norms[:, None] + sq_norms[None, :] - 2 * M).clamp_min(0).sqrt()
        # Each gradient's distance to itself is excluded by making it the largest (torchjd drops
        # the smallest of each row instead: the same sum, as that is 0 either way).
        distances = distances.masked_fill(
            torch.eye(k, dtype=torch.bool, device=M.device), float("inf")
        )
        n_closest = k - self.n_byzantine - 2
        scores = torch.topk(distances, n_closest, largest=False, sorted=False).values.sum(1)
        # A stable sort, so that ties go to the lower task index.
        selected = torch.argsort(scores, stable=True)[: self.n_selected]
        one_hot = torch.nn.functional.one_hot(selected, k).sum(0)
        return (one_hot.to(M.dtype) / self.n_selected).to(gramian.dtype)
