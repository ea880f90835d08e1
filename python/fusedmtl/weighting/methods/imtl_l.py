"""IMTL-L: learned loss scales that equalise the scaled losses (docs/METHODS.md, section 3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fusedmtl.weighting.base import cast_like
from fusedmtl.weighting.loss_based import LossWeighting


class IMTLL(LossWeighting):
    """Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021, the loss-balance part
    (IMTL-L, section 3.2): learnable s_i (an nn.Parameter starting at ``init``; give it to the
    optimizer with the model's parameters), total = sum_i (exp(s_i) L_i - s_i).

    The weights are w_i = exp(s_i). d total / d s_i = exp(s_i) L_i - 1, so gradient descent on s
    drives every scaled loss exp(s_i) L_i towards 1: the tasks' losses are balanced whatever their
    units, and s_i is not pushed to -infinity as an unregularised scale would be. (The full IMTL,
    :class:`~fusedmtl.weighting.IMTL`, applies these scales to the losses whose gradients IMTL-G
    then weighs.)

    Args:
        tasks: the number of tasks K, or their names.
        init: the initial s_i (0: unit scales).
        **kwargs: the options of :class:`~fusedmtl.weighting.base.Weighting`.
    """

    def __init__(self, tasks, init: float = 0.0, **kwargs) -> None:
        super().__init__(tasks, **kwargs)
        self.log_scales = nn.Parameter(torch.full((self.num_tasks,), float(init)))

    def total(self, values: Tensor) -> tuple[Tensor, Tensor]:
        log_scales = cast_like(self.log_scales, values)
        weights = torch.exp(log_scales)
        return (weights * values - log_scales).sum(), weights
