"""DB-MTL: dual balancing of loss scales and gradient magnitudes (Lin et al. 2023)."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl import multi_tensor
from fusedmtl.weighting import fsdp
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
    updated only on steps with finite gradients. Each step writes the new averages in one
    multi-tensor pass, beta_t h_i + (1 - beta_t) / L_i g_i, into this step's own gradients
    (``backward``) or into a second set of buffers kept for ``step`` (the caller's gradients are
    not touched, and no K x G memory is allocated, or page-faulted, per step); a step with
    non-finite gradients leaves the averages as they were. Representation mode needs beta = 0
    (features differ from batch to batch).
    """

    needs_full_gramian = False

    def __init__(
        self,
        shared_params=None,
        tasks=None,
        *,
        beta: float = 0.9,
        beta_sigma: float = 0.5,
        **kwargs,
    ) -> None:
        super().__init__(shared_params, tasks, **kwargs)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"DBMTL: beta must be in [0, 1), got {beta}")
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.register_buffer("steps_done", torch.tensor(0))
        self._spare: list[list[Tensor] | None] = [None] * (
            self.num_tasks or 0
        )  # see _spare_averages
        if self.beta > 0 and self._shared is not None:
            for i in range(self.num_tasks):
                for p, param in enumerate(self._shared):
                    self.register_buffer(f"grad_ema_{i}_{p}", torch.zeros_like(param))

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        norms = gramian.diagonal().clamp_min(0).sqrt()
        return norms.max() / norms.clamp_min(self.eps)

    def _loss_weights(self, coeffs: Tensor, values: Tensor) -> Tensor:
        # Between refreshes (refresh_every > 1) c applies to this step's g_i / L_i: the gradient
        # of c_i / L_i * L_i, with the running averages neither read nor updated.
        return coeffs / values.to(coeffs).clamp_min(self.eps)

    def _task_table(self, shared, values, scale, representation, owned):
        if representation and self.beta > 0:
            raise ValueError(
                "DBMTL: representation mode needs beta=0 (no running average over features)"
            )
        if values is None:
            raise ValueError(
                "DBMTL.step: needs the losses (Tensor[K]): its gradients are those of log L_i"
            )
        inverse = 1.0 / (values.double().clamp_min(self.eps) * scale)
        if (
            self.beta == 0
        ):  # h_i = g_i / L_i: in place when the gradients are this step's temporaries
            table = []
            for row, factor in zip(shared, inverse.unbind()):  # 0-dim tensors: no host sync
                present = [p for p, g in enumerate(row) if g is not None]
                grads = [row[p] for p in present]
                # in place only on this step's own dense gradients (autograd may hand back an
                # expanded one, whose elements share memory)
                grads = [
                    g.mul_(factor) if owned and g.is_contiguous() else g * factor for g in grads
                ]
                row = list(row)
                for p, g in zip(present, grads):
                    row[p] = g
                table.append(row)
            return table, 1.0
        beta_t = (
            self.beta / (self.steps_done.to(inverse) + 1) ** self.beta_sigma
        )  # 0-dim, on device
        table = []
        for i, row in enumerate(shared):
            # (under FSDP2 the averages are DTensors like the parameters: their local shards)
            averages = [
                fsdp.local(getattr(self, f"grad_ema_{i}_{p}")) for p in range(len(self._shared))
            ]
            if owned:  # overwrite this step's gradients (a parameter not reached gets a tensor)
                out = [
                    g if g is not None and g.is_contiguous() else torch.empty_like(h)
                    for g, h in zip(row, averages)
                ]
            else:
                out = self._spare_averages(i)
            coeffs = torch.stack([beta_t, (1.0 - beta_t) * inverse[i]])
            # a task gradient that is None counts as zeros, as for the averages' definition
            multi_tensor.combine([averages, list(row)], coeffs, out=out)
            table.append(out)
        return table, 1.0

    def _spare_averages(self, task: int) -> list[Tensor]:
        """The second set of average buffers that step() writes into (not module state, so made
        again after the module moved to another device or dtype)."""
        averages = [
            fsdp.local(getattr(self, f"grad_ema_{task}_{p}")) for p in range(len(self._shared))
        ]
        spare = self._spare[task]
        if spare is None or any(
            s.device != h.device or s.dtype != h.dtype for s, h in zip(spare, averages)
        ):
            self._spare[task] = [torch.empty_like(h) for h in averages]
        return self._spare[task]

    def _commit(self, table) -> None:
        finite = self._step_finite
        if finite is not None:
            # Finiteness not read on the host ('ignore', GradScaler): the table must stay as it
            # is (its non-finite values reach .grad for the scaler to see), so the new averages
            # are copied into the buffers where the step is finite (one more pass over them),
            # and the buffers are not swapped.
            with torch.no_grad():
                self.steps_done += finite.to(self.steps_done.device, self.steps_done.dtype)
                if self.beta > 0:
                    for i, row in enumerate(table):
                        for p, h in enumerate(row):
                            average = fsdp.local(getattr(self, f"grad_ema_{i}_{p}"))
                            average.copy_(torch.where(finite.to(h.device), h, average))
            return
        self.steps_done += 1
        if self.beta > 0:  # the new averages become the buffers; step()'s old ones its spares
            for i, row in enumerate(table):
                spare = self._spare[i]
                previous = [getattr(self, f"grad_ema_{i}_{p}") for p in range(len(row))]
                for p, h in enumerate(row):
                    setattr(self, f"grad_ema_{i}_{p}", fsdp.like(previous[p], h))
                if spare is not None and row is spare:
                    self._spare[i] = [fsdp.local(h) for h in previous]
