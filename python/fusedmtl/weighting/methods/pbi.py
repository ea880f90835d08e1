"""PBI: penalty-based boundary intersection (docs/METHODS.md, section 3)."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.weighting.loss_based import LossWeighting

_EPS = 1e-12  # under d2's square root, as torchjd: its gradient stays finite on the direction


class PBI(LossWeighting):
    """Zhang & Li, "MOEA/D: A Multiobjective Evolutionary Algorithm Based on Decomposition",
    IEEE TEVC 2007 (the PBI decomposition), as torchjd's PBI scalarizer.

    With f = L - z (z the reference, ideal point; the origin by default) and w^ = w / norm(w)
    the preference direction, d1 = <f, w^> is the distance along it and
    d2 = sqrt(norm(f - d1 w^)^2 + 1e-12) the distance to it; total = d1 + theta d2, whose
    derivative is w_i = w^_i + theta (f - d1 w^)_i / d2 (closed form). theta = 0 is the
    projection on the direction; the paper uses 5. The preference and reference are buffers;
    resample ``preference`` (e.g. from a Dirichlet) between steps to cover a Pareto front.

    Args:
        tasks: the number of tasks K, or their names.
        theta: the penalty on d2, >= 0 (5.0).
        preference: ``Tensor[K]`` of non-negative floats, not all 0, or None for ones.
        reference: ``Tensor[K]``, a lower bound of the losses, or None for zeros.
        **kwargs: the options of :class:`~fusedmtl.weighting.base.Weighting`.
    """

    def __init__(
        self,
        tasks,
        theta: float = 5.0,
        preference: Tensor | None = None,
        reference: Tensor | None = None,
        **kwargs,
    ) -> None:
        super().__init__(tasks, **kwargs)
        if not theta >= 0:
            raise ValueError(f"PBI: theta must be >= 0, got {theta}")
        self.theta = float(theta)
        k = self.num_tasks
        preference = _vector("preference", preference, k, torch.ones(k, dtype=torch.float64))
        if bool((preference < 0).any()) or not bool((preference > 0).any()):
            raise ValueError(f"PBI: preference must be non-negative, not all 0, got {preference}")
        self.register_buffer("preference", preference)
        self.register_buffer(
            "reference", _vector("reference", reference, k, torch.zeros(k, dtype=torch.float64))
        )

    def constants(self, like: Tensor) -> tuple[Tensor, Tensor]:
        direction = self.preference.to(like)
        eps = torch.tensor(_EPS, dtype=like.dtype, device=like.device)  # (a float costs an op)
        return direction / torch.linalg.vector_norm(direction), self.reference.to(like), eps

    def total(self, values: Tensor) -> tuple[Tensor, Tensor]:
        direction, reference, eps = self._constants(values)
        shifted = values - reference
        along = shifted @ direction
        perpendicular = shifted - along * direction  # (torchjd's roundings: d2 ~ 0 amplifies them)
        distance = (perpendicular @ perpendicular + eps).sqrt()
        return (
            torch.add(along, distance, alpha=self.theta),
            torch.add(direction, perpendicular / distance, alpha=self.theta),
        )


def _vector(name: str, vector, k: int, default: Tensor) -> Tensor:
    if vector is None:
        return default
    vector = torch.as_tensor(vector, dtype=torch.float64).reshape(-1).clone()
    if vector.numel() != k or not bool(vector.isfinite().all()):
        raise ValueError(f"{name} must be {k} finite floats, got {vector}")
    return vector
