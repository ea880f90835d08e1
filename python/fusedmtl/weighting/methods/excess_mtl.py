"""ExcessMTL: task weights driven by estimated excess risks (docs/METHODS.md, section 4)."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.weighting import fsdp
from fusedmtl.weighting.gradient_based import GradientWeighting


class ExcessMTL(GradientWeighting):
    """He, Zhou, Zhao, "Robust Multi-Task Learning with Excess Risks", ICML 2024, as torchjd's
    ExcessMTLWeighting.

    Each task's excess risk is estimated by a second-order expansion with an AdaGrad diagonal
    Hessian (equations 6-7): with S_i the running sum of g_i squared element-wise (this step's
    included), E_i = sum over coordinates of g_i^2 / sqrt(S_i + 1e-7). Scale processing
    (section 3.2) divides by a baseline: E_i / (E0_i + 1e-7), E0 the mean E over the
    ``n_warmup_steps`` first steps (during which the weights stay 1/K), or, with no warm-up,
    the first step's E (used raw at that step, as the official code and LibMTL). The weights
    then take one exponentiated-gradient step (equation 9), w <- softmax(log w + eta E), from
    1/K; c = w.

    Not Gramian-based: E needs the gradients coordinate by coordinate, so S is K
    gradient-sized buffers per shared parameter (K times the shared parameters' memory, as
    torchjd's K x G state), and E is one multi-tensor-style pass per step over the gradients
    (per parameter, no K x G temporary; unscaled from a GradScaler's loss scale). S, w, E0, the
    warm-up sum and the step count are in the state_dict, and are updated only on steps with
    finite gradients (under on_nonfinite='ignore', the step count and phase advance).
    ``coefficients(gramian)`` alone is not available (E is not a function of the Gramian), nor
    is representation mode (S would be of the features). Under FSDP2, S is sharded like the
    parameters and E summed over the shards. The paper recommends a warm-up of three epochs.

    Args:
        shared_params, tasks: see :class:`~fusedmtl.weighting.gradient_based.GradientWeighting`.
        robust_step_size: eta > 0 (1.0).
        n_warmup_steps: steps of uniform weights whose E are averaged into E0, >= 0 (0).
        **kwargs: the options of :class:`~fusedmtl.weighting.gradient_based.GradientWeighting`.
    """

    needs_full_gramian = False
    _host_state = True  # (its step counter and warm-up phase: Python values)
    representation_mode = False  # (the running sums are of the parameters' gradients)

    def __init__(
        self,
        shared_params=None,
        tasks=None,
        *,
        robust_step_size: float = 1.0,
        n_warmup_steps: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(shared_params, tasks, **kwargs)
        if not robust_step_size > 0 or n_warmup_steps < 0:
            raise ValueError(
                "ExcessMTL: needs robust_step_size > 0 and n_warmup_steps >= 0, got "
                f"{robust_step_size} and {n_warmup_steps}"
            )
        self.robust_step_size, self.n_warmup_steps = float(robust_step_size), int(n_warmup_steps)
        k = self.num_tasks or 0
        self.register_buffer("weights", torch.full((k,), 1.0 / max(k, 1), dtype=torch.float64))
        self.register_buffer("baseline", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("warmup_sum", torch.zeros(k, dtype=torch.float64))
        if self._shared is not None:
            for i in range(k):
                for p, param in enumerate(self._shared):
                    self.register_buffer(f"sq_grad_sum_{i}_{p}", torch.zeros_like(param))
        # Python ints and bools: the phase is chosen without a device read
        self.steps_done, self.has_baseline = 0, False
        self._pending: tuple[Tensor, float] | None = None

    def _task_table(self, shared, values, scale, representation, owned):
        inverse = 1.0 / scale
        excess = []
        for i, row in enumerate(shared):
            terms = []
            for p, g in enumerate(row):
                if g is None:
                    continue
                # (under FSDP2 the sums are DTensors like the parameters: their local shards)
                total = fsdp.local(getattr(self, f"sq_grad_sum_{i}_{p}"))
                sq = (g * inverse).square() if scale != 1.0 else g.square()
                terms.append((sq / (total + sq + 1e-7).sqrt()).sum(dtype=torch.float64))
            excess.append(torch.stack(terms).sum() if terms else None)
        device = next((e.device for e in excess if e is not None), self.weights.device)
        zero = torch.zeros((), dtype=torch.float64, device=device)
        excess = torch.stack([zero if e is None else e for e in excess])
        if self._sharding is not None:  # the sums over this rank's shards: add them up
            excess = self._sharding.sum_over_shards(excess)
        self._pending = (excess, scale)
        return shared, scale

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        if self._pending is None:
            raise ValueError(
                "ExcessMTL.coefficients: its excess risks come from the gradients element-wise, "
                "not from the Gramian: use backward or step"
            )
        excess = self._pending[0]
        device = excess.device
        weights = self.weights.to(device)
        step, self.steps_done = self.steps_done, self.steps_done + 1
        if step < self.n_warmup_steps:
            self.warmup_sum = self.warmup_sum.to(device) + excess
            self.weights = weights
            return weights.to(gramian.dtype)
        if not self.has_baseline:
            self.has_baseline = True
            if self.n_warmup_steps > 0:
                self.baseline = self.warmup_sum.to(device) / self.n_warmup_steps
                excess = excess / (self.baseline + 1e-7)
            else:  # the first step's excess risks are the baseline, and are used raw
                self.baseline = excess
        else:
            excess = excess / (self.baseline.to(device) + 1e-7)
        # in log space: a huge excess risk saturates the weights instead of overflowing
        self.weights = torch.softmax(weights.log() + self.robust_step_size * excess, 0)
        return self.weights.to(gramian.dtype)

    def _commit(self, table) -> None:
        inverse = 1.0 / self._pending[1]
        finite = self._step_finite  # a tensor when the host did not read it: mask the update
        for i, row in enumerate(table):
            for p, g in enumerate(row):
                if g is None:
                    continue
                total = fsdp.local(getattr(self, f"sq_grad_sum_{i}_{p}"))
                if finite is None:
                    total.addcmul_(g, g, value=inverse * inverse)
                else:
                    updated = total.addcmul(g, g, value=inverse * inverse)
                    total.copy_(torch.where(finite.to(total.device), updated, total))
        self._pending = None

    def get_extra_state(self) -> dict:
        return {
            **super().get_extra_state(),
            "steps_done": self.steps_done,
            "has_baseline": self.has_baseline,
        }

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        self.steps_done, self.has_baseline = int(state["steps_done"]), bool(state["has_baseline"])
