"""FAMO: fast adaptive multitask optimisation (Liu et al. 2023), loss-based, O(1) per step."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fusedmtl.weighting.base import cast_like
from fusedmtl.weighting.loss_based import LossWeighting
from fusedmtl.weighting.state import BufferOptimizer, adam


class FAMO(LossWeighting):
    """Liu, Liang, Chen, Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023.

    Task logits xi (start at 0), z = softmax(xi). The total is sum_i z_i log(L_i + eps) / c with
    c = sg(sum_i z_i / (L_i + eps)), so the update is sum_i (z_i / (c (L_i + eps))) grad L_i:
    a convex combination in log-loss space that decreases every loss at the same rate.
    From the second step on, before weighting, the logits take one optimizer step on
    J_softmax(xi)^T delta, delta_i = log(L_i(t-1) + eps) - log(L_i(t) + eps), the log-loss
    decrease since the previous step (the paper's practical variant uses the losses of the next
    batch instead of a second forward pass on the same one). No per-task gradients: O(K) extra
    memory and time.

    Args:
        weight_optimizer: params -> optimizer for the logits; default Adam(lr=0.025,
            weight_decay=gamma), as in the paper (torch's fused Adam: no host read).
        gamma: the logits' weight decay (regularisation towards equal weights).
    """

    has_step_state = True
    has_host_step_state = True

    def __init__(
        self,
        tasks,
        gamma: float = 0.01,
        weight_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer] | None = None,
        eps: float = 1e-8,
        **kwargs,
    ) -> None:
        super().__init__(tasks, **kwargs)
        self.eps = float(eps)
        k = self.num_tasks
        self.register_buffer("logits", torch.zeros(k))
        # log(L_i + eps) of the previous step (kept as logarithms: one log per step, not two)
        self.register_buffer("previous_log_losses", torch.full((k,), float("nan")))
        # Whether previous_log_losses holds a step's losses, on the host: the step reads no device
        # value to decide whether the logits move (None: read the buffer once).
        self._has_previous: bool | None = None
        self._optimizer = BufferOptimizer(
            self,
            "logits",
            weight_optimizer or adam(lr=0.025, weight_decay=gamma),
        )

    def total(self, values):
        shifted = values + self.eps
        log_values = shifted.log()
        if self._has_previous is None:  # after construction or a load: one read, not per step
            self._has_previous = not bool(self.previous_log_losses.isnan().any())
        logits = self.logits
        if self._has_previous:
            decrease = self.previous_log_losses - cast_like(log_values, logits)
            # J_softmax^T delta = z * (delta - <z, delta>): softmax's backward, one op not three
            z = torch.softmax(logits, 0)
            self._optimizer.step(torch._softmax_backward_data(decrease, z, 0, logits.dtype))
        self.previous_log_losses.copy_(log_values)
        self._has_previous = True
        # (the logits after the step: the optimizer's buffer)
        z = cast_like(torch.softmax(self.logits, 0), values)
        weights = z / shifted
        norm = weights.sum()
        return torch.dot(z, log_values) / norm, weights / norm

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "optimizer": self._optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        self._optimizer.load_state_dict(state["optimizer"])
        self._has_previous = None  # (the buffers may be loaded after this: read on next use)
