"""PCGrad: projecting conflicting gradients (Yu et al. 2020), on the Gramian."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.weighting.gradient_based import GradientWeighting
from fusedmtl.weighting.state import SharedGenerator


class PCGrad(GradientWeighting):
    """Yu, Kumar, Gupta, Levine, Hausman, Finn, "Gradient Surgery for Multi-Task Learning",
    NeurIPS 2020 (Algorithm 1).

    For each task i, g'_i starts as g_i; for each other task j, in a random order drawn per i,
    if <g'_i, g_j> < 0 then g'_i -= <g'_i, g_j> / norm(g_j)^2 g_j. The update is sum_i g'_i.
    Done on the K x K Gramian: with g'_i = sum_k C_ik g_k (C starts as the identity), the dot
    products are (C M)_ij and a projection subtracts <g'_i, g_j> / M_jj from C_ij; the
    coefficients are the column sums of C. A zero g_j (M_jj = 0) projects nothing.

    The orders come from a generator seeded by ``seed`` (default: drawn on rank 0, broadcast), so
    every rank projects in the same order; its state is part of the state_dict.

    No host synchronisation: the K orders are drawn on the host from that CPU generator (no
    device value is read; they are copied to the device asynchronously), and the projections run
    for all K tasks at once, K steps of a few tensor ops with masks (:func:`pcgrad_coefficients`).
    """

    _host_state = True  # (see GradientWeighting._coefficients_or_passthrough)

    def __init__(
        self, shared_params=None, tasks=None, *, seed: int | None = None, **kwargs
    ) -> None:
        super().__init__(shared_params, tasks, **kwargs)
        self._generator = SharedGenerator(seed)

    @classmethod
    def _example_settings(cls, num_tasks, shared_params):
        return {"seed": 0}

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        orders = draw_orders(self._generator.get(), gramian.shape[0], gramian.device)
        return pcgrad_coefficients(gramian, orders)

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "generator": self._generator.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        self._generator.load_state_dict(state["generator"])


def draw_orders(generator: torch.Generator, k: int, device: torch.device, n: int | None = None):
    """K random orders, one per task, drawn in task order from the CPU ``generator``
    (``torch.randperm(n, generator=generator)`` for each, n = k by default), as a
    ``Tensor[K, n]`` int64 on ``device``: host work that reads no device value, copied to the
    device through pinned memory without waiting for it."""
    orders = torch.stack(
        [torch.randperm(k if n is None else n, generator=generator) for _ in range(k)]
    )
    if torch.device(device).type == "cuda":
        orders = orders.pin_memory().to(device, non_blocking=True)
    return orders.to(device)


def pcgrad_coefficients(gramian: Tensor, orders: Tensor) -> Tensor:
    """PCGrad's coefficients for the projection orders ``orders`` (``Tensor[K, K]`` int64, row i
    the order in which task i is projected onto the others), from the Gramian ``Tensor[K, K]``.

    Task i's sequence is independent of the others', so all K run at once: at step t each task i
    takes j = orders[i, t] and, where j != i, M_jj > 0 and <g'_i, g_j> = (C M)_ij < 0, subtracts
    <g'_i, g_j> / M_jj from C_ij (masks, no branch). Returns the column sums of C, ``Tensor[K]``
    in the Gramian's dtype and device."""
    m = gramian.detach().to(torch.float64)
    k = m.shape[0]
    unit = torch.eye(k, dtype=torch.float64, device=m.device)
    rows = torch.arange(k, device=m.device)
    diagonal = m.diagonal()
    projections = unit
    for t in range(k):
        j = orders[:, t]
        dots = (projections @ m).gather(1, j[:, None]).squeeze(1)  # <g'_i, g_j>
        norm_sq = diagonal[j]
        project = (j != rows) & (norm_sq > 0) & (dots < 0)
        step = torch.where(project, dots / torch.where(norm_sq > 0, norm_sq, 1.0), 0.0)
        projections = projections - unit[j] * step[:, None]
    return projections.sum(0).to(gramian.dtype)
