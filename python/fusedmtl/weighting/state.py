"""Two kinds of method state that live outside buffers and parameters, checkpointed through the
module's extra state: an optimizer the method runs on its own weights, and a random generator
that draws the same numbers on every rank."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from fusedmtl.weighting import distributed
from fusedmtl.weighting.base import cast_like


def adam(lr: float, weight_decay: float = 0.0) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
    """The methods' default weight optimizer: torch.optim.Adam, its fused implementation, whose
    step counter stays a tensor the kernel increments (the for-loop one reads it on the host
    every step, a device synchronisation on CUDA); the same update to the bit. BufferOptimizer
    runs its kernel directly after the first step (see _fused_adam_arguments)."""
    return lambda params: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)


class BufferOptimizer:
    """An optimizer over one buffer of ``module`` (learned task weights or logits), stepped with
    gradients the method computes in closed form.

    Built on first use, after the module has been moved to its device (moving replaces the
    buffer, which an optimizer built earlier would still hold), and rebuilt if that happens later.
    """

    def __init__(
        self,
        module: nn.Module,
        buffer: str,
        factory: Callable[[list[Tensor]], torch.optim.Optimizer],
    ) -> None:
        self._module, self._buffer, self._factory = module, buffer, factory
        self._optimizer: torch.optim.Optimizer | None = None
        self._pending: dict | None = None
        # (optimizer, its options, _fused_adam_arguments) of the last fused step: see step
        self._fused: tuple | None = None

    def step(self, grad: Tensor) -> None:
        target = getattr(self._module, self._buffer)
        if self._optimizer is None or self._optimizer.param_groups[0]["params"][0] is not target:
            if self._optimizer is not None:  # moved (.to, .double()): carry the state over, cast
                self._pending = self._optimizer.state_dict()
            self._optimizer = self._factory([target])
            if self._pending is not None:
                self._optimizer.load_state_dict(self._pending)
                self._pending = None
        grad = cast_like(grad, target)
        # The kernel's arguments are built once per optimizer and kept while the options a
        # scheduler may change stay as they were (building them cost ~25 us a step, cold).
        optimizer = self._optimizer
        if type(optimizer) is torch.optim.Adam:
            group = optimizer.param_groups[0]
            options = (group["lr"], group["betas"], group["weight_decay"], group["eps"])
            cached = self._fused
            if cached is None or cached[0] is not optimizer or cached[1] != options:
                fused = _fused_adam_arguments(optimizer, target)
                cached = self._fused = None if fused is None else (optimizer, options, fused)
            if cached is not None:  # torch's fused Adam kernel itself, as Adam.step would call it
                steps, tensors, kernel_options = cached[2]
                steps[0].add_(1)  # (Adam.step's _foreach_add_ on the one step count)
                torch._fused_adam_([target], [grad], *tensors, steps, **kernel_options)
                return
        target.grad = grad
        self._optimizer.step()
        target.grad = None

    def state_dict(self) -> dict | None:
        return self._optimizer.state_dict() if self._optimizer is not None else self._pending

    def load_state_dict(self, state: dict | None) -> None:
        # A copy: the state's tensors stay the source module's (the optimizer steps them in place).
        self._optimizer, self._pending = None, copy.deepcopy(state)


def _fused_adam_arguments(optimizer: torch.optim.Optimizer, target: Tensor):
    """(state steps, state tensors, options) to run a fused torch.optim.Adam's step on
    ``target`` with torch's kernel directly, or None to call optimizer.step(): another optimizer,
    options the kernel call below does not cover, or no state yet (the first step creates it).

    Why: Optimizer.step's profiling and hook wrapper, its grouping by device and dtype and Adam's
    state checks cost ~60 us of Python for K numbers, ~340 us right after a model's forward pass
    (cold caches: measured in the training step), several times the kernel. The same kernel with
    the same arguments: the same update to the bit (tested). Optimizer hooks are not called: the
    optimizer is the method's own."""
    if type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1:
        return None
    group = optimizer.param_groups[0]
    state = optimizer.state.get(target)
    plain = {
        "fused": True,
        "amsgrad": False,
        "capturable": False,
        "differentiable": False,
        "decoupled_weight_decay": False,
    }
    if not state or any(group.get(key) != value for key, value in plain.items()):
        return None
    scaled = any(getattr(optimizer, name, None) is not None for name in ("grad_scale", "found_inf"))
    if scaled or not isinstance(group["lr"], float | int):
        return None
    beta1, beta2 = group["betas"]
    options = {
        "amsgrad": False,
        "lr": float(group["lr"]),
        "beta1": float(beta1),
        "beta2": float(beta2),
        "weight_decay": group["weight_decay"],
        "eps": group["eps"],
        "maximize": group["maximize"],
    }
    tensors = ([state["exp_avg"]], [state["exp_avg_sq"]], [])  # (no max_exp_avg_sq: no amsgrad)
    return [state["step"]], tensors, options


class SharedGenerator:
    """A CPU generator seeded by ``seed``, or by a seed rank 0 draws and broadcasts on first use,
    so randomised methods draw the same numbers on every rank."""

    def __init__(self, seed: int | None) -> None:
        self._seed = seed
        self._generator: torch.Generator | None = None

    def get(self) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(distributed.shared_seed(self._seed))
        return self._generator

    # Saving must not draw the seed: only rank 0 may be saving, and drawing is a collective.
    def state_dict(self) -> Tensor | None:
        return self._generator.get_state() if self._generator is not None else None

    def load_state_dict(self, state: Tensor | None) -> None:
        if state is not None:
            self._generator = torch.Generator()
            self._generator.set_state(state)
