"""CAGrad: conflict-averse gradient descent (Liu et al. 2021), on the Gramian."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.weighting.gradient_based import GradientWeighting
from fusedmtl.weighting.solvers import cagrad_coefficients


class CAGrad(GradientWeighting):
    """Liu, Liu, Jin, Stone, Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021.

    With g0 = mean_i g_i and phi = c^2 norm(g0)^2: w = argmin_{w in simplex} <g_w, g0> +
    sqrt(phi) norm(g_w), g_w = sum_i w_i g_i, and d = g0 + sqrt(phi) / norm(g_w) g_w; the update
    maximises the worst task's improvement in a ball of radius c norm(g0) around g0. The K-dim
    problem is solved on the Gramian by :func:`~fusedmtl.weighting.solvers.cagrad_coefficients`.
    ``c`` = 0 is the plain mean; ``rescale`` divides by 1 + c^2 (the paper's option).
    """

    def __init__(self, shared_params=None, tasks=None, *, c: float = 0.5, rescale: bool = False, **kwargs) -> None:
        super().__init__(shared_params, tasks, **kwargs)
        if c < 0:
            raise ValueError(f"CAGrad: c must be non-negative, got {c}")
        self.c, self.rescale = float(c), rescale

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        return cagrad_coefficients(gramian.detach(), c=self.c, rescale=self.rescale).to(gramian.dtype)
