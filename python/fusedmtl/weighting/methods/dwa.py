"""Dynamic Weight Average (Liu et al. 2019; docs/METHODS.md, section 3)."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.weighting.loss_based import LossWeighting, weighted_total


class DWA(LossWeighting):
    """Dynamic Weight Average, Liu, Johns, Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019: w_i(t) = K softmax_i(r(t-1) / T), r_i(t-1) = L_i(t-1) / L_i(t-2) over
    period mean losses; w = 1 for the first two periods.

    A period is an epoch: call :meth:`end_period` at the end of each, or give ``period_steps``
    to roll over every that many steps.
    """

    has_step_state = True

    def __init__(
        self, tasks, temperature: float = 2.0, period_steps: int | None = None, **kwargs
    ) -> None:
        super().__init__(tasks, **kwargs)
        self.temperature = float(temperature)
        self.period_steps = period_steps
        k = self.num_tasks
        self.register_buffer("period_sum", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("period_count", torch.tensor(0))
        self.register_buffer("history", torch.zeros(2, k, dtype=torch.float64))  # t-2, t-1 means
        self.register_buffer("periods_done", torch.tensor(0))
        self.register_buffer("weights", torch.ones(k, dtype=torch.float64))

    @classmethod
    def _example_settings(cls, num_tasks, shared_params):
        return {"period_steps": 2}  # the weights move within a few steps

    def end_period(self) -> None:
        """Closes the current period: its mean losses enter the history, the weights update."""
        self._end_period_where(torch.ones((), dtype=torch.bool, device=self.period_count.device))

    def _end_period_where(self, close: Tensor) -> None:
        """end_period where ``close`` (a 0-dim bool tensor) holds, else nothing: masked on the
        device, so a step reads no device value."""
        close = close & (self.period_count > 0)
        means = self.period_sum / self.period_count.clamp_min(1)
        self.history.copy_(torch.where(close, torch.stack([self.history[1], means]), self.history))
        self.period_sum.copy_(torch.where(close, 0.0, self.period_sum))
        self.period_count.copy_(torch.where(close, 0, self.period_count))
        self.periods_done += close
        rates = self.history[1] / self.history[0]  # (inf or NaN where unused)
        update = close & (self.periods_done >= 2)
        weights = self.num_tasks * torch.softmax(rates / self.temperature, 0)
        self.weights.copy_(torch.where(update, weights, self.weights))

    def total(self, values):
        result = weighted_total(values, self.weights.clone())  # end_period below updates the buffer
        self.period_sum += values.to(self.period_sum)
        self.period_count += 1
        if self.period_steps is not None:
            self._end_period_where(self.period_count >= self.period_steps)
        return result
