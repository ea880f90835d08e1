"""Every loss rescaled to the main task's magnitude (docs/METHODS.md, section 3)."""

from __future__ import annotations

from fusedmtl.weighting.loss_based import LossWeighting, weighted_total


class AnchorToMain(LossWeighting):
    """total = L_main + sum_{i != main} L_i / sg(L_i / L_main): every loss rescaled each step to
    the magnitude of the main task's loss."""

    def __init__(self, tasks, main: int | str = 0, eps: float = 1e-8, **kwargs) -> None:
        super().__init__(tasks, **kwargs)
        self.main = self.task_names.index(main) if isinstance(main, str) else int(main)
        if not 0 <= self.main < self.num_tasks:
            raise ValueError(
                f"AnchorToMain: main task {main!r} is not one of the {self.num_tasks} tasks"
            )
        self.eps = float(eps)

    def total(self, values):
        weights = values[self.main] / (values + self.eps)
        weights[self.main] = 1.0
        return weighted_total(values, weights)
