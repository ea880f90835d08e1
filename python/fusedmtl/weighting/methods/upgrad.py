"""UPGrad: unconflicting projection of gradients (Quinton & Rey 2024), on the Gramian."""

from __future__ import annotations

from torch import Tensor

from fusedmtl.weighting.gradient_based import GradientWeighting
from fusedmtl.weighting.solvers import upgrad_coefficients


class UPGrad(GradientWeighting):
    """Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024.

    Each g_i is projected onto the dual cone of all task gradients, {x : <x, g_j> >= 0 for all
    j}, and the projections are averaged: the update conflicts with no task, and equals the mean
    gradient when no two gradients conflict. The K projections are K small non-negative QPs on
    the Gramian (:func:`~fusedmtl.weighting.solvers.dual_cone_weights`), solved exactly without
    a QP library.

    Properties (tests/weighting/test_solver_properties.py): non-conflicting, permutation
    invariant, linear under scaling, strongly stationary. For a low-precision Gramian the K
    projections carry a ridge at its resolution (bounded weights, no dependence on the task
    order; see :func:`~fusedmtl.weighting.solvers.lower_bounded_min_norm`).
    """

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        return upgrad_coefficients(gramian.detach(), validate=False).to(gramian.dtype)
