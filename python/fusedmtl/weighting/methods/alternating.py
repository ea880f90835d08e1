"""Alternating: one task per step, in a fixed or a random order (docs/METHODS.md, section 3)."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.weighting.loss_based import LossWeighting, weighted_total
from fusedmtl.weighting.state import SharedGenerator

ORDERS = ("cyclic", "random")


class Alternating(LossWeighting):
    """Alternating training: each step optimises one task's loss alone, w = e_t (the classical
    baseline of e.g. Collobert & Weston, "A Unified Architecture for Natural Language Processing",
    ICML 2008, and of Kokkinos, "UberNet", CVPR 2017, which alternate tasks between batches).

    The steps are taken in cycles of K, each task once per cycle: in the order 0, 1, ..., K - 1
    ('cyclic') or in a fresh random permutation per cycle ('random'). Either way the weights
    average to exactly 1/K over a cycle, so in expectation this is equal weighting (``Fixed``),
    with one task's gradient per step. The permutations come from a CPU generator seeded by
    ``seed`` (default: a seed drawn on rank 0 and broadcast, as RLW), so every rank trains the
    same task; the generator, the current cycle and the position in it are in the state_dict.
    Skipped steps (non-finite losses) do not advance the schedule.

    Args:
        tasks: the number of tasks K, or their names.
        order: 'cyclic' or 'random'.
        seed: the generator's seed for 'random' (int), or None for one shared by rank 0.
        **kwargs: the options of :class:`~fusedmtl.weighting.base.Weighting`.
    """

    has_step_state = True  # restored when GradScaler skips the step
    has_host_step_state = True

    def __init__(self, tasks, order: str = "cyclic", seed: int | None = None, **kwargs) -> None:
        super().__init__(tasks, **kwargs)
        if order not in ORDERS:
            raise ValueError(f"Alternating: order must be one of {ORDERS}, got {order!r}")
        self.order = order
        self._generator = SharedGenerator(seed)
        # Python ints, not tensors: choosing the task reads no device memory.
        self._cycle: list[int] = []
        self._position = 0

    @property
    def current_task(self) -> int:
        """The index of the task the next step trains (draws the next cycle if needed)."""
        if self._position >= len(self._cycle):
            self._cycle = self._next_cycle()
            self._position = 0
        return self._cycle[self._position]

    def _next_cycle(self) -> list[int]:
        if self.order == "cyclic":
            return list(range(self.num_tasks))
        return torch.randperm(self.num_tasks, generator=self._generator.get()).tolist()

    def constants(self, like: Tensor) -> tuple[Tensor]:
        return (torch.eye(self.num_tasks, dtype=like.dtype, device=like.device),)

    def total(self, values: Tensor) -> tuple[None, Tensor]:
        (rows,) = self._constants(values)
        task = self.current_task
        self._position += 1
        return weighted_total(values, rows[task].clone())  # e_t (a copy: last_weights is logged)

    def get_extra_state(self) -> dict:
        return {
            **super().get_extra_state(),
            "generator": self._generator.state_dict(),
            "cycle": list(self._cycle),
            "position": self._position,
        }

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        self._generator.load_state_dict(state["generator"])
        self._cycle = [int(t) for t in state["cycle"]]
        self._position = int(state["position"])
