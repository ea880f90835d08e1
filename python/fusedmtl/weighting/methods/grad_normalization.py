"""Gradient normalisation: d = sum_i g_i / norm(g_i) (Su 2022, METHODS.md section 4)."""

from __future__ import annotations

from torch import Tensor

from fusedmtl.weighting.gradient_based import GradientWeighting


class GradNormalization(GradientWeighting):
    """Su Jianlin, "Multi-task learning notes (1): in the name of the loss", 2022: every task
    contributes its unit gradient, c_i = 1 / (norm(g_i) + eps).

    The update is invariant to scaling a loss (L_i -> a L_i, a > 0) and to adding a constant to
    it. ``rescale=True`` multiplies every coefficient by mean_i norm(g_i), so the step keeps the
    size of an average task gradient (matters for SGD, hardly for Adam). Needs only the squared
    norms: one multi-tensor pass for them, one for the sum. A zero gradient gets the finite
    coefficient 1 / eps and contributes nothing.

    Args: see :class:`~fusedmtl.weighting.gradient_based.GradientWeighting`.
    """

    needs_full_gramian = False

    def __init__(self, shared_params=None, tasks=None, *, rescale: bool = False, **kwargs) -> None:
        super().__init__(shared_params, tasks, **kwargs)
        self.rescale = rescale

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        norms = gramian.diagonal().clamp_min(0).sqrt()
        coeffs = 1.0 / (norms + self.eps)
        return coeffs * norms.mean() if self.rescale else coeffs
