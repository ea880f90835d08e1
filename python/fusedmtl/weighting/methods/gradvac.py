"""GradVac: gradient vaccine towards EMA cosine targets (docs/METHODS.md, section 4)."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.weighting.gradient_based import GradientWeighting
from fusedmtl.weighting.methods.pcgrad import draw_orders
from fusedmtl.weighting.state import SharedGenerator


class GradVac(GradientWeighting):
    """Wang, Tsvetkov, Firat, Cao, "Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models", ICLR 2021, on the Gramian as torchjd's
    GradVacWeighting.

    For each task i, and each other task j in a random order: with phi = cos(g'_i, g_j) and the
    target phi_hat_ij (an EMA of past cosines, from 0), if phi < phi_hat_ij then
    g'_i += ||g'_i|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) /
    (||g_j|| sqrt(1 - phi_hat^2) + eps) g_j, which raises the cosine to phi_hat; then
    phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi. The update is sum_i g'_i. With
    g'_i = sum_k C_ik g_k every quantity is a product with the Gramian, and c_k = sum_i C_ik.
    The orders come from a CPU generator seeded by ``seed`` (default: a seed drawn on rank 0 and
    broadcast); the targets phi_hat (a K x K float64 buffer) and the generator are in the
    state_dict. The targets are not updated on skipped steps.

    No host synchronisation: the orders are drawn on the host from the CPU generator (no device
    value is read), and the K tasks' sequences run at once, K - 1 steps of a few tensor ops with
    masks (:func:`gradvac_coefficients`).

    Args:
        shared_params, tasks: see :class:`~fusedmtl.weighting.gradient_based.GradientWeighting`.
        beta: the EMA rate of the targets in [0, 1] (torchjd's default 0.5; the paper uses 0.01).
        seed: the generator's seed, or None for one shared by rank 0.
        **kwargs: the options of :class:`~fusedmtl.weighting.gradient_based.GradientWeighting`
            (``eps`` is added to the denominators, as torchjd's).
    """

    _host_state = True  # (see GradientWeighting._coefficients_or_passthrough)

    def __init__(
        self,
        shared_params=None,
        tasks=None,
        *,
        beta: float = 0.5,
        seed: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(shared_params, tasks, **kwargs)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"GradVac: beta must be in [0, 1], got {beta}")
        self.beta = float(beta)
        self._generator = SharedGenerator(seed)
        k = self.num_tasks or 0  # 0: sized by the first Gramian (coefficients-only use)
        self.register_buffer("targets", torch.zeros(k, k, dtype=torch.float64))

    @classmethod
    def _example_settings(cls, num_tasks, shared_params):
        return {"seed": 0}

    def _init_task_state(self) -> None:
        # (K learned from a Gramian or a loaded state: the targets, then loaded, take its size)
        k = self.num_tasks
        self.targets = torch.zeros(k, k, dtype=torch.float64, device=self.targets.device)

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        k = gramian.shape[0]
        if self.targets.numel() == 0:
            self.targets = torch.zeros(k, k, dtype=torch.float64, device=self.targets.device)
        orders = draw_orders(self._generator.get(), k, gramian.device, n=k - 1)
        coeffs, targets = gradvac_coefficients(gramian, self.targets, orders, self.beta, self.eps)
        self.targets.copy_(targets)
        return coeffs

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "generator": self._generator.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        self._generator.load_state_dict(state["generator"])


def gradvac_coefficients(
    gramian: Tensor, targets: Tensor, orders: Tensor, beta: float, eps: float
) -> tuple[Tensor, Tensor]:
    """GradVac's coefficients and new targets for the orders ``orders`` (``Tensor[K, K - 1]``
    int64: row i holds indices into the other tasks j != i, in increasing j), from the Gramian
    ``Tensor[K, K]`` and the targets ``Tensor[K, K]`` float64.

    Task i's sequence reads only its own row of C and of the targets, so all K run at once,
    with masks where phi >= phi_hat (w = 0). Returns (``Tensor[K]`` in the Gramian's dtype,
    ``Tensor[K, K]`` float64, both on the Gramian's device)."""
    M = gramian.detach().to(torch.float64)
    k = M.shape[0]
    targets = targets.to(M.device, torch.float64)
    norms = M.diagonal().clamp_min(0).sqrt()
    unit = torch.eye(k, dtype=torch.float64, device=M.device)
    rows = torch.arange(k, device=M.device)
    C = unit
    dots = M  # row i: <g'_i, g_j> for every j
    for t in range(k - 1):
        j = orders[:, t] + (orders[:, t] >= rows).long()  # the index among the others
        norm_i = (dots * C).sum(-1).clamp_min(0).sqrt()
        phi = dots.gather(1, j[:, None]).squeeze(1) / (norm_i * norms[j] + eps)
        target = targets.gather(1, j[:, None]).squeeze(1)
        sin_phi = (1 - phi * phi).clamp_min(0).sqrt()
        sin_target = (1 - target * target).clamp_min(0).sqrt()
        w = norm_i * (target * sin_phi - phi * sin_target) / (norms[j] * sin_target + eps)
        w = torch.where(phi < target, w, 0.0)
        C = C + unit[j] * w[:, None]
        dots = dots + w[:, None] * M[j]
        targets = torch.where(unit[j] > 0, ((1 - beta) * target + beta * phi)[:, None], targets)
    return C.sum(0).to(gramian.dtype), targets
