"""The machinery of the loss-based weightings: total = sum_i w_i L_i (docs/METHODS.md, section 3);
the methods are in fusedmtl/weighting/methods/.

Each is a module whose ``forward(losses)`` returns the total loss (so ``w(losses).backward()``
composes with anything) and whose ``backward(losses)`` backpropagates it.

Every method is written as ``total(values) -> (value, weights)`` on the detached losses: the
total's value, and its derivative w_i = d total / d L_i. The module returns
value + sum_i sg(w_i) (L_i - sg(L_i)): the method's value, and the gradient sum_i w_i grad L_i
(the chain rule, for the nonlinear methods too), while learnable state (uncertainty's
log-variances) gets its gradient through the value. Under data parallelism the values are the
losses averaged across ranks, so every rank uses the same weights and the same state gradient,
and the model's gradients, averaged by DistributedDataParallel as usual, are those of one
process with the whole batch.
"""

from __future__ import annotations

import copy
import functools
import warnings

import torch
from torch import Tensor

from fusedmtl.weighting.base import Losses, SkipStep, Weighting
from fusedmtl.weighting.task_gradients import reachable_leaves


class LossWeighting(Weighting):
    """Base class: subclasses implement :meth:`total`, and set ``has_step_state`` when it
    updates state (see :meth:`backward` with a GradScaler)."""

    has_step_state = False

    def forward(self, losses: Losses) -> Tensor:
        """The weighted total loss, a 0-dim tensor (a leaf with no effect when the step is
        skipped)."""
        checked = self._checked_losses(losses)
        if torch.is_grad_enabled() and any(loss.requires_grad for loss in checked):
            for task, loss in zip(self.task_names, checked):
                if not loss.requires_grad:
                    warnings.warn(
                        f"task {task!r}: its loss does not require grad; it contributes no "
                        "gradient",
                        stacklevel=3,
                    )
        dtype = functools.reduce(torch.promote_types, (loss.dtype for loss in checked))
        stacked = torch.stack([loss.to(dtype) for loss in checked])
        try:
            values = self._loss_values(stacked.detach())
        except SkipStep:
            return torch.zeros((), requires_grad=True)
        value, weights = self.total(values)
        weights = weights.detach()
        self.last_weights = weights
        return value.to(dtype) + (weights.to(dtype) * (stacked - values.to(dtype))).sum()

    def backward(
        self,
        losses: Losses,
        grad_scaler: torch.amp.GradScaler | None = None,
        retain_graph: bool = False,
    ) -> Tensor | None:
        """Backpropagates the total (scaled by ``grad_scaler`` if given); returns the weights
        (None if the step was skipped).

        With a scaler, a method with step state (``has_step_state``) keeps it as it was when the
        backward pass leaves a non-finite .grad on any leaf the total reaches: the step the scaler
        then skips (one host read of those gradients' finiteness per such step)."""
        scaling = grad_scaler is not None and grad_scaler.is_enabled()
        saved = copy.deepcopy(self.state_dict()) if scaling and self.has_step_state else None
        total = self(losses)
        if not total.requires_grad:
            raise RuntimeError(
                f"{type(self).__name__}.backward: no loss requires grad (all are detached)"
            )
        if total.grad_fn is None:  # the step was skipped
            return None
        if scaling:
            total = grad_scaler.scale(total)
        total.backward(retain_graph=retain_graph)
        if saved is not None and not _grads_finite(total):
            self.load_state_dict(saved)
        return self.last_weights

    def total(self, values: Tensor) -> tuple[Tensor, Tensor]:
        """(the total's value, its derivatives w_i = d total / d L_i) at the detached losses
        ``values`` (Tensor[K], float32 or float64, averaged across ranks)."""
        raise NotImplementedError


def weighted_total(values: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """(sum_i w_i L_i, w) for weights that do not depend on the losses' graph."""
    weights = weights.to(values)
    return (weights * values).sum(), weights


def _grads_finite(total: Tensor) -> bool:
    """Whether every leaf ``total`` reaches has a finite .grad (what GradScaler checks)."""
    grads = [leaf.grad for leaf in reachable_leaves(total, set())[0] if leaf.grad is not None]
    return not grads or bool(torch.stack(torch._foreach_norm(grads)).isfinite().all())
