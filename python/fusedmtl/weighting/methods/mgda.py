"""MGDA: the min-norm point of the convex hull of the task gradients (Sener & Koltun 2018)."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.weighting.gradient_based import GradientWeighting
from fusedmtl.weighting.solvers import as_float64_gramian, min_norm_simplex_float64

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


class MGDA(GradientWeighting):
    """Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018.

    With the task gradients pre-normalised to u_i = s_i g_i, the update is the min-norm point of
    their convex hull, d = sum_i a_i u_i with a = argmin_{a in simplex} a^T (S M S) a: a
    Pareto-stationary direction, one that decreases no task's loss to first order when d = 0 and
    increases none otherwise. The simplex QP is solved exactly on the K x K Gramian by
    :func:`~fusedmtl.weighting.solvers.min_norm_simplex` (an active-set method; closed form for
    K = 2), not by Frank-Wolfe with a loose tolerance.

    normalization (the paper's code offers the same four): s_i = 1 ('none'), 1 / norm(g_i)
    ('l2', the default), 1 / L_i ('loss') or 1 / (L_i norm(g_i)) ('loss+'). The coefficients are
    c_i = a_i s_i, so the update is the min-norm point of the normalised gradients: with any
    normalisation but 'none' it is invariant to scaling a loss by a positive constant. (The
    paper's code applies a to the raw gradients instead, which loses that invariance.)

    Representation mode (``backward(losses, features=z)``) is MGDA-UB: the Gramian of the
    gradients with respect to the shared features, one trunk backward.

    Properties (tests/weighting/test_solver_properties.py): non-conflicting, permutation
    invariant, d(s J) = s^p d(J) (p = 0 with 'l2', 1 with 'none'); not linear under scaling and
    not strongly stationary (d = 0 whenever 0 is in the hull, weakly stationary J included).
    """

    zero_gradient_takes_all = True

    def __init__(
        self, shared_params=None, tasks=None, *, normalization: str = "l2", **kwargs
    ) -> None:
        super().__init__(shared_params, tasks, **kwargs)
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"MGDA: normalization must be one of {NORMALIZATIONS}, got {normalization!r}"
            )
        self.normalization = normalization

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        # at the accuracy of the Gramian's dtype, on its device (finite: checked by the caller)
        gramian64, _ = as_float64_gramian(gramian, validate=False)
        scales = torch.ones(gramian64.shape[0], dtype=torch.float64, device=gramian64.device)
        if self.normalization in ("l2", "loss+"):
            # 1 / norm, not 1 / (norm + eps): an absolute eps would turn tiny gradients'
            # directions (it is invariant to scaling the losses); a zero gradient gets 0
            norms = gramian64.diagonal().clamp_min(0).sqrt()
            scales = torch.where(
                norms > 0, scales / norms.clamp_min(torch.finfo(torch.float64).tiny), 0.0
            )
        if self.normalization in ("loss", "loss+"):
            if losses is None:
                raise ValueError(f"MGDA: normalization {self.normalization!r} needs the losses")
            scales = scales / (losses.detach().to(gramian64.device, torch.float64).abs() + self.eps)
        weights = min_norm_simplex_float64(gramian64 * scales[:, None] * scales[None, :])
        return (weights * scales).to(gramian.dtype)
