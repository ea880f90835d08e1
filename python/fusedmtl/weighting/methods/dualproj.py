"""DualProj: the mean gradient projected onto the dual cone of the task gradients (docs/METHODS.md,
section 4)."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.weighting.gradient_based import GradientWeighting
from fusedmtl.weighting.solvers import as_float64_gramian, dual_cone_ridge, lower_bounded_min_norm


class DualProj(GradientWeighting):
    """Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017
    (equation 11), as torchjd's DualProj applies it to multi-task learning.

    The weighted mean g_u = sum_i u_i g_i (u = 1 / K unless ``pref_vector`` is given) is projected
    onto the dual cone {x : <x, g_j> >= 0 for all j}: the nearest update that conflicts with no
    task. On the Gramian M the projection is d = sum_i c_i g_i with
    c = argmin_{v >= u} v^T M v (componentwise), the non-negative QP UPGrad solves once per task,
    solved here once by :mod:`~fusedmtl.weighting.solvers` (exact, no QP library).

    Args:
        shared_params, tasks: see :class:`~fusedmtl.weighting.gradient_based.GradientWeighting`.
        pref_vector: u, ``Tensor[K]`` of non-negative floats, or None for 1 / K.
        **kwargs: the options of :class:`~fusedmtl.weighting.gradient_based.GradientWeighting`.
    """

    def __init__(
        self, shared_params=None, tasks=None, *, pref_vector: Tensor | None = None, **kwargs
    ) -> None:
        super().__init__(shared_params, tasks, **kwargs)
        if pref_vector is not None:  # None: 1 / K, for the K of the Gramian
            pref_vector = torch.as_tensor(pref_vector, dtype=torch.float64).reshape(-1)
        if pref_vector is not None and (
            (self.num_tasks is not None and pref_vector.numel() != self.num_tasks)
            or bool((pref_vector < 0).any())
        ):
            raise ValueError(
                f"DualProj: pref_vector must be {self.num_tasks} non-negative floats, "
                f"got {pref_vector}"
            )
        self.register_buffer("pref_vector", pref_vector)

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        k = gramian.shape[0]
        pref = self.pref_vector
        M, resolution = as_float64_gramian(gramian, validate=False)
        pref = torch.full((k,), 1.0 / k, dtype=torch.float64) if pref is None else pref
        lower = pref.to(M.device, torch.float64)[None, :]
        return lower_bounded_min_norm(M, lower, dual_cone_ridge(resolution))[0].to(gramian.dtype)
