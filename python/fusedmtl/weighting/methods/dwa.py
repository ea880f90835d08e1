"""Dynamic Weight Average (Liu et al. 2019; docs/METHODS.md, section 3)."""

from __future__ import annotations

import torch

from fusedmtl.weighting.loss_based import LossWeighting, weighted_total


class DWA(LossWeighting):
    """Dynamic Weight Average, Liu, Johns, Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019: w_i(t) = K softmax_i(r(t-1) / T), r_i(t-1) = L_i(t-1) / L_i(t-2) over
    period mean losses; w = 1 for the first two periods.

    A period is an epoch: call :meth:`end_period` at the end of each, or give ``period_steps``
    to roll over every that many steps.
    """

    has_step_state = True
    # The period's step count and the periods done are Python ints: whether a period closes and
    # whether the weights move is decided on the host, so a step reads no device value and
    # updates the history only when a period closes (no masked update every step).
    has_host_step_state = True

    def __init__(
        self, tasks, temperature: float = 2.0, period_steps: int | None = None, **kwargs
    ) -> None:
        super().__init__(tasks, **kwargs)
        self.temperature = float(temperature)
        if period_steps is not None and period_steps < 1:
            raise ValueError(f"DWA: period_steps must be at least 1 (or None), got {period_steps}")
        self.period_steps = period_steps
        k = self.num_tasks
        self.register_buffer("period_sum", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("history", torch.zeros(2, k, dtype=torch.float64))  # t-2, t-1 means
        self.register_buffer("weights", torch.ones(k, dtype=torch.float64))
        self.period_count = 0
        self.periods_done = 0

    @classmethod
    def _example_settings(cls, num_tasks, shared_params):
        return {"period_steps": 2}  # the weights move within a few steps

    def end_period(self) -> None:
        """Closes the current period (if it has a step): its mean losses enter the history, and
        from the third period on the weights update."""
        if self.period_count == 0:
            return
        means = self.period_sum / self.period_count
        self.history.copy_(torch.stack([self.history[1], means]))
        self.period_sum.zero_()
        self.period_count = 0
        self.periods_done += 1
        if self.periods_done >= 2:
            rates = self.history[1] / self.history[0]
            self.weights.copy_(self.num_tasks * torch.softmax(rates / self.temperature, 0))

    def total(self, values):
        # a copy: end_period below updates the buffer in place
        result = weighted_total(values, self.weights.to(values, copy=True))
        self.period_sum += values.to(self.period_sum)
        self.period_count += 1
        if self.period_steps is not None and self.period_count >= self.period_steps:
            self.end_period()
        return result

    def get_extra_state(self) -> dict:
        return {
            **super().get_extra_state(),
            "period_count": self.period_count,
            "periods_done": self.periods_done,
        }

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        self.period_count = int(state["period_count"])
        self.periods_done = int(state["periods_done"])
