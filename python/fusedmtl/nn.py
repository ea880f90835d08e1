"""Drop-in replacements for torch.nn's regression loss modules, running fusedmtl's fused ops, and
the heteroscedastic loss module.

Each drop-in subclasses the torch.nn module it replaces: same constructor, attributes, state_dict
and repr, and ``isinstance(fusedmtl.nn.MSELoss(), torch.nn.MSELoss)`` holds.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.losses import functional, heteroscedastic

__all__ = ["HeteroscedasticLoss", "HuberLoss", "L1Loss", "MSELoss", "SmoothL1Loss"]


class SmoothL1Loss(torch.nn.SmoothL1Loss):
    """:class:`torch.nn.SmoothL1Loss` with fused forward and backward."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return functional.smooth_l1_loss(input, target, reduction=self.reduction, beta=self.beta)


class HuberLoss(torch.nn.HuberLoss):
    """:class:`torch.nn.HuberLoss` with fused forward and backward."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return functional.huber_loss(input, target, reduction=self.reduction, delta=self.delta)


class L1Loss(torch.nn.L1Loss):
    """:class:`torch.nn.L1Loss` with fused forward and backward."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return functional.l1_loss(input, target, reduction=self.reduction)


class MSELoss(torch.nn.MSELoss):
    """:class:`torch.nn.MSELoss` with fused forward and backward."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return functional.mse_loss(input, target, reduction=self.reduction)


class HeteroscedasticLoss(torch.nn.Module):
    """Heteroscedastic regression loss (Kendall & Gal 2017) as a module:
    ``forward(input, target, log_var)`` is :func:`fusedmtl.heteroscedastic_loss` with this module's
    ``kind`` ('l2' | 'l1' | 'smooth_l1'), ``beta`` and ``reduction``; see there for the formulas,
    shapes and dtypes. ``HeteroscedasticLoss('l2')`` is :class:`torch.nn.GaussianNLLLoss`
    (``full=False``, ``eps`` -> 0) with var = exp(log_var). No parameters: log_var comes from the
    model.
    """

    def __init__(self, kind: str = "l2", beta: float = 1.0, reduction: str = "mean") -> None:
        super().__init__()
        self.kind = kind
        self.beta = beta
        self.reduction = reduction

    def forward(self, input: Tensor, target: Tensor, log_var: Tensor) -> Tensor:
        return heteroscedastic.heteroscedastic_loss(
            input, target, log_var, kind=self.kind, beta=self.beta, reduction=self.reduction
        )

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, beta={self.beta}, reduction={self.reduction!r}"
