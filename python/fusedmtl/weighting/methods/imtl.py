"""IMTL-G: impartial gradient weighting (Liu et al. 2021), on the Gramian."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.weighting.gradient_based import GradientWeighting


class IMTLG(GradientWeighting):
    """Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, "Towards Impartial Multi-task Learning",
    ICLR 2021, the gradient part (IMTL-G).

    Finds d = sum_i a_i g_i, sum a_i = 1, whose projections onto every unit gradient
    u_i = g_i / norm(g_i) are equal. With D the rows g_1 - g_i and U the rows u_1 - u_i
    (i = 2..K): a_{2..K} = g_1 U^T (D U^T)^-1, a_1 = 1 - sum a_{2..K}. Every product comes from
    the Gramian: <g_a, u_b> = M_ab / norm(g_b). The generalised form: the inverse is a
    pseudo-inverse (least squares), so linearly dependent or identical gradients give a finite
    answer (the minimum-norm solution) instead of a singular solve. Zero gradients are given
    norm eps.
    """

    zero_gradient_takes_all = True

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        m = gramian.detach().to("cpu", torch.float64)
        k = m.shape[0]
        if k == 1:
            return torch.ones(1, dtype=gramian.dtype)
        inv_norms = 1.0 / m.diagonal().clamp_min(0).sqrt().clamp_min(self.eps)
        g_dot_u = m * inv_norms[None, :]  # <g_a, u_b>
        first_dot_diff = g_dot_u[0, 0] - g_dot_u[0, 1:]  # g_1 (u_1 - u_i)
        # (D U^T)_ij = <g_1 - g_i, u_1 - u_j>
        du = (g_dot_u[0, 0] - g_dot_u[0, 1:])[None, :] - (g_dot_u[1:, 0][:, None] - g_dot_u[1:, 1:])
        rest = first_dot_diff @ torch.linalg.pinv(du)
        return torch.cat([(1 - rest.sum()).reshape(1), rest]).to(gramian.dtype)
