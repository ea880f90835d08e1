"""The framework every weighting shares: task names, input checks, what users log.

A weighting is a torch.nn.Module that turns K scalar task losses into one update of a shared
model. ``backward(losses)`` writes that update into every parameter's .grad, accumulating like
autograd, so a training loop reads

    weighting.backward(losses)      # losses: a sequence, or a dict {task name: loss}
    optimizer.step()
    optimizer.zero_grad()

State a method keeps (initial losses, histories, learned weights, their optimizer) lives in
buffers, parameters and the module's extra state, so ``state_dict()`` / ``load_state_dict()``
resume a run with exactly the weights it would have had.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from fusedmtl import multi_tensor
from fusedmtl.weighting import distributed

Losses = Sequence[Tensor] | Mapping[str, Tensor]
NONFINITE_POLICIES = ("raise", "skip", "ignore")


def _count(tasks: int | Sequence[str]) -> int:
    return tasks if isinstance(tasks, int) else len(list(tasks))


class SkipStep(Exception):
    """Raised inside a weighting when the step is skipped (non-finite losses, policy 'skip')."""


class Weighting(nn.Module):
    """Base class: task bookkeeping, loss checks and the logged quantities.

    Args:
        tasks: the number of tasks K, or their names (used as keys in :meth:`log`; a dict of
            losses must then have exactly these keys).
        on_nonfinite: what a NaN or infinite loss does: 'raise' (ValueError), 'skip' (a warning,
            and the step leaves every .grad and the method's state untouched) or 'ignore' (no
            check of the losses, and so no host synchronisation for it). Gradient-based methods
            apply the same policy to non-finite task gradients; under 'ignore' (or with a
            GradScaler) those pass through unweighted, so the non-finite .grad is visible.

    Attributes for logging (None before the first step): ``last_weights`` Tensor[K], the weight
    or coefficient each task got; gradient-based methods add ``last_grad_norms`` Tensor[K] and
    ``last_cosine`` Tensor[K, K] (when the method computes the full Gramian, or track_conflict).
    """

    # Whether tasks=None is allowed: K then comes from the first Gramian (coefficients only).
    _tasks_optional = False

    def __init__(self, tasks: int | Sequence[str] | None, on_nonfinite: str = "raise") -> None:
        super().__init__()
        if tasks is None and not self._tasks_optional:
            raise TypeError(f"{type(self).__name__}: tasks (a count or the task names) is required")
        if isinstance(tasks, str):
            raise TypeError(
                f"{type(self).__name__}: tasks must be a count or a sequence of names, got the "
                f"string {tasks!r} (for one task named so: [{tasks!r}])"
            )
        if tasks is None:
            self.task_names, self._named = None, False
        elif isinstance(tasks, int):
            if tasks < 1:
                raise ValueError(f"{type(self).__name__}: tasks must be at least 1, got {tasks}")
            self.task_names = [str(i) for i in range(tasks)]
            self._named = False
        else:
            self.task_names = [str(name) for name in tasks]
            if not self.task_names or len(set(self.task_names)) != len(self.task_names):
                raise ValueError(
                    f"{type(self).__name__}: task names must be distinct and non-empty, got "
                    f"{tasks!r}"
                )
            self._named = True
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"{type(self).__name__}: on_nonfinite must be one of {NONFINITE_POLICIES}, got "
                f"{on_nonfinite!r}"
            )
        self.on_nonfinite = on_nonfinite
        self.register_load_state_dict_pre_hook(_check_tasks_on_load)
        self.last_weights: Tensor | None = None
        self.last_grad_norms: Tensor | None = None
        self.last_cosine: Tensor | None = None
        self._state_checked_on: torch.device | None = None  # see _check_state_device

    @property
    def num_tasks(self) -> int | None:
        return len(self.task_names) if self.task_names is not None else None

    def get_extra_state(self) -> dict:
        """The tasks (names and count), checked when the state is loaded; subclasses add theirs."""
        return {"task_names": list(self.task_names or []), "named": self._named}

    def set_extra_state(self, state: dict) -> None:
        """(The tasks were checked, and adopted if this module's were unnamed, before loading.)"""

    @classmethod
    def example(cls, tasks: int | Sequence[str], shared_params=None, **overrides) -> Weighting:
        """A ready instance with settings fit for tests, the benchmark and the demo (the
        registries LOSS_BASED and GRADIENT_BASED map names to classes; this builds any of them
        the same way).

        Args:
            tasks: the number of tasks K, or their names.
            shared_params: the shared parameters (an iterable of tensors, e.g.
                ``trunk.parameters()``): required by gradient-based methods, ignored by
                loss-based ones.
            **overrides: constructor arguments that replace the example's settings (e.g. the
                priors of PriorLoss computed from the data).

        Returns:
            An instance of ``cls``: its defaults, plus what a method cannot run without or
            runs better with in a short deterministic run (PriorLoss's priors, GradNorm's last
            shared layer, fixed seeds, DWA's period), see :meth:`_example_settings`.
        """
        params = None if shared_params is None else list(shared_params)
        settings = {**cls._example_settings(_count(tasks), params), **overrides}
        return cls._from_settings(tasks, params, settings)

    @classmethod
    def _example_settings(cls, num_tasks: int, shared_params: list[Tensor] | None) -> dict:
        """The constructor arguments :meth:`example` gives beyond the tasks (none by default)."""
        return {}

    @classmethod
    def _from_settings(cls, tasks, shared_params: list[Tensor] | None, settings: dict) -> Weighting:
        return cls(tasks, **settings)

    def log(self) -> dict[str, float]:
        """The last step's weights (and gradient norms and cosine similarities, where known) as
        floats keyed 'weight/<task>', 'grad_norm/<task>', 'cosine/<task>,<task>'. Synchronises
        with the device: call it when logging, not every step."""
        out: dict[str, float] = {}
        names = self.task_names
        if self.last_weights is not None:
            out.update({f"weight/{n}": float(w) for n, w in zip(names, self.last_weights.tolist())})
        if self.last_grad_norms is not None:
            out.update(
                {f"grad_norm/{n}": float(g) for n, g in zip(names, self.last_grad_norms.tolist())}
            )
        if self.last_cosine is not None:
            cosine = self.last_cosine.tolist()
            for i in range(len(names)):
                for j in range(i + 1, len(names)):
                    out[f"cosine/{names[i]},{names[j]}"] = cosine[i][j]
        return out

    # -- input checks ---------------------------------------------------------------------------

    def _checked_losses(self, losses: Losses) -> list[Tensor]:
        """The losses as a list of 0-dim tensors in task order; raises on malformed input."""
        name = type(self).__name__
        if type(losses) is not list and type(losses) is not tuple:
            if isinstance(losses, Mapping):
                keys = [str(k) for k in losses]
                if not self._named and len(keys) == self.num_tasks:  # names from the first dict
                    self.task_names, self._named = keys, True
                if sorted(keys) != sorted(self.task_names):
                    raise ValueError(
                        f"{name}: expected losses for tasks {self.task_names}, got {keys}"
                    )
                by_name = {str(k): v for k, v in losses.items()}
                losses = [by_name[n] for n in self.task_names]
            elif isinstance(losses, Tensor):
                losses = list(losses.unbind()) if losses.dim() == 1 else [losses]
            else:
                losses = list(losses)
        if len(losses) != self.num_tasks:
            raise ValueError(
                f"{name}: expected {self.num_tasks} losses (one per task), got {len(losses)}"
            )
        if type(losses[0]) is Tensor:  # the usual input, checked in one pass (it runs every step)
            device = losses[0].device
            for loss in losses:
                if (
                    type(loss) is not Tensor
                    or loss.ndim
                    or not loss.dtype.is_floating_point
                    or loss.device != device
                ):
                    break
            else:
                if device != self._state_checked_on:
                    self._check_state_device(device)
                return losses
        first = losses[0]
        for task, loss in zip(self.task_names, losses):
            if not isinstance(loss, Tensor):
                raise TypeError(
                    f"{name}: the loss of task {task!r} must be a tensor, got {type(loss).__name__}"
                )
            if loss.numel() != 1:
                raise ValueError(
                    f"{name}: the loss of task {task!r} has shape {tuple(loss.shape)}; expected a "
                    "scalar "
                    "(reduce it with .mean() or .sum() first)"
                )
            if not loss.is_floating_point():
                raise ValueError(
                    f"{name}: the loss of task {task!r} must be floating point, got {loss.dtype}"
                )
            if loss.device != first.device:
                raise ValueError(
                    f"{name}: losses are on different devices ({first.device}, {loss.device})"
                )
        self._check_state_device(first.device)
        return [loss if loss.dim() == 0 else loss.reshape(()) for loss in losses]

    def _check_state_device(self, device: torch.device) -> None:
        """Warns (once per device) when the method's buffers or parameters are on another device
        than its steps: the step then copies them between the devices every time (on CUDA a
        synchronisation), because nothing moves a module but .to()."""
        if device == self._state_checked_on:
            return
        self._state_checked_on = device
        elsewhere = sorted(
            {str(t.device) for t in [*self.parameters(), *self.buffers()] if t.device != device}
        )
        if elsewhere:
            warnings.warn(
                f"{type(self).__name__}: its state is on {', '.join(elsewhere)} and its step on "
                f"{device}: every step copies the state between them (on CUDA a host "
                f"synchronisation); move the weighting with the model: .to({str(device)!r})",
                stacklevel=4,
            )

    def _loss_values(self, detached: Tensor) -> Tensor:
        """The detached losses (Tensor[K]) as float32 or float64, checked by the non-finite policy
        (SkipStep) and averaged across data-parallel ranks (so every rank derives the same
        weights from them)."""
        dtype = detached.dtype
        values = detached if dtype == torch.float32 or dtype == torch.float64 else detached.float()
        # (read on the host: the K values in one read and no op; a reduction and .item() cost
        # twice as much on the CPU, one read all the same on CUDA)
        if self.on_nonfinite != "ignore" and not all(map(math.isfinite, values.tolist())):
            bad = [task for task, ok in zip(self.task_names, values.isfinite().tolist()) if not ok]
            message = f"{type(self).__name__}: non-finite loss for task(s) {bad}"
            if self.on_nonfinite == "raise":
                raise ValueError(message + " (on_nonfinite='skip' skips such steps with a warning)")
            warnings.warn(message + "; skipping this step", stacklevel=4)
            raise SkipStep(message)
        size = distributed.world_size()
        return distributed.sum_(values) / size if size > 1 else values


def cast_like(tensor: Tensor, like: Tensor) -> Tensor:
    """``tensor.to(like)``, without the call when it has like's dtype and device already (a
    dispatch, ~3 us a step right after the model's forward pass)."""
    if tensor.dtype == like.dtype and tensor.device == like.device:
        return tensor
    return tensor.to(like)


def grads_finite(grads: Sequence[Tensor]) -> Tensor:
    """Whether every element of the gradients (one or more) is finite: a 0-dim bool tensor on
    their device, no host read. Where they share a dtype and device, one multi-tensor pass (their
    norm as one task's; as in the refresh step's check of the Gramian, a 16- or 32-bit gradient
    whose square overflows float32, |g| > ~1.8e19, counts as non-finite, as it does in torch's
    norms); torch's foreach norms otherwise (and for tensor subclasses: DTensor)."""
    first = grads[0]
    if all(
        type(g) is Tensor and g.dtype == first.dtype and g.device == first.device for g in grads
    ):
        return multi_tensor.norms([grads]).isfinite().all()
    return torch.stack(torch._foreach_norm(list(grads))).isfinite().all()


def _check_tasks_on_load(module: Weighting, state_dict, prefix, *args) -> None:
    """Before anything is loaded: the state's tasks must be this module's (same count; same names
    in the same order when both are named); unnamed tasks take the state's names."""
    extra = state_dict.get(prefix + "_extra_state")
    if not isinstance(extra, Mapping) or "task_names" not in extra:
        return  # a state saved without them (strict loading reports the missing key)
    saved, named = [str(n) for n in extra["task_names"]], bool(extra.get("named", True))
    name = type(module).__name__
    if module.task_names is None:
        module._bind_task_count(len(saved))
    if len(saved) != module.num_tasks or (named and module._named and saved != module.task_names):
        raise ValueError(
            f"{name}.load_state_dict: the state is of {len(saved)} tasks {saved}, this {name} has "
            f"{module.num_tasks} tasks {module.task_names}"
        )
    if named and not module._named:
        module.task_names, module._named = saved, True
