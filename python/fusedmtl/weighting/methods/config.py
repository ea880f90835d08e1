"""ConFIG: the conflict-free direction of equal cosine to every task gradient (docs/METHODS.md,
section 4)."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl import linalg
from fusedmtl.weighting.gradient_based import GradientWeighting


class ConFIG(GradientWeighting):
    """Liu, Chu, Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
    Networks", ICLR 2025 (arXiv:2408.11104), equation 2, as in its official code and torchjd.

    With the unit gradients u_i = g_i / ||g_i|| (rows U), the direction is
    v = U^+ w / ||U^+ w|| (w = ``pref_vector``, all ones by default: v has the same cosine with
    every g_i) and the update d = (sum_i <g_i, v>) v. On the Gramian: U^+ = U^T (U U^T)^+ and
    U U^T = S M S with S = diag(1 / ||g_i||), so v is along sum_i a_i g_i with a = S (S M S)^+ w,
    and d = sum_i c_i g_i with c = a (1^T M a) / (a^T M a). Zero gradients get u_i = 0, as in
    the paper's code.

    The pseudo-inverse of the K x K matrix S M S drops eigenvalues below ``rcond`` times the
    largest: M has a rounding error of ~eps relative to its largest entry, so smaller eigenvalues
    are noise (torchjd's pseudo-inverse of U, G columns wide, cuts singular values at G eps).

    Args:
        shared_params, tasks: see :class:`~fusedmtl.weighting.gradient_based.GradientWeighting`.
        pref_vector: w, ``Tensor[K]``, or None for ones.
        rcond: relative eigenvalue cutoff of the pseudo-inverse (float64).
        **kwargs: the options of :class:`~fusedmtl.weighting.gradient_based.GradientWeighting`.
    """

    def __init__(
        self,
        shared_params=None,
        tasks=None,
        *,
        pref_vector: Tensor | None = None,
        rcond: float = 1e-12,
        **kwargs,
    ) -> None:
        super().__init__(shared_params, tasks, **kwargs)
        if pref_vector is not None:  # None: ones, for the K of the Gramian
            pref_vector = torch.as_tensor(pref_vector, dtype=torch.float64).reshape(-1)
        if (
            pref_vector is not None
            and self.num_tasks is not None
            and pref_vector.numel() != self.num_tasks
        ):
            raise ValueError(
                f"ConFIG: pref_vector must have {self.num_tasks} entries, got {pref_vector}"
            )
        self.register_buffer("pref_vector", pref_vector)
        self.rcond = float(rcond)

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        M = gramian.detach().to(torch.float64)
        M = 0.5 * (M + M.T)
        norms = M.diagonal().clamp_min(0).sqrt()
        inv_norms = torch.where(norms > 0, 1.0 / norms.clamp_min(torch.finfo(M.dtype).tiny), 0.0)
        normalized = M * inv_norms[:, None] * inv_norms[None, :]
        weights = self.pref_vector
        if weights is None:
            weights = torch.ones(M.shape[0], dtype=torch.float64, device=M.device)
        weights = weights.to(M.device)
        a = inv_norms * (linalg.pinv(normalized, rtol=self.rcond) @ weights)
        Ma = M @ a
        sq_norm = a @ Ma
        # d = 0 when the direction vanishes (all gradients zero), without a branch on the value.
        scale = torch.where(
            sq_norm > 0, Ma.sum() / sq_norm.clamp_min(torch.finfo(M.dtype).tiny), 0.0
        )
        return (a * scale).to(gramian.dtype)
