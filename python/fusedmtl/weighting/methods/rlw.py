"""Random Loss Weighting (Lin et al. 2022; docs/METHODS.md, section 3)."""

from __future__ import annotations

import torch

from fusedmtl.weighting.loss_based import LossWeighting, weighted_total
from fusedmtl.weighting.state import SharedGenerator


class RLW(LossWeighting):
    """Random Loss Weighting, Lin et al., "Reasonable Effectiveness of Random Weighting",
    TMLR 2022: w = softmax(z), z ~ N(0, I) drawn afresh each step. The draws come from a CPU
    generator seeded by ``seed`` (default: a seed drawn on rank 0 and broadcast), so every rank
    draws the same weights; its state is part of the state_dict."""

    has_step_state = True
    has_host_step_state = True

    def __init__(self, tasks, seed: int | None = None, **kwargs) -> None:
        super().__init__(tasks, **kwargs)
        self._generator = SharedGenerator(seed)

    @classmethod
    def _example_settings(cls, num_tasks, shared_params):
        return {"seed": 0}

    def total(self, values):
        z = torch.randn(self.num_tasks, generator=self._generator.get(), dtype=torch.float64)
        return weighted_total(values, torch.softmax(z, 0))

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "generator": self._generator.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        self._generator.load_state_dict(state["generator"])
