"""The machinery of the loss-based weightings: total = sum_i w_i L_i (docs/METHODS.md, section 3);
the methods are in fusedmtl/weighting/methods/.

Each is a module whose ``forward(losses)`` returns the total loss (so ``w(losses).backward()``
composes with anything) and whose ``backward(losses)`` backpropagates it.

Every method is written as ``total(values) -> (value, weights)`` on the detached losses: the
total's value, and its derivative w_i = d total / d L_i. The module returns
value + sum_i sg(w_i) (L_i - sg(L_i)): the method's value, and the gradient sum_i w_i grad L_i
(the chain rule, for the nonlinear methods too), while learnable state (uncertainty's
log-variances) gets its gradient through the value; a method whose total is sum_i w_i L_i
with weights off the graph (:func:`weighted_total`) returns that sum itself. Under data
parallelism the values are the losses averaged across ranks, so every rank uses the same weights
and the same state gradient, and the model's gradients, averaged by DistributedDataParallel as
usual, are those of one process with the whole batch.
"""

from __future__ import annotations

import copy
import operator
import warnings

import torch
from torch import Tensor

from fusedmtl.weighting.base import Losses, SkipStep, Weighting, cast_like
from fusedmtl.weighting.task_gradients import reachable_leaves


class LossWeighting(Weighting):
    """Base class: subclasses implement :meth:`total`, and set ``has_step_state`` when it
    updates state (see :meth:`backward` with a GradScaler), ``has_host_step_state`` when some of
    that state is not in buffers (a generator, Python counters, an optimizer's state)."""

    has_step_state = False
    has_host_step_state = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # (the extra state before a scaled step, that step's non-finite flag): see backward
        self._pending_restore: tuple[dict, Tensor] | None = None

    def forward(self, losses: Losses) -> Tensor:
        """The weighted total loss, a 0-dim tensor (a leaf with no effect when the step is
        skipped)."""
        if self._pending_restore is not None:  # (tested here: a call costs ~4 us, cold)
            self._resolve_pending_restore()
        return self._weighted(self._checked_losses(losses), stacklevel=5)  # (through __call__)

    def _weighted(self, checked: list[Tensor], stacklevel: int) -> Tensor:
        """forward's total from checked losses; warnings point ``stacklevel`` frames up. (Every op
        here runs every step right after the model's forward pass has flushed the caches, where
        each costs 2-3 times its time in a loop.)"""
        if not all(loss.requires_grad for loss in checked) and torch.is_grad_enabled():
            reaching = [loss.requires_grad for loss in checked]
            for task, reaches in zip(self.task_names, reaching if any(reaching) else ()):
                if not reaches:
                    warnings.warn(
                        f"task {task!r}: its loss does not require grad; it contributes no "
                        "gradient",
                        stacklevel=stacklevel,
                    )
        stacked = torch.stack(checked)  # (in the losses' promoted dtype; backward casts back)
        try:
            values = self._loss_values(stacked.detach())
        except SkipStep:
            return torch.zeros((), requires_grad=True)
        value, weights = self.total(values)
        if weights.requires_grad:  # (a learned weight: its gradient comes through the value)
            weights = weights.detach()
        # (a plain attribute: nn.Module.__setattr__'s registry checks cost ~10 us a step)
        self.__dict__["last_weights"] = weights
        if value is None:  # the weighted sum itself (weighted_total): one dot product
            return torch.dot(cast_like(weights, stacked), stacked)
        difference = stacked - cast_like(values, stacked)
        return cast_like(value, stacked) + torch.dot(cast_like(weights, stacked), difference)

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
        then skips. Without a host read: the buffers are put back with torch.where on the
        device; state on the host (``has_host_step_state``: RLW's and Alternating's generator,
        the step counts of STCH, DWA and InitialLoss, FAMO's optimizer) is put back at the start
        of the next step (or ``state_dict()``), which reads the flag then, after
        ``GradScaler.step`` has itself waited for the step's found_inf, so the read does not
        stall the device."""
        if self._pending_restore is not None:
            self._resolve_pending_restore()
        scaling = grad_scaler is not None and grad_scaler.is_enabled()
        saved = self._step_snapshot() if scaling and self.has_step_state else None
        losses = self._checked_losses(losses)
        # (checked on the losses, not the total: a method's own learned weights would make the
        # total require grad with no loss reaching the model)
        if not any(loss.requires_grad for loss in losses):
            raise RuntimeError(
                f"{type(self).__name__}.backward: no loss requires grad (all are detached)"
            )
        total = self._weighted(losses, stacklevel=3)
        if total.grad_fn is None:  # the step was skipped
            return None
        if scaling:
            total = grad_scaler.scale(total)
        total.backward(retain_graph=retain_graph)
        if saved is not None:
            self._restore_if_nonfinite(saved, _grads_nonfinite(total))
        return self.last_weights

    def _step_snapshot(self) -> tuple[dict, dict | None]:
        """Copies of the buffers (on their device: no sync) and, for host state, of the extra
        state."""
        buffers = {name: b.clone() for name, b in self._buffers.items() if b is not None}
        extra = copy.deepcopy(self.get_extra_state()) if self.has_host_step_state else None
        return buffers, extra

    def _restore_if_nonfinite(self, saved, nonfinite: Tensor | None) -> None:
        if nonfinite is None:  # no gradient reached: nothing the scaler could skip
            return
        buffers, extra = saved
        with torch.no_grad():
            for name, before in buffers.items():
                current = self._buffers[name]
                flag = nonfinite.to(current.device)
                current.copy_(torch.where(flag, before.to(current), current))
        if extra is not None:
            self._pending_restore = (extra, nonfinite)

    def _resolve_pending_restore(self) -> None:
        """The host state's restore after an overflow of the previous scaled step (one read of
        that step's flag, which GradScaler.step has already waited for)."""
        if self._pending_restore is None:  # (every step: no nn.Module.__setattr__ then)
            return
        pending, self._pending_restore = self._pending_restore, None
        if bool(pending[1]):
            self.set_extra_state(pending[0])

    def state_dict(self, *args, **kwargs):
        self._resolve_pending_restore()
        return super().state_dict(*args, **kwargs)

    def constants(self, like: Tensor) -> tuple[Tensor, ...]:
        """What :meth:`total` derives from the buffers alone, in ``like``'s dtype and device
        (e.g. a unit preference direction); read through :meth:`_constants`. Nothing by default."""
        return ()

    def _constants(self, like: Tensor) -> tuple[Tensor, ...]:
        """:meth:`constants`, computed again only when a buffer changes (another tensor, new
        storage, or written in place: its version counter) or ``like``'s dtype or device does.
        Why: converting and normalising K-vectors that rarely change cost a few ops every step."""
        buffers = tuple(b for b in self._buffers.values() if b is not None)
        try:
            key = (like.dtype, like.device, *((b.data_ptr(), b._version) for b in buffers))
        except RuntimeError:  # an inference tensor has no version counter: no cache
            return self.constants(like)
        cached = self.__dict__.get("_constants_cache")
        # (the cache holds the buffers themselves, so a freed one's address is not reused)
        if cached is not None and cached[0] == key and all(map(operator.is_, cached[1], buffers)):
            return cached[2]
        result = self.constants(like)
        self.__dict__["_constants_cache"] = (key, buffers, result)
        return result

    def total(self, values: Tensor) -> tuple[Tensor | None, Tensor]:
        """(the total's value, its derivatives w_i = d total / d L_i) at the detached losses
        ``values`` (Tensor[K], float32 or float64, averaged across ranks); a value of None
        when the total is the weighted sum sum_i w_i L_i itself (:func:`weighted_total`)."""
        raise NotImplementedError


def weighted_total(values: Tensor, weights: Tensor) -> tuple[None, Tensor]:
    """(None, w): the total is sum_i w_i L_i, for weights that do not depend on the losses'
    graph (the module then returns that sum, with no value to add back)."""
    return None, cast_like(weights, values)


def _grads_nonfinite(total: Tensor) -> Tensor | None:
    """Whether a leaf ``total`` reaches has a non-finite .grad (what GradScaler checks): a 0-dim
    bool tensor on the gradients' device, no host read; None if no leaf has a .grad."""
    grads = [leaf.grad for leaf in reachable_leaves(total)[0] if leaf.grad is not None]
    if not grads:
        return None
    devices = {g.device for g in grads}
    norms = [torch.stack(torch._foreach_norm([g for g in grads if g.device == d])) for d in devices]
    return ~torch.cat([n.to(grads[0].device) for n in norms]).isfinite().all()
