"""STCH: smooth Tchebycheff scalarisation (docs/METHODS.md, section 3)."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.weighting.loss_based import LossWeighting


class STCH(LossWeighting):
    """Lin, Zhang, Liu, Zhang, "Smooth Tchebycheff Scalarization for Multi-Objective
    Optimization", ICML 2024, as its multi-task code applies it.

    The total is the smoothed max of the normalised log-losses,
    total = K mu log sum_i exp(p_i log(L_i / n_i + eps) / mu), with n the nadir point (the mean
    loss of the nadir phase, or given), p the preference (ones by default) and mu > 0 the
    smoothing (mu -> 0: the Tchebycheff max; large mu: the mean of the log-losses); its weights
    are w_i = K p_i softmax_i(p_j log(L_j / n_j + eps) / mu) / (L_i + eps n_i). Before, the
    schedule of the paper's code, in steps rather than epochs: ``warmup_steps`` steps of
    sum_i log(L_i + eps) (w_i = 1 / (L_i + eps)), then ``nadir_steps`` more of the same while the
    losses are averaged into n. A given ``nadir`` skips the averaging. The step count, the running
    sum and n are in the state_dict; skipped steps (non-finite losses) count for nothing.

    Args:
        tasks: the number of tasks K, or their names.
        mu: the smoothing parameter, > 0.
        warmup_steps: steps of the log-loss total before the nadir phase (>= 0).
        nadir_steps: steps whose losses are averaged into the nadir point (>= 1 unless ``nadir``).
        nadir: the nadir point n, ``Tensor[K]`` of positive floats, or None to average it.
        preference: p, ``Tensor[K]`` of positive floats, or None for ones.
        eps: keeps the logarithms finite at zero losses (the paper's code: 1e-20).
        **kwargs: the options of :class:`~fusedmtl.weighting.base.Weighting`.
    """

    has_step_state = True  # restored when GradScaler skips the step
    has_host_step_state = True

    def __init__(
        self,
        tasks,
        mu: float = 1.0,
        warmup_steps: int = 0,
        nadir_steps: int = 1,
        nadir: Tensor | None = None,
        preference: Tensor | None = None,
        eps: float = 1e-20,
        **kwargs,
    ) -> None:
        super().__init__(tasks, **kwargs)
        k = self.num_tasks
        if not mu > 0:
            raise ValueError(f"STCH: mu must be positive, got {mu}")
        if warmup_steps < 0 or (nadir is None and nadir_steps < 1):
            raise ValueError(
                f"STCH: needs warmup_steps >= 0 and nadir_steps >= 1 (or a nadir), got "
                f"{warmup_steps} and {nadir_steps}"
            )
        self.mu, self.eps = float(mu), float(eps)
        self.warmup_steps = int(warmup_steps)
        self.nadir_steps = 0 if nadir is not None else int(nadir_steps)
        for name, vector in (("nadir", nadir), ("preference", preference)):
            if vector is not None:
                vector = torch.as_tensor(vector, dtype=torch.float64).reshape(-1)
                if vector.numel() != k or not bool((vector > 0).all()):
                    raise ValueError(f"STCH: {name} must be {k} positive floats, got {vector}")
        self.register_buffer(
            "nadir",
            torch.ones(k, dtype=torch.float64)
            if nadir is None
            else torch.as_tensor(nadir, dtype=torch.float64).reshape(-1).clone(),
        )
        self.register_buffer(
            "preference",
            torch.ones(k, dtype=torch.float64)
            if preference is None
            else torch.as_tensor(preference, dtype=torch.float64).reshape(-1).clone(),
        )
        self.register_buffer("nadir_sum", torch.zeros(k, dtype=torch.float64))
        # A Python int: the phase is chosen without reading device memory.
        self.steps = 0

    def total(self, values: Tensor) -> tuple[Tensor, Tensor]:
        step, self.steps = self.steps, self.steps + 1
        if step < self.warmup_steps + self.nadir_steps:
            if step >= self.warmup_steps:
                self.nadir_sum += values.detach().to(self.nadir_sum)
                if step + 1 == self.warmup_steps + self.nadir_steps:
                    self.nadir.copy_(self.nadir_sum / self.nadir_steps)
            return (values + self.eps).log().sum(), 1 / (values + self.eps)
        nadir, eps, slopes, scales, offsets, k_mu = self._constants(values)
        scaled = torch.addcdiv(eps, values, nadir).log() * slopes
        shares = torch.softmax(scaled, 0)
        # logsumexp(s) = max s - log softmax(s) at the max (= 1 / sum_i exp(s_i - max s), >= 1/K):
        # four ops on the softmax already there, not torch.logsumexp's six
        value = (scaled.max() - shares.max().log()) * k_mu
        return value, shares * scales / (values + offsets)

    def constants(self, like: Tensor) -> tuple[Tensor, ...]:
        """(n, eps, p / mu, K p, eps n, K mu) in ``like``'s dtype, tensors: a Python float operand
        costs about an op's time (the nadir phase's n, once it is over)."""
        nadir, preference = self.nadir.to(like), self.preference.to(like)
        k, eps = self.num_tasks, torch.full_like(nadir, self.eps)
        k_mu = torch.tensor(k * self.mu, dtype=like.dtype, device=like.device)
        return nadir, eps, preference / self.mu, k * preference, self.eps * nadir, k_mu

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "steps": self.steps}

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        self.steps = int(state["steps"])
