"""CR-MOGM: another method's coefficients smoothed by a moving average (docs/METHODS.md, 4)."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.weighting.gradient_based import GradientWeighting


class CRMOGM(GradientWeighting):
    """Zhou, Zhang, Jiang, Liu, Zhu, Gong, Liu, "On the Convergence of Stochastic Multi-Objective
    Gradient Manipulation and Beyond", NeurIPS 2022 (the correlation-reduced weights), as
    torchjd's CRMOGMWeighting.

    With lambda_hat the coefficients the ``base`` method computes from this step's Gramian, the
    coefficients are lambda_t = alpha lambda_{t-1} + (1 - alpha) lambda_hat_t, lambda_0 =
    ``initial_weights`` or, if None, lambda_hat_1 (so the first step is the base method's).
    The moving average reduces the correlation between the weights and the step's stochastic
    gradients that biases stochastic MGDA-like methods; the paper's Corollary 1 raises alpha
    towards 1 as the learning rate decays (set ``alpha`` between steps).

    The base is a coefficients-from-the-Gramian method (a module of this one: its state is in
    this state_dict too); methods that change the gradients the coefficients apply to
    (DB-MTL, TrimmedMean, GradDrop, ExcessMTL) are refused. lambda is a float64 buffer moved
    to the Gramian's device on first use; neither it nor the base's state moves on skipped
    steps.

    Args:
        shared_params, tasks: see :class:`~fusedmtl.weighting.gradient_based.GradientWeighting`.
        base: the smoothed method, a GradientWeighting built without shared parameters (e.g.
            ``fusedmtl.weighting.MGDA()``), or None for UPGrad (torchjd's example).
        alpha: the weight of the past in [0, 1] (0.9; 0: the base method, 1: lambda_0 for good).
        initial_weights: ``Tensor[K]``, lambda_0, or None.
        **kwargs: the options of :class:`~fusedmtl.weighting.gradient_based.GradientWeighting`.
    """

    def __init__(
        self,
        shared_params=None,
        tasks=None,
        *,
        base: GradientWeighting | None = None,
        alpha: float = 0.9,
        initial_weights: Tensor | None = None,
        **kwargs,
    ) -> None:
        super().__init__(shared_params, tasks, **kwargs)
        if base is None:
            from fusedmtl.weighting.methods.upgrad import UPGrad

            base = UPGrad()
        if not isinstance(base, GradientWeighting) or (
            type(base)._task_table is not GradientWeighting._task_table
        ):
            raise ValueError(
                "CRMOGM: base must be a GradientWeighting whose coefficients come from the Gramian "
                f"alone, got {type(base).__name__}"
            )
        self.base = base
        self.alpha = alpha
        self.needs_full_gramian = base.needs_full_gramian
        self.zero_gradient_takes_all = base.zero_gradient_takes_all
        k = self.num_tasks
        if initial_weights is not None:
            initial_weights = torch.as_tensor(initial_weights, dtype=torch.float64).reshape(-1)
            if k is not None and initial_weights.numel() != k:
                raise ValueError(f"CRMOGM: initial_weights must be {k} floats")
        self._initial = initial_weights
        self.register_buffer("smoothed", torch.zeros(k or 0, dtype=torch.float64))
        self.started = False  # whether lambda_0 has been taken (a Python bool: no device read)
        if k is not None and base.task_names is None:
            base._bind_task_count(k)

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"CRMOGM: alpha must be in [0, 1], got {value}")
        self._alpha = float(value)

    def _init_task_state(self) -> None:
        self.smoothed = torch.zeros(
            self.num_tasks, dtype=torch.float64, device=self.smoothed.device
        )
        if self.base.task_names is None:
            self.base._bind_task_count(self.num_tasks)

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        current = self.base.coefficients(gramian, losses).detach().to(torch.float64)
        if not self.started:  # the first step: lambda_0
            previous = current if self._initial is None else self._initial.to(current.device)
        else:
            previous = self.smoothed.to(current.device)
        self.smoothed = self.alpha * previous + (1 - self.alpha) * current
        self.started = True
        return self.smoothed.to(gramian.dtype)

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "started": self.started}

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        self.started = bool(state["started"])
