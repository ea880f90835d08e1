"""Nash-MTL: multi-task learning as a bargaining game (Navon et al. 2022), on the Gramian."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.weighting.gradient_based import GradientWeighting
from fusedmtl.weighting.solvers import nash_bargaining


class NashMTL(GradientWeighting):
    """Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya, "Multi-Task Learning as a
    Bargaining Game", ICML 2022.

    The Nash bargaining solution: a > 0 with M a = 1 / a element-wise, found by our own small
    solver (:func:`~fusedmtl.weighting.solvers.nash_bargaining`, damped Newton on the strictly
    convex 0.5 a^T M a - sum log a_i; no cvxpy). Then norm(d)^2 = a^T M a = K. As in the paper,
    the update is clipped to norm ``max_norm`` (on the Gramian: c scaled by
    min(1, max_norm / sqrt(c^T M c)); None disables it), and ``update_every`` n > 1 re-solves only
    every n-th step, reusing the last coefficients in between (the paper's speed option).
    """

    def __init__(self, shared_params=None, tasks=None, *, max_norm: float | None = 1.0, update_every: int = 1, **kwargs) -> None:
        super().__init__(shared_params, tasks, **kwargs)
        if update_every < 1:
            raise ValueError(f"NashMTL: update_every must be at least 1, got {update_every}")
        self.max_norm, self.update_every = max_norm, int(update_every)
        self.register_buffer("steps_done", torch.tensor(0))
        if self.num_tasks is not None:
            self._init_task_state()

    def _init_task_state(self) -> None:
        self.register_buffer("solution", torch.ones(self.num_tasks, dtype=torch.float64))

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        m = gramian.detach().to("cpu", torch.float64)
        if int(self.steps_done) % self.update_every == 0:
            self.solution.copy_(nash_bargaining(m))
        self.steps_done += 1
        coeffs = self.solution.clone().cpu()
        if self.max_norm is not None:
            norm = (coeffs @ m @ coeffs).clamp_min(0).sqrt()
            coeffs = coeffs * (self.max_norm / norm).clamp(max=1.0) if norm > 0 else coeffs
        return coeffs.to(gramian.dtype)
