"""COSMOS: linear scalarisation with a cosine reward (docs/METHODS.md, section 3)."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.weighting.loss_based import LossWeighting
from fusedmtl.weighting.methods.pbi import _vector

_NORM_EPS = 1e-8  # torch.nn.functional.cosine_similarity's floor on each norm (torchjd's COSMOS)


class COSMOS(LossWeighting):
    """Ruchte & Grabocka, "Scalable Pareto Front Approximation for Deep Multi-Objective
    Learning", ICDM 2021 (the COSMOS objective), as torchjd's COSMOS scalarizer.

    total = <r, L> - lambda cos(r, L), cos(r, L) = <r, L> / (max(norm(r), 1e-8)
    max(norm(L), 1e-8)): the linear scalarisation with preference r, rewarded for pointing the
    vector of losses along r (what spreads the solutions over the Pareto front). Its derivative
    (closed form) is w = r - lambda (r / (norm(r) norm(L)) - cos L / norm(L)^2) (with norm(L)
    below the floor: r - lambda r / (norm(r) 1e-8)). The paper also feeds r to the model as an
    input and samples it from a Dirichlet per batch: both are left to the caller (``preference``
    is a buffer to reassign).

    Args:
        tasks: the number of tasks K, or their names.
        lambda_: the weight of the cosine term, >= 0 (1.0; the paper uses 0.01 to 8).
        preference: ``Tensor[K]``, r, or None for 1/K.
        **kwargs: the options of :class:`~fusedmtl.weighting.base.Weighting`.
    """

    def __init__(
        self, tasks, lambda_: float = 1.0, preference: Tensor | None = None, **kwargs
    ) -> None:
        super().__init__(tasks, **kwargs)
        if not lambda_ >= 0:
            raise ValueError(f"COSMOS: lambda_ must be >= 0, got {lambda_}")
        self.lambda_ = float(lambda_)
        k = self.num_tasks
        self.register_buffer(
            "preference",
            _vector("COSMOS: preference", preference, k, torch.full((k,), 1.0 / k).double()),
        )

    def total(self, values: Tensor) -> tuple[Tensor, Tensor]:
        r = self.preference.to(values)
        linear = r @ values
        r_norm = r.norm().clamp_min(_NORM_EPS)
        l_norm = values.norm()
        floored = l_norm.clamp_min(_NORM_EPS)
        cosine = linear / (r_norm * floored)
        # below the floor the denominator is constant: only the numerator's derivative remains
        cosine_grad = (
            r / (r_norm * floored)
            - torch.where(l_norm > _NORM_EPS, cosine / (floored * floored), 0.0) * values
        )
        return linear - self.lambda_ * cosine, r - self.lambda_ * cosine_grad
