"""GradDrop: gradient sign dropout per coordinate (docs/METHODS.md, section 4)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fusedmtl import multi_tensor
from fusedmtl.multi_tensor import reference
from fusedmtl.weighting import distributed, fsdp
from fusedmtl.weighting.gradient_based import GradientWeighting


def _identity(purity: Tensor) -> Tensor:
    return purity


class GradDrop(GradientWeighting):
    """Chen, Ngiam, Huang, Luong, Kretzschmar, Chai, Anguelov, "Just Pick a Sign: Optimizing Deep
    Multitask Models with Gradient Sign Dropout", NeurIPS 2020 (Algorithm 1, lines 10 to 15), as
    torchjd's GradDrop applies it to the task gradients.

    At every coordinate of every shared parameter, the positive sign purity is
    P = (1 + sum_i g_i / sum_i abs(g_i)) / 2 in [0, 1]; with U uniform in [0, 1), drawn per
    coordinate, task i keeps its value where f(P) > U and g_i > 0, or f(P) < U and g_i < 0 (so
    one sign survives: the positive one with probability f(P)): M_i in {0, 1}. The update is
    d = sum_i (l_i + (1 - l_i) M_i) g_i, l the leak (0: no leak; 1: the plain sum). A coordinate
    where every task's value is 0 has P undefined (NaN) and contributes 0.

    Not Gramian-based: P and the masks come from one multi-tensor pass over the K gradients
    (:func:`fusedmtl.multi_tensor.sign_dropout_`; torch operations per parameter for another f;
    no K x G copy), computed in float32 (float64 for float64 gradients); the masked gradients
    (l_i + (1 - l_i) M_i) g_i become the table the coefficients apply to, and the coefficients
    are ones; the logged norms and cosines are the masked gradients'. The masks multiply the
    gradients (rather than select), so a dropped inf or NaN still makes the step non-finite. A
    task gradient that is None counts as zeros.

    The uniforms of step t come from a generator on the gradients' device seeded by (seed, t):
    the same draws on every rank, no host synchronisation, and the state is two integers, the
    seed and the number of steps taken, both in the state_dict. A skipped step (non-finite
    gradients) does not count, so the next step draws what it would have drawn (with a
    GradScaler this reads the step's finiteness on the host; under 'ignore' the count advances).

    Args:
        shared_params, tasks: see :class:`~fusedmtl.weighting.gradient_based.GradientWeighting`.
        f: a monotonically increasing map of P (a tensor) to [0, 1], applied element-wise
            (default: the identity, torchjd's default). Not saved in the state_dict.
        leak: ``Tensor[K]`` of the leaks l_i in [0, 1], or None for zeros.
        seed: the generator's seed, or None for one drawn on rank 0 and broadcast.
        **kwargs: the options of :class:`~fusedmtl.weighting.gradient_based.GradientWeighting`.
    """

    needs_full_gramian = False
    _host_state = True  # (its step counter, which picks the step's stream: a Python int)

    def __init__(
        self,
        shared_params=None,
        tasks=None,
        *,
        f: Callable[[Tensor], Tensor] = _identity,
        leak: Tensor | None = None,
        seed: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(shared_params, tasks, **kwargs)
        k = self.num_tasks
        if leak is not None:
            leak = torch.as_tensor(leak, dtype=torch.float64).reshape(-1).clone()
            if (k is not None and leak.numel() != k) or not bool(((leak >= 0) & (leak <= 1)).all()):
                raise ValueError(f"GradDrop: leak must be {k} floats in [0, 1], got {leak}")
        self.f = f
        self.register_buffer(
            "leak", leak if leak is not None else torch.zeros(k or 0, dtype=torch.float64)
        )
        self._given_seed = seed
        self._seed: int | None = None  # resolved on first use (a collective when None)
        self.steps_done = 0  # a Python int: the step's stream is chosen without a device read

    @classmethod
    def _example_settings(cls, num_tasks, shared_params):
        return {"seed": 0}

    def _init_task_state(self) -> None:
        if self.leak.numel() == 0:
            self.leak = torch.zeros(self.num_tasks, dtype=self.leak.dtype, device=self.leak.device)

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        return torch.ones(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)

    def _task_table(self, shared, values, scale, representation, owned):
        # (P and the masks do not change under the loss scale: the table keeps carrying it)
        if self._seed is None:
            self._seed = distributed.shared_seed(self._given_seed)
        return (
            sign_dropout_table(
                shared,
                self.leak,
                self.f,
                self._step_seed(self.steps_done),
                owned,
                self._shared if self._sharding is not None else None,
            ),
            scale,
        )

    def _step_seed(self, step: int) -> int:
        # a distinct stream per step (Philox / Mersenne Twister seeds: any distinct 63-bit value)
        return (self._seed * 0x9E3779B97F4A7C15 + step) % (2**63)

    def _commit(self, table) -> None:
        self.steps_done += 1

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "seed": self._seed, "steps_done": self.steps_done}

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        if state["seed"] is not None:
            self._seed = int(state["seed"])
        self.steps_done = int(state["steps_done"])


def sign_dropout_table(
    table: list[list[Tensor | None]],
    leak: Tensor,
    f: Callable[[Tensor], Tensor],
    seed: int,
    owned: bool,
    sharded_params: Sequence[Tensor] | None = None,
) -> list[list[Tensor | None]]:
    """The K task gradients after GradDrop's sign dropout: by the multi-tensor kernel
    :func:`fusedmtl.multi_tensor.sign_dropout_` for the identity f (one pass; the P tensors of
    uniforms, as many numbers as one task gradient, alive during it), else parameter by
    parameter with torch operations (the same formulas in the same order: the same bits).

    Args:
        table: K rows of P tensors (None: the task does not reach that tensor, taken as zeros).
        leak: ``Tensor[K]``, the leaks in [0, 1] (any float dtype; moved to the device).
        f: the map of the sign purity, element-wise.
        seed: the seed of this step's uniforms (one generator per device, tensors in order).
        owned: whether the gradients are this step's temporaries (then masked in place where
            contiguous; the others are copied first).
        sharded_params: under FSDP2, the P shared parameters (DTensors) whose shards the table
            holds: the uniforms are drawn at each parameter's whole shape and this rank's part
            kept, so every rank's generator draws the same stream and a sharded run masks what
            one process would.

    Returns:
        K rows of P tensors, (l_i + (1 - l_i) M_i) g_i, of the gradients' shapes and dtypes
        (None where the input was None).
    """
    out = [
        [
            g
            if g is None or (owned and g.is_contiguous())
            else g.clone(memory_format=torch.contiguous_format)
            for g in row
        ]
        for row in table
    ]
    generators: dict[torch.device, torch.Generator] = {}

    def uniforms(p: int) -> Tensor | None:
        like = next((row[p] for row in out if row[p] is not None), None)
        if like is None:
            return None
        if like.device not in generators:
            generators[like.device] = torch.Generator(device=like.device).manual_seed(seed)
        whole = like.shape if sharded_params is None else sharded_params[p].shape
        draw = torch.rand(
            whole, generator=generators[like.device], dtype=like.dtype, device=like.device
        )
        return draw if sharded_params is None else fsdp.local_part(draw, sharded_params[p])

    num_params = len(table[0]) if table else 0
    if f is _identity:
        multi_tensor.sign_dropout_(out, [uniforms(p) for p in range(num_params)], leak)
        return out
    for p in range(num_params):  # any f: torch operations, one parameter at a time
        draw = uniforms(p)
        if draw is None:
            continue
        column = [[row[p] if row[p] is not None else torch.zeros_like(draw)] for row in out]
        reference.sign_dropout_(column, [draw], leak, f)
    return out
