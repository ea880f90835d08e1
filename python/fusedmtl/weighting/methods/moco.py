"""MoCo: tracked gradients and a regularised MGDA step on their weights (docs/METHODS.md, 4)."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl import multi_tensor
from fusedmtl.weighting import fsdp
from fusedmtl.weighting.gradient_based import GradientWeighting


class MoCo(GradientWeighting):
    """Fernando, Shen, Liu, Chaudhury, Murugesan, Chen, "Mitigating Gradient Bias in
    Multi-objective Learning: A Provably Convergent Approach", ICLR 2023 (Algorithm 1), as
    LibMTL's MoCo.

    At step t, each task's gradient is rescaled to its loss, g^_i = L_i g_i / (norm(g_i) +
    1e-8), and tracked: y_i <- y_i - beta_t (y_i - g^_i), beta_t = beta / t^beta_sigma (y from
    0), which reduces the bias of the stochastic gradients; the weights take one step of the
    regularised MGDA subproblem, lambda <- softmax(lambda - gamma_t (Y Y^T + rho I) lambda),
    gamma_t = gamma / t^gamma_sigma (lambda from 1/K); the update is d = sum_i lambda_i y_i.

    The tracked gradients are K gradient-sized buffers per shared parameter (buffers of this
    module, so state_dict holds them). Each step writes the new y in one multi-tensor pass into
    this step's own gradients (``backward``) or into a second set of buffers (``step``, as
    DB-MTL does), after one pass for the norms; the coefficients come from the Gramian of the
    new y and apply to them. A step with non-finite gradients leaves y, lambda and the step
    count as they were (under on_nonfinite='ignore', y and lambda; the count advances). No
    representation mode (y would be of the features), and the losses are needed
    (``step(task_grads, losses)``). Under FSDP2, y is sharded like the parameters.

    Args:
        shared_params, tasks: see :class:`~fusedmtl.weighting.gradient_based.GradientWeighting`.
        beta, beta_sigma: the tracking rate and its decay (0.5, 0.5: LibMTL's defaults).
        gamma, gamma_sigma: the weights' step size and its decay (0.1, 0.5).
        rho: the l2 regularisation of the weights' step, >= 0 (0).
        **kwargs: the options of :class:`~fusedmtl.weighting.gradient_based.GradientWeighting`.
    """

    _host_state = True  # (its step counter, which sets beta_t and gamma_t: a Python int)
    representation_mode = False  # (the tracked gradients are the parameters')

    def __init__(
        self,
        shared_params=None,
        tasks=None,
        *,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(shared_params, tasks, **kwargs)
        if not 0 < beta <= 1 or not gamma > 0 or not rho >= 0:
            raise ValueError(
                f"MoCo: needs beta in (0, 1], gamma > 0 and rho >= 0, got {beta}, {gamma}, {rho}"
            )
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.gamma, self.gamma_sigma, self.rho = float(gamma), float(gamma_sigma), float(rho)
        k = self.num_tasks or 0
        self.register_buffer("weights", torch.full((k,), 1.0 / max(k, 1), dtype=torch.float64))
        if self._shared is not None:
            for i in range(k):
                for p, param in enumerate(self._shared):
                    self.register_buffer(f"tracked_{i}_{p}", torch.zeros_like(param))
        self._spare: list[list[Tensor] | None] = [None] * k
        self.steps_done = 0  # a Python int: the rates are chosen without a device read

    def _init_task_state(self) -> None:
        k = self.num_tasks
        self.weights = torch.full((k,), 1.0 / k, dtype=torch.float64, device=self.weights.device)

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        M = gramian.detach().to(torch.float64)
        k = M.shape[0]
        gamma_t = self.gamma / (self.steps_done + 1) ** self.gamma_sigma
        weights = self.weights.to(M.device)
        regularised = M + self.rho * torch.eye(k, dtype=torch.float64, device=M.device)
        self.weights = torch.softmax(weights - gamma_t * (regularised @ weights), 0)
        return self.weights.to(gramian.dtype)

    def _task_table(self, shared, values, scale, representation, owned):
        if values is None:
            raise ValueError("MoCo.step: needs the losses (Tensor[K]): g_i is rescaled to L_i")
        squared_norms = multi_tensor.gramian(shared, diagonal_only=True)
        if self._sharding is not None:  # FSDP2: the rows are this rank's shards
            squared_norms = self._sharding.sum_over_shards(squared_norms)
        norms = squared_norms.clamp_min(0).sqrt()
        beta_t = self.beta / (self.steps_done + 1) ** self.beta_sigma
        # the table carries the loss scale: norm(g_i) / scale + 1e-8 is the unscaled norm's
        factors = beta_t * values.to(norms) / (norms + 1e-8 * scale)
        table = []
        for i, row in enumerate(shared):
            tracked = self._tracked(i)
            if owned:  # overwrite this step's gradients (a parameter not reached gets a tensor)
                out = [
                    g if g is not None and g.is_contiguous() else torch.empty_like(y)
                    for g, y in zip(row, tracked)
                ]
            else:
                out = self._spare_tracked(i)
            coeffs = torch.stack([torch.full_like(factors[i], 1.0 - beta_t), factors[i]])
            multi_tensor.combine([tracked, list(row)], coeffs, out=out)
            table.append(out)
        return table, 1.0

    def _tracked(self, task: int) -> list[Tensor]:
        """Task ``task``'s y, one per shared parameter (under FSDP2 DTensors like the parameters:
        their local shards)."""
        return [fsdp.local(getattr(self, f"tracked_{task}_{p}")) for p in range(len(self._shared))]

    def _spare_tracked(self, task: int) -> list[Tensor]:
        """The second set of buffers step() writes into (not module state, so made again after
        the module moved to another device or dtype)."""
        tracked = self._tracked(task)
        spare = self._spare[task]
        if spare is None or any(
            s.device != y.device or s.dtype != y.dtype for s, y in zip(spare, tracked)
        ):
            self._spare[task] = [torch.empty_like(y) for y in tracked]
        return self._spare[task]

    def _commit(self, table) -> None:
        self.steps_done += 1
        finite = self._step_finite
        if finite is not None:
            # Finiteness not read on the host ('ignore', GradScaler): the table goes to .grad as
            # it is, so the new y are copied into the buffers where the step is finite.
            with torch.no_grad():
                for i, row in enumerate(table):
                    for p, y in enumerate(row):
                        tracked = fsdp.local(getattr(self, f"tracked_{i}_{p}"))
                        tracked.copy_(torch.where(finite.to(y.device), y, tracked))
            return
        for i, row in enumerate(table):  # the new y become the buffers; step()'s old its spares
            spare = self._spare[i]
            previous = [getattr(self, f"tracked_{i}_{p}") for p in range(len(row))]
            for p, y in enumerate(row):
                setattr(self, f"tracked_{i}_{p}", fsdp.like(previous[p], y))
            if spare is not None and row is spare:
                self._spare[i] = [fsdp.local(y) for y in previous]

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "steps_done": self.steps_done}

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        self.steps_done = int(state["steps_done"])
