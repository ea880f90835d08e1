"""MoDo: multi-objective gradient descent with a stochastic simplex step (docs/METHODS.md, 4)."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.weighting.gradient_based import GradientWeighting


class MoDo(GradientWeighting):
    """Chen, Fernando, Ying, Chen, "Three-Way Trade-Off in Multi-Objective Learning:
    Optimization, Generalization and Conflict-Avoidance", JMLR 2024 (Algorithm 1), as torchjd's
    MoDoWeighting.

    The weights lambda (on the simplex, from 1/K) take one projected gradient step on
    1/2 lambda^T M lambda + rho/2 norm(lambda)^2 per step:
    lambda <- Proj_simplex(lambda - gamma (M lambda + rho lambda)), and c = lambda, the updated
    weights. The paper's M is J_1 J_2^T from two independent mini-batches (an unbiased estimate
    of the Gramian's expectation); here it is the step's Gramian, of one batch (what ``backward``
    has), so its convergence guarantee does not carry over as is: the update is that of
    LibMTL's MoDo with one batch. lambda is a float64 buffer of the state_dict, moved to the
    Gramian's device on first use (no host synchronisation); it is not updated on skipped steps.
    gamma multiplies M, so it depends on the gradients' scale.

    Args:
        shared_params, tasks: see :class:`~fusedmtl.weighting.gradient_based.GradientWeighting`.
        gamma: the step size of the weights, > 0 (torchjd's default 0.1).
        rho: the l2 regularisation of the weights, >= 0 (torchjd's default 0.1).
        **kwargs: the options of :class:`~fusedmtl.weighting.gradient_based.GradientWeighting`.
    """

    def __init__(
        self, shared_params=None, tasks=None, *, gamma: float = 0.1, rho: float = 0.1, **kwargs
    ) -> None:
        super().__init__(shared_params, tasks, **kwargs)
        if not gamma > 0 or not rho >= 0:
            raise ValueError(f"MoDo: needs gamma > 0 and rho >= 0, got {gamma} and {rho}")
        self.gamma, self.rho = float(gamma), float(rho)
        k = self.num_tasks or 0  # 0: sized by the first Gramian (coefficients-only use)
        self.register_buffer("weights", torch.full((k,), 1.0 / max(k, 1), dtype=torch.float64))

    def _init_task_state(self) -> None:
        k = self.num_tasks
        self.weights = torch.full((k,), 1.0 / k, dtype=torch.float64, device=self.weights.device)

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        M = gramian.detach().to(torch.float64)
        weights = self.weights.to(M.device)
        weights = project_onto_simplex(weights - self.gamma * (M @ weights + self.rho * weights))
        self.weights = weights
        return weights.to(gramian.dtype)


def project_onto_simplex(y: Tensor) -> Tensor:
    """The Euclidean projection of y onto the probability simplex {x >= 0, sum x = 1} (Held,
    Wolfe, Crowder 1974; the sort-based form of Duchi et al. 2008), without a host
    synchronisation.

    Args:
        y: ``Tensor[K]``, any float dtype and device.

    Returns:
        ``Tensor[K]`` of y's dtype and device: max(y - theta, 0) with theta such that it sums to 1.
    """
    k = y.shape[0]
    descending = torch.sort(y, descending=True).values
    cumulative = descending.cumsum(0) - 1.0
    counts = torch.arange(1, k + 1, dtype=y.dtype, device=y.device)
    # the support is a prefix of the sorted values: the j with u_j > (sum_{i <= j} u_i - 1) / j
    support = (descending * counts > cumulative).sum().clamp_min(1)
    theta = cumulative.gather(0, (support - 1).reshape(1)) / support.to(y.dtype)
    return (y - theta).clamp_min(0.0)
