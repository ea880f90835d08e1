"""Drop-in replacements for torch.nn's regression loss modules, running fusedmtl's fused ops.

Each subclasses the torch.nn module it replaces: same constructor, attributes, state_dict and
repr, and ``isinstance(fusedmtl.nn.MSELoss(), torch.nn.MSELoss)`` holds.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.ops import losses

__all__ = ["HuberLoss", "L1Loss", "MSELoss", "SmoothL1Loss"]


class SmoothL1Loss(torch.nn.SmoothL1Loss):
    """:class:`torch.nn.SmoothL1Loss` with fused forward and backward."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return losses.smooth_l1_loss(input, target, reduction=self.reduction, beta=self.beta)


class HuberLoss(torch.nn.HuberLoss):
    """:class:`torch.nn.HuberLoss` with fused forward and backward."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return losses.huber_loss(input, target, reduction=self.reduction, delta=self.delta)


class L1Loss(torch.nn.L1Loss):
    """:class:`torch.nn.L1Loss` with fused forward and backward."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return losses.l1_loss(input, target, reduction=self.reduction)


class MSELoss(torch.nn.MSELoss):
    """:class:`torch.nn.MSELoss` with fused forward and backward."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return losses.mse_loss(input, target, reduction=self.reduction)
