"""Aligned-MTL: aligning the gradient system's condition number (Senushkin et al. 2023)."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl import linalg
from fusedmtl.weighting.gradient_based import GradientWeighting
from fusedmtl.weighting.solvers import as_float64_gramian

SCALE_MODES = ("min", "median", "rmse")


class AlignedMTL(GradientWeighting):
    """Senushkin, Patakin, Kuznetsov, Konushin, "Independent Component Alignment for Multi-Task
    Learning", CVPR 2023.

    With the eigendecomposition M = V diag(lambda) V^T of the Gramian, the aligned system has
    B = sigma V diag(lambda)^-1/2 V^T and c = B w with w = 1/K: the task gradients are replaced
    by orthogonal ones of equal norm sigma spanning the same space, condition number 1.
    Eigenvalues below lambda_max K eps (rank deficiency: identical, opposite or zero gradients)
    are dropped, as in the paper's code, with eps that of the Gramian's dtype. sigma = sqrt of
    the smallest kept eigenvalue ('min', the paper), of their median ('median') or of their mean
    ('rmse').

    Properties (tests/weighting/test_solver_properties.py): permutation invariant, d(s J) =
    s d(J) for s > 0; not non-conflicting (J d = sigma V diag(lambda)^1/2 V^T 1 / K can have
    negative entries), not linear under scaling.
    """

    def __init__(
        self, shared_params=None, tasks=None, *, scale_mode: str = "min", **kwargs
    ) -> None:
        super().__init__(shared_params, tasks, **kwargs)
        if scale_mode not in SCALE_MODES:
            raise ValueError(
                f"AlignedMTL: scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}"
            )
        self.scale_mode = scale_mode

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        m, _ = as_float64_gramian(gramian, validate=False)
        k = m.shape[0]
        eigenvalues, eigenvectors = linalg.eigh(m)
        # the cutoff of the paper's code, at the accuracy of the dtype the Gramian came in
        # (float64's eps on a float32 Gramian keeps its noise eigenvalues, and 'min' collapses)
        kept = eigenvalues > eigenvalues.max() * k * torch.finfo(gramian.dtype).eps
        # Masks, not indexing by kept (no host sync): eigh sorts ascending, so the kept
        # eigenvalues are the last n; all gradients zero (n = 0) gives c = 0.
        n = kept.sum()
        if self.scale_mode == "min":
            sigma_sq = torch.where(kept, eigenvalues, torch.inf).min()
        elif self.scale_mode == "median":  # the lower median, as Tensor.median
            index = (k - n + (n - 1).clamp_min(0) // 2).clamp_max(k - 1)
            sigma_sq = eigenvalues.gather(0, index.reshape(1)).squeeze(0)
        else:
            sigma_sq = torch.where(kept, eigenvalues, 0.0).sum() / n.clamp_min(1)
        inverse_sqrt = torch.where(kept, eigenvalues.clamp_min(torch.finfo(m.dtype).tiny), 1.0)
        inverse_sqrt = torch.where(kept, inverse_sqrt.rsqrt(), 0.0)
        sigma = torch.where(n > 0, sigma_sq, 0.0).clamp_min(0).sqrt()
        b = sigma * (eigenvectors * inverse_sqrt) @ eigenvectors.T
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64, device=m.device)
        return (b @ weights).to(gramian.dtype)
