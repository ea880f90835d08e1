"""IMTL-G: impartial gradient weighting (Liu et al. 2021), on the Gramian."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl import linalg
from fusedmtl.weighting.gradient_based import GradientWeighting
from fusedmtl.weighting.solvers import as_float64_gramian


class IMTLG(GradientWeighting):
    """Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, "Towards Impartial Multi-task Learning",
    ICLR 2021, the gradient part (IMTL-G).

    Finds d = sum_i a_i g_i, sum a_i = 1, whose projections onto every unit gradient
    u_i = g_i / norm(g_i) are equal. With D the rows g_1 - g_i and U the rows u_1 - u_i
    (i = 2..K): a_{2..K} = g_1 U^T (D U^T)^-1, a_1 = 1 - sum a_{2..K}. Computed without a
    reference task, from the Gramian of the unit gradients (:func:`impartial_weights`), with a
    pseudo-inverse for linearly dependent gradients (the generalisation of Quinton & Rey 2024).

    Properties (tests/weighting/test_solver_properties.py): permutation invariant, d(s J) =
    s d(J) for s > 0; not non-conflicting (d's equal projections are negative when
    sum_i a_i = 1 needs it), not linear under scaling (row scaling leaves C, not d, unchanged).
    """

    zero_gradient_takes_all = True

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        return impartial_weights(gramian).to(gramian.dtype)


def impartial_weights(gramian: Tensor) -> Tensor:
    """IMTL-G's a (sum 1) with <d, u_i> equal for all i, d = sum_i a_i g_i, from the Gramian.

    With M = D C D (D = diag(norm(g_i)), C the Gramian of the unit gradients u_i) and d = G^T a,
    <d, u_i> = (C D a)_i, so the condition is C b = t 1 with b = D a: b = C^+ 1, a = D^+ b
    normalised to sum 1 (the paper's closed form a_{2..K} = g_1 U^T (D U^T)^-1 when C is
    invertible, and torchjd's M^+ norm(g) then). No task is a reference (permutation
    invariant), no eps enters (invariant to scaling the losses), and C^+ is taken on C's spectrum
    cut at the Gramian's resolution (:func:`~fusedmtl.weighting.solvers.as_float64_gramian`),
    so parallel gradients (C = 1 1^T) give b = 1 / K, a_i proportional to 1 / norm(g_i).
    A zero gradient gets a_i = 0. When no nonzero b exists (1 orthogonal to C's range, e.g. g
    and -g), or sum_i b_i / norm(g_i) vanishes, the weights are 0 (d = 0), as torchjd's.

    Args:
        gramian: ``Tensor[K, K]``, symmetric PSD, any float dtype / device.
    Returns:
        ``Tensor[K]`` float64 on the Gramian's device (no host sync).
    """
    m, resolution = as_float64_gramian(gramian, validate=False)
    k = m.shape[0]
    norms = m.diagonal().clamp_min(0).sqrt()
    tiny = torch.finfo(torch.float64).tiny
    inverse_norms = torch.where(norms > 0, 1.0 / norms.clamp_min(tiny), 0.0)
    correlation = m * inverse_norms[:, None] * inverse_norms[None, :]
    eigenvalues, eigenvectors = linalg.eigh(correlation)
    kept = eigenvalues > resolution * eigenvalues[-1].clamp_min(0)
    inverse = torch.where(kept, 1.0 / torch.where(kept, eigenvalues, 1.0), 0.0)
    b = (eigenvectors * inverse) @ (
        eigenvectors.T @ torch.ones(k, dtype=torch.float64, device=m.device)
    )
    v = b * inverse_norms
    total = v.sum()
    # 1^T b = 1^T C^+ 1 >= 0 is 0 when 1 is orthogonal to C's range (1 and b are O(1))
    degenerate = (b.sum() <= resolution * k) | (total.abs() <= resolution * v.abs().sum())
    return torch.where(degenerate, torch.zeros_like(v), v / torch.where(degenerate, 1.0, total))
