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

    def constants(self, like: Tensor) -> tuple[Tensor, ...]:
        r = self.preference.to(like)
        floor = torch.tensor(_NORM_EPS, dtype=like.dtype, device=like.device)
        return r, torch.linalg.vector_norm(r).clamp_min(floor), floor, torch.zeros_like(floor)

    def total(self, values: Tensor) -> tuple[Tensor, Tensor]:
        # (0-dim tensors, not Python floats, as operands: a wrapped scalar costs an op's time)
        r, r_norm, floor, zero = self._constants(values)
        linear = r @ values
        l_norm = torch.linalg.vector_norm(values)
        floored = l_norm.clamp_min(floor)
        denominator = r_norm * floored
        cosine = linear / denominator
        # below the floor the denominator is constant: only the numerator's derivative remains
        through_norm = torch.where(l_norm > floor, cosine / (floored * floored), zero)
        cosine_grad = r / denominator - through_norm * values
        return (
            torch.add(linear, cosine, alpha=-self.lambda_),
            torch.add(r, cosine_grad, alpha=-self.lambda_),
        )
