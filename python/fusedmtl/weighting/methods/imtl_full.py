"""IMTL: learned loss scales (IMTL-L) with impartial gradient weights (IMTL-G) (docs/METHODS.md,
section 4)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fusedmtl.weighting import distributed
from fusedmtl.weighting.gradient_based import GradientWeighting
from fusedmtl.weighting.methods.imtl import impartial_weights


class IMTL(GradientWeighting):
    """Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, "Towards Impartial Multi-task Learning",
    ICLR 2021, the hybrid (IMTL, Algorithm 1: IMTL-L and IMTL-G together), as LibMTL's IMTL.

    Learnable s_i (an nn.Parameter from ``init``; give it to the optimizer with the model's
    parameters) scale the losses: L'_i = exp(s_i) L_i. The shared parameters get IMTL-G's
    update on the gradients of the scaled losses, d = sum_i a_i grad L'_i with the impartial
    a of :class:`~fusedmtl.weighting.IMTLG` (from their Gramian); each task-specific parameter
    gets the gradient of its scaled loss; s gets the gradient of IMTL-L's
    sum_i (exp(s_i) L_i - s_i), exp(s_i) L_i - 1 (accumulated into ``log_scales.grad``, times the
    GradScaler's scale when one is given, as the model's gradients), which drives every scaled
    loss towards 1. The returned coefficients are a (those of the scaled losses' gradients).

    ``step(task_grads, losses)`` applies IMTL-G to the gradients given (those of the scaled
    losses, exp(s_i) L_i, are the method's) and, when the (unscaled) losses are given,
    accumulates s's gradient from them. Representation mode and GradScaler as for every
    gradient-based method. The losses' s gradient uses the losses averaged across ranks, so s
    stays the same on every rank.

    Args:
        shared_params, tasks: see :class:`~fusedmtl.weighting.gradient_based.GradientWeighting`.
        init: the initial s_i (0: unit scales).
        **kwargs: the options of :class:`~fusedmtl.weighting.gradient_based.GradientWeighting`.
    """

    zero_gradient_takes_all = True

    def __init__(self, shared_params=None, tasks=None, *, init: float = 0.0, **kwargs) -> None:
        super().__init__(shared_params, tasks, **kwargs)
        self.init = float(init)
        self.log_scales = nn.Parameter(torch.full((self.num_tasks or 0,), self.init))

    def _init_task_state(self) -> None:
        self.log_scales = nn.Parameter(torch.full((self.num_tasks,), self.init))

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        return impartial_weights(gramian).to(gramian.dtype)

    def backward(self, losses, features=None, grad_scaler=None, retain_graph=False):
        """IMTL-G on the gradients of exp(s_i) L_i into the shared parameters' .grad, the scaled
        losses' gradients into the task-specific ones, exp(s_i) L_i - 1 into s's; returns a
        (Tensor[K]; None if the step was skipped). Arguments as
        :meth:`GradientWeighting.backward <fusedmtl.weighting.GradientWeighting.backward>`."""
        self._require_bound("backward")
        checked = self._checked_losses(losses)
        scales = self.log_scales.detach().double().exp()
        # sg(exp(s)): s is learned through its own closed-form gradient, not through the model's
        scaled = [loss * scales[i].to(loss) for i, loss in enumerate(checked)]
        coeffs = super().backward(scaled, features, grad_scaler, retain_graph)
        if coeffs is not None:
            scale = 1.0
            if grad_scaler is not None and grad_scaler.is_enabled():
                scale = grad_scaler.get_scale()
            self._accumulate_scale_grad(torch.stack([loss.detach() for loss in checked]), scale)
        return coeffs

    def step(self, task_grads, losses=None):
        """IMTL-G on ``task_grads`` (K x P, the gradients of the scaled losses), and s's gradient
        from the unscaled ``losses`` (Tensor[K]) when given; returns a."""
        coeffs = super().step(task_grads, losses)
        if coeffs is not None and losses is not None:
            self._accumulate_scale_grad(torch.as_tensor(losses).detach().reshape(-1), 1.0)
        return coeffs

    def _accumulate_scale_grad(self, values: Tensor, scale: float) -> None:
        values = values.to(self.log_scales.device, torch.float64)
        size = distributed.world_size()
        if size > 1:
            values = distributed.sum_(values) / size
        s = self.log_scales.detach().double()
        grad = ((s.exp() * values - 1.0) * scale).to(self.log_scales.dtype)
        if self.log_scales.grad is None:
            self.log_scales.grad = grad
        else:
            self.log_scales.grad.add_(grad)
