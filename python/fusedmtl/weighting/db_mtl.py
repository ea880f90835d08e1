"""DB-MTL: dual balancing of loss scales and gradient magnitudes (Lin et al. 2023)."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.weighting.gradient_based import GradientWeighting


class DBMTL(GradientWeighting):
    """Lin, Ye, Xu, Shi, Zhang, Kwok, "Dual-Balancing for Multi-Task Learning", 2023.

    Loss-scale balancing: each task's gradient is that of log L_i, g_i / L_i. Gradient-magnitude
    balancing: with h_i the running average of those gradients, h_i <- g_i / L_i +
    beta_t (h_i - g_i / L_i), beta_t = beta / t^beta_sigma at step t (the paper's code), the
    update is max_j norm(h_j) sum_i h_i / norm(h_i): every task's direction with the largest
    task's magnitude. The coefficients apply to h, from h's Gramian: c_i = max_j norm(h_j) /
    max(norm(h_i), eps).

    The running averages are K gradient-sized buffers per shared parameter (beta = 0 keeps none:
    h_i = g_i / L_i). They are buffers of this module, so state_dict holds them; they are
    updated only on steps with finite gradients. Representation mode needs beta = 0 (features
    differ from batch to batch).
    """

    needs_full_gramian = False

    def __init__(self, shared_params, tasks, *, beta: float = 0.9, beta_sigma: float = 0.5, **kwargs) -> None:
        super().__init__(shared_params, tasks, **kwargs)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"DBMTL: beta must be in [0, 1), got {beta}")
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.register_buffer("steps_done", torch.tensor(0))
        if self.beta > 0:
            for i in range(self.num_tasks):
                for p, param in enumerate(self._shared):
                    self.register_buffer(f"grad_ema_{i}_{p}", torch.zeros_like(param))

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        norms = gramian.diagonal().clamp_min(0).sqrt()
        return norms.max() / norms.clamp_min(self.eps)

    def _task_table(self, shared, values, scale, representation, owned):
        if representation and self.beta > 0:
            raise ValueError("DBMTL: representation mode needs beta=0 (no running average over features)")
        inverse = (1.0 / (values.double().clamp_min(self.eps) * scale)).tolist()
        beta_t = self.beta / float(self.steps_done + 1) ** self.beta_sigma
        table = []
        for i, row in enumerate(shared):
            if self.beta > 0:  # every parameter has an average, reached this step or not
                row = [g if g is not None else torch.zeros_like(self._shared[p]) for p, g in enumerate(row)]
            present = [p for p, g in enumerate(row) if g is not None]
            grads = [row[p] for p in present]
            # g_i / (L_i scale): in place when the gradients are this step's temporaries
            if owned:
                torch._foreach_mul_(grads, inverse[i])
            else:
                grads = torch._foreach_mul(grads, inverse[i])
            if self.beta > 0:
                torch._foreach_lerp_(grads, [getattr(self, f"grad_ema_{i}_{p}") for p in present], beta_t)
            row = list(row)
            for p, g in zip(present, grads):
                row[p] = g
            table.append(row)
        return table, 1.0

    def _commit(self, table) -> None:
        self.steps_done += 1
        if self.beta > 0:  # the new averages are this step's tensors: no copy
            for i, row in enumerate(table):
                for p, g in enumerate(row):
                    setattr(self, f"grad_ema_{i}_{p}", g)
