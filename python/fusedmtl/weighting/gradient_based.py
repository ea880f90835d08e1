"""The machinery of the gradient-based weightings (docs/METHODS.md, section 4).

Every method there produces the shared update d = sum_i c_i g_i with coefficients c computed from
the K x K Gramian M_ij = <g_i, g_j> of the task gradients (and, for some, the losses). So a step is
  1. per-task gradients of the shared parameters (K autograd passes, or one batched pass),
  2. averaged across data-parallel ranks (coalesced buckets), when a process group is initialised,
  3. M (or its diagonal) in one multi-tensor pass over them,
  4. c = method.coefficients(M, losses), a tiny K x K problem,
  5. d accumulated into every shared parameter's .grad in a second multi-tensor pass,
and the gradients are never flattened into a K x G matrix. Task-specific parameters get the
gradient of their own loss, from the same autograd passes.

Representation mode (``backward(losses, features=z)``, MGDA-UB): the task gradients are taken with
respect to the shared features z only, the coefficients from their Gramian, and one backward pass
of sum_i c_i dL_i/dz through the trunk gives the shared update.

Amortized coefficients (``refresh_every=n``): only every n-th step takes the per-task gradients;
the steps between reuse the last coefficients in one backward pass of sum_i c_i L_i, the cost of
plain training (see :class:`GradientWeighting`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from fusedmtl import multi_tensor
from fusedmtl.weighting import distributed, fsdp
from fusedmtl.weighting.base import Losses, SkipStep, Weighting, grads_finite
from fusedmtl.weighting.task_gradients import (
    reachable_leaves,
    split_shared_edges,
    task_gradients,
    watch_finite,
    watched_finite,
)

MAX_TASKS = 64  # the multi-tensor kernels hold K x K sums in registers
# The buffers a method's coefficients() may update and a non-finite step (under 'ignore' or a
# GradScaler) puts back on the device: the K-sized state, not gradient-sized averages.
_MAX_STATE_NUMEL = MAX_TASKS * MAX_TASKS


class GradientWeighting(Weighting):
    """Base class of the methods that weight task gradients.

    Args:
        shared_params: the shared parameters (an iterable of tensors, e.g. ``trunk.parameters()``);
            each gets sum_i c_i g_i. Any other parameter a loss reaches is task-specific and gets
            the unweighted gradient of the losses that reach it.
        tasks, on_nonfinite: see :class:`~fusedmtl.weighting.base.Weighting`.
        grad_mode: 'loop' (K autograd passes, the default: measured faster, see the README) or
            'batched' (one pass with is_grads_batched=True).
        track_conflict: compute the full Gramian even when the method needs only its diagonal,
            so ``last_cosine`` is available (one pass either way; more arithmetic).
        eps: keeps norms away from zero in divisions.
        sharded: whether the shared parameters are sharded with FSDP2 (``fully_shard``; see
            :mod:`fusedmtl.weighting.fsdp`): None detects it (every shared parameter a DTensor),
            True requires it, False never takes the sharded path.
        refresh_every: n >= 1. Every n-th :meth:`backward` (the 1st, the (n+1)-th, ...) computes the
            per-task gradients, their Gramian and new coefficients c (a stateful method updates its
            state then, and only then); the n - 1 steps in between reuse c and do one backward pass:
            the shared parameters get the gradient of sum_i c_i L_i, the task-specific ones the
            unweighted gradient of their own loss (as on a refresh step; task i's gradient scaled by
            c_i where it enters the shared part of the graph, see
            :func:`~fusedmtl.weighting.task_gradients.split_shared_edges`). An approximation: c is
            that of gradients up to n - 1 steps old, which the update direction follows only while
            the gradients change slowly (Navon et al. 2022, "Multi-Task Learning as a Bargaining
            Game", update their Nash-MTL weights every few steps the same way). 1 (the default) is
            the exact method. ``last_grad_norms`` and ``last_cosine`` stay those of the last refresh
            step. The step counter and c are in the state dict, so a resumed run refreshes on the
            same steps; a step that is skipped, or whose gradients are non-finite (the GradScaler
            then skips it), does not count. :meth:`step` (gradients given) always computes the
            coefficients. Under FSDP2 a step between refreshes is two backward passes (see
            :mod:`fusedmtl.weighting.fsdp`).

    Subclasses implement :meth:`coefficients` and set ``needs_full_gramian``.
    """

    needs_full_gramian = True
    # Whether one task with an exactly zero gradient takes all the weight (MGDA, IMTL-G): warned
    # once per task, as the shared update is then zero.
    zero_gradient_takes_all = False
    # Whether backward(features=z) is defined: not for methods whose state is per parameter
    # (ExcessMTL's and MoCo's running sums of the parameters' gradients).
    representation_mode = True

    _tasks_optional = True
    # State outside the buffers that coefficients() advances (a torch.optim state, a CPU
    # generator): a GradScaler's overflow step must leave it bitwise as it was, which needs the
    # step's finiteness on the host (see _coefficients_or_passthrough).
    _host_state = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "coefficients" in vars(cls):
            cls.coefficients = _learning_k(vars(cls)["coefficients"])

    def __init__(
        self,
        shared_params=None,
        tasks: int | Sequence[str] | None = None,
        *,
        on_nonfinite: str = "raise",
        grad_mode: str = "loop",
        track_conflict: bool = False,
        eps: float = 1e-8,
        sharded: bool | None = None,
        refresh_every: int = 1,
    ) -> None:
        super().__init__(tasks, on_nonfinite)
        valid = isinstance(refresh_every, int) and not isinstance(refresh_every, bool)
        if not valid or refresh_every < 1:
            raise ValueError(
                f"{type(self).__name__}: refresh_every must be an integer >= 1, got "
                f"{refresh_every!r}"
            )
        self.refresh_every = refresh_every
        # Steps counted since construction (host-side: deciding to refresh reads no device value)
        # and the coefficients of the last refresh step, which the steps between reuse.
        self._refresh_steps = 0
        self._refresh_coeffs: Tensor | None = None
        if self.num_tasks is not None and self.num_tasks > MAX_TASKS:
            raise ValueError(
                f"{type(self).__name__}: at most {MAX_TASKS} tasks (the multi-tensor kernels' "
                f"limit), got {self.num_tasks}"
            )
        params = list(shared_params) if shared_params is not None else None
        if params is not None and not params:
            raise ValueError(f"{type(self).__name__}: no shared parameters given")
        if params is not None and any(
            not isinstance(p, Tensor) or not p.requires_grad for p in params
        ):
            raise ValueError(
                f"{type(self).__name__}: shared parameters must be tensors that require grad"
            )
        if params is not None:  # counted twice in the norms, added twice (or raced) into .grad
            multi_tensor._check_distinct(
                [fsdp.local(p) for p in params], type(self).__name__, "shared parameter"
            )
        # Kept out of the module's parameters: they belong to the model, not the weighting.
        self._shared = params
        self.grad_mode = grad_mode
        self.track_conflict = track_conflict
        self.eps = float(eps)
        self._warned_zero: set[str] = set()
        self._sharding = fsdp.sharding(params, sharded)  # None: not FSDP2
        self._step_finite: Tensor | None = None  # see _coefficients_or_passthrough

    @classmethod
    def _from_settings(cls, tasks, shared_params, settings: dict) -> GradientWeighting:
        if shared_params is None:
            raise ValueError(f"{cls.__name__}.example: a gradient-based method needs shared_params")
        return cls(shared_params, tasks, **settings)

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        """The coefficients c (Tensor[K]) of d = sum_i c_i g_i from the Gramian (Tensor[K, K]; only
        its diagonal is meaningful when ``needs_full_gramian`` is False) and the detached losses
        (Tensor[K]). Stateful methods update their state here."""
        raise NotImplementedError

    def backward(
        self,
        losses: Losses,
        features: Tensor | Sequence[Tensor] | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        retain_graph: bool = False,
    ) -> Tensor | None:
        """Accumulates the method's update into .grad; returns the coefficients (None if the step
        was skipped).

        features: the shared representation z (a tensor or several): differentiate the losses only
            down to z and backpropagate sum_i c_i dL_i/dz through the trunk once.
        grad_scaler: a torch.amp.GradScaler: the losses are scaled for backward, the coefficients
            computed from the unscaled Gramian and losses, so ``grad_scaler.step`` unscales to the
            method's update. Non-finite gradients then pass through unweighted, so the scaler sees
            them and skips the step; the method's state is not updated on such steps.
        """
        self._require_bound("backward")
        losses = self._checked_losses(losses)
        try:
            values = self._loss_values(torch.stack([loss.detach() for loss in losses]))
        except SkipStep:
            return None
        if not any(loss.requires_grad for loss in losses):
            raise RuntimeError(
                f"{type(self).__name__}.backward: no loss requires grad (all are detached)"
            )
        scale = 1.0
        if grad_scaler is not None and grad_scaler.is_enabled():
            losses = [grad_scaler.scale(loss) for loss in losses]
            scale = float(grad_scaler.get_scale())
        if features is not None:
            features = [features] if isinstance(features, Tensor) else list(features)
            if not features:
                raise ValueError(
                    f"{type(self).__name__}.backward: features=[]: give the shared "
                    "representation(s) or None"
                )
            if not self.representation_mode:
                raise ValueError(
                    f"{type(self).__name__}: no representation mode (its state is per shared "
                    "parameter): call backward without features"
                )
        if self._refresh_coeffs is not None and self._refresh_steps % self.refresh_every != 0:
            return self._reuse_coefficients(losses, values, features, grad_scaler, retain_graph)
        if self._sharding is not None:  # FSDP2: per-task gradients through FSDP's backward
            coeffs = fsdp.sharded_backward(
                self, losses, values, scale, grad_scaler, features, retain_graph
            )
            if coeffs is not None and self.refresh_every > 1:
                self._keep_for_refresh(coeffs)
            return coeffs
        grads = task_gradients(
            losses,
            features if features is not None else self._shared,
            self.grad_mode,
            retain_graph=retain_graph or features is not None,
            names=self.task_names,
        )
        if features is not None and not any(grads.reached):
            raise ValueError(
                f"{type(self).__name__}.backward: no loss depends on the features given: pass the "
                "shared representation the heads read"
            )
        if features is None:
            distributed.mean_(
                [g for row in grads.shared for g in row if g is not None]
                + [g for _, g in grads.specific]
            )
        specific = [g for _, g in grads.specific]
        coeffs = self._weigh(
            grads.shared,
            values,
            scale,
            grad_scaler,
            features,
            retain_graph,
            owned=True,
            checked=specific,
        )
        if coeffs is None:
            return None
        if features is not None:  # (else averaged above)
            distributed.mean_([g for _, g in grads.specific])
        _accumulate_grad(grads.specific)
        if self.refresh_every > 1:
            self._keep_for_refresh(coeffs)
        return coeffs

    def _keep_for_refresh(self, coeffs: Tensor) -> None:
        """Keeps a refresh step's coefficients for the steps until the next refresh. A step whose
        gradients are not finite (a GradScaler skips it, 'ignore' lets it through) does not count:
        the schedule lives on the host, so with 'ignore' or a GradScaler this reads the step's
        finiteness on the host, once per refresh step."""
        finite = self._step_finite
        if finite is not None and not bool(finite):
            return
        self._refresh_coeffs = coeffs.detach().clone()
        self._refresh_steps += 1

    def _reuse_coefficients(self, losses, values, features, grad_scaler, retain_graph):
        """A step between refreshes: one backward pass, sum_i c_i L_i for the shared parameters
        (features or not: the trunk's gradient is the same), the unweighted sum of the losses for
        every other leaf they reach before the features, if given (``losses`` are already scaled
        by the GradScaler); under FSDP2, two passes (:meth:`fsdp.Sharding.reuse_backward`).
        Returns c, or None if the step was skipped."""
        coeffs = self._refresh_coeffs
        present = [loss for loss in losses if loss.requires_grad]
        dtype = functools.reduce(torch.promote_types, (loss.dtype for loss in losses))
        weights = self._loss_weights(coeffs, values).to(device=losses[0].device, dtype=dtype)

        def stacked() -> Tensor:
            return torch.stack([loss.to(dtype) for loss in losses])

        def weighted() -> Tensor:
            return (weights * stacked()).sum()

        scaling = grad_scaler is not None and grad_scaler.is_enabled()
        checking = scaling or self.on_nonfinite != "ignore"
        shards: list[tuple[Tensor, Tensor]] = []  # FSDP2: (parameter, this rank's shard)
        watched = None  # (whether the gradients were finite, read as the pass produced them)
        if self._sharding is not None:
            reaching = torch.tensor([loss.requires_grad for loss in losses], device=weights.device)
            rest = torch.where(reaching, (1 - weights) * stacked(), 0).sum()
            local_shards, pairs = self._sharding.reuse_backward(
                losses, weighted(), rest, self._shared, retain_graph
            )
            shards = [(p, g) for p, g in zip(self._shared, local_shards) if g is not None]
        else:
            pairs, watched = self._reuse_backward(
                losses, present, weighted, weights, features, retain_graph, checking
            )
        finite = True
        grads = [g for _, g in [*shards, *pairs]]
        if grads and checking:
            # one host read, as on a refresh step (under FSDP2 of a count every rank agrees on)
            if watched is not None:
                finite = watched
            elif self._sharding is None:
                finite = bool(grads_finite(grads))
            else:
                finite = not bool(self._sharding.sum_over_shards((~grads_finite(grads)).sum()))
        if not finite and not scaling:
            message = f"{type(self).__name__}: non-finite gradients"
            if self.on_nonfinite == "raise":
                raise ValueError(message + " (on_nonfinite='skip' skips such steps with a warning)")
            warnings.warn(message + "; skipping this step", stacklevel=3)
            return None
        _accumulate_grad(pairs)
        with torch.no_grad():
            for p, g in shards:  # (already averaged by FSDP's reduce-scatter)
                if p.grad is None:
                    p.grad = fsdp.like(p, g)
                else:
                    fsdp.local(p.grad).add_(g)
        if finite:
            self._refresh_steps += 1
        self.last_weights = coeffs
        return coeffs

    def _reuse_backward(self, losses, present, weighted, weights, features, retain_graph, watch):
        """(leaf, gradient) pairs of a step between refreshes (``weighted()``: sum_i w_i L_i),
        averaged over ranks: one backward pass of sum_i L_i whose gradient each task's part of
        the graph passes on to the shared part is scaled by w_i
        (task_gradients.split_shared_edges), or, where the graph does not split so, two: the
        heads' backward twice (once per sum), the trunk's once (autograd prunes the first call to
        the nodes that lead to the task-specific leaves). With ``watch``, also whether every
        gradient was finite, read as the pass produced it (task_gradients.watch_finite), or None
        where that was not done (read them after)."""
        stops = list(features or ())
        finite = None
        plain = functools.reduce(torch.add, present)
        if len(present) < len(losses):
            weights = weights[[i for i, loss in enumerate(losses) if loss.requires_grad]]
        split = split_shared_edges(present, weights, self._shared, stops)
        if split is not None:
            specific, token = split
            inputs = [*self._shared, *specific]
            # (before averaging over ranks, which must then agree: only on one)
            watcher = watch_finite(inputs) if watch and distributed.world_size() == 1 else None
            grads = torch.autograd.grad(plain, inputs, retain_graph=retain_graph, allow_unused=True)
            del token  # (disarms a hook the pass did not run, were the graph retained)
            if watcher is not None:
                finite = watched_finite(watcher)
            pairs = [(p, g) for p, g in zip(inputs, grads) if g is not None]
        else:
            shared_ids = {id(p) for p in self._shared}
            specific = [
                leaf for leaf in reachable_leaves(plain, stops)[0] if id(leaf) not in shared_ids
            ]
            specific_grads = (
                torch.autograd.grad(plain, specific, retain_graph=True, allow_unused=True)
                if specific
                else ()
            )
            shared = torch.autograd.grad(
                weighted(), self._shared, retain_graph=retain_graph, allow_unused=True
            )
            pairs = [(p, g) for p, g in zip(self._shared, shared) if g is not None]
            pairs += [(p, g) for p, g in zip(specific, specific_grads) if g is not None]
        distributed.mean_([g for _, g in pairs])
        return pairs, finite

    def _loss_weights(self, coeffs: Tensor, values: Tensor) -> Tensor:
        """The weight of each loss (Tensor[K]) that gives the update sum_i c_i g_i in one
        backward pass, between refreshes: c itself, for methods whose coefficients apply to the
        gradients of the losses (DB-MTL's apply to those of log L_i)."""
        return coeffs

    def get_extra_state(self) -> dict:
        """Adds the refresh counter and the coefficients the steps between refreshes reuse."""
        return {
            **super().get_extra_state(),
            "refresh_steps": self._refresh_steps,
            "refresh_coefficients": self._refresh_coeffs,
        }

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        self._refresh_steps = int(state.get("refresh_steps", 0))
        saved = state.get("refresh_coefficients")
        # A copy: the source module's tensor stays its own.
        self._refresh_coeffs = saved.detach().clone() if saved is not None else None

    def step(
        self,
        task_grads: Sequence[Sequence[Tensor | None]],
        losses: Tensor | Sequence[float] | None = None,
    ) -> Tensor | None:
        """The weighting step alone, for per-task gradients obtained elsewhere: accumulates
        sum_i c_i task_grads[i][p] into the shared parameters' .grad and returns c.

        task_grads: K sequences of P tensors (None where a task does not reach a parameter), in
        the order of the shared parameters, already averaged across ranks if data-parallel
        (under FSDP2: this rank's shards, local tensors or the sharded .grad DTensors).
        losses: Tensor[K] or K floats, for the methods that use them.
        """
        self._require_bound("step")
        table = [list(row) for row in task_grads]
        if len(table) != self.num_tasks or any(len(row) != len(self._shared) for row in table):
            raise ValueError(
                f"{type(self).__name__}.step: expected {self.num_tasks} tasks x "
                f"{len(self._shared)} shared "
                f"parameters of gradients, got {len(table)} x {[len(row) for row in table]}"
            )
        params = self._shared
        if self._sharding is not None:  # FSDP2: the kernels read the local shards
            table = [[fsdp.local(g) for g in row] for row in table]
            params = [fsdp.local(p) for p in params]
        # Checked before any state moves (combine_into_grad_ checks too, after the state update).
        for i, row in enumerate(table):
            for p, (grad, param) in enumerate(zip(row, params)):
                if grad is not None and grad.shape != param.shape:
                    raise ValueError(
                        f"{type(self).__name__}.step: task {i}'s gradient of shared parameter "
                        f"{p} has shape {tuple(grad.shape)}, the parameter {tuple(param.shape)}"
                    )
        if params:
            self._check_state_device(params[0].device)
        values = torch.as_tensor(losses).detach().reshape(-1) if losses is not None else None
        if values is not None and values.numel() != self.num_tasks:
            raise ValueError(
                f"{type(self).__name__}.step: expected {self.num_tasks} losses, got "
                f"{values.numel()}"
            )
        return self._weigh(table, values, 1.0, None, None, False, owned=False)

    def _require_bound(self, what: str) -> None:
        if self._shared is None or self.task_names is None:
            raise ValueError(
                f"{type(self).__name__}.{what}: built without shared_params or tasks, this "
                "instance "
                "only computes coefficients(gramian); give both to the constructor to step"
            )

    def _bind_task_count(self, k: int) -> None:
        """Tasks learned from the first Gramian (or a loaded state): K names, K-sized state."""
        self.task_names = [str(i) for i in range(k)]
        self._init_task_state()

    def _init_task_state(self) -> None:
        """Allocates the state whose size is the number of tasks (none by default)."""

    def _weigh(
        self,
        table,
        values,
        scale: float,
        grad_scaler,
        features,
        retain_graph,
        owned: bool,
        checked: Sequence[Tensor] = (),
    ) -> Tensor | None:
        """Gramian, coefficients, update: everything after the per-task gradients (``owned``:
        the gradients are this step's temporaries, free to be modified; ``checked``: other
        gradients of this step whose finiteness decides, with the Gramian's, whether the step
        counts: the task-specific ones)."""
        representation = features is not None
        table, table_scale = self._task_table(table, values, scale, representation, owned)
        gramian = self._gramian(table, representation)
        size = distributed.world_size()
        if self._sharding is not None and not representation:
            # FSDP2: the table holds this rank's shards of averaged gradients: their Gramians add
            gramian = self._sharding.sum_gramian(gramian, self._not_in_gramian(table, False))
        elif representation and size > 1:
            # The features of different ranks are disjoint parts of the batch: their Gramians add,
            # and each loss is a mean over ranks, hence the 1 / size^2.
            gramian = distributed.sum_(gramian) / size**2
        if table_scale != 1.0:
            gramian = gramian / table_scale**2
        coeffs, finite = self._coefficients_or_passthrough(
            gramian, values, grad_scaler, [*checked, *self._not_in_gramian(table, representation)]
        )
        if coeffs is None:
            return None
        if finite:  # a step the scaler skips (or 'ignore' lets through) leaves the state as it was
            self._commit(table)
        coeffs = coeffs.to(device=gramian.device)
        # The table carries the loss scale: so must the update, which the scaler then unscales.
        applied = coeffs * (scale / table_scale) if scale != table_scale else coeffs
        if representation:
            self._backward_through_trunk(features, table, applied, retain_graph)
        elif self._sharding is not None:
            self._sharding.combine_into_grad_(self._shared, table, applied)
        else:
            multi_tensor.combine_into_grad_(self._shared, table, applied)
        return coeffs

    # -- steps, overridable -----------------------------------------------------------------------

    def _task_table(self, shared, values: Tensor, scale: float, representation: bool, owned: bool):
        """The per-task gradients the coefficients apply to, and the loss scale they carry: the
        gradients themselves by default. (DB-MTL substitutes running averages.)"""
        return shared, scale

    def _commit(self, table) -> None:
        """Called once the step's coefficients are known to be finite: the place to update state
        that depends on the table."""

    def _gramian(self, shared: list[list[Tensor | None]], representation: bool = False) -> Tensor:
        """The Gramian the coefficients are computed from (only the diagonal filled when the
        method needs no more and conflicts are not tracked)."""
        if self.needs_full_gramian or self.track_conflict:
            return multi_tensor.gramian(shared)
        return torch.diag_embed(multi_tensor.gramian(shared, diagonal_only=True))

    def _not_in_gramian(self, table, representation: bool) -> list[Tensor]:
        """The task gradients the Gramian does not cover (their finiteness is checked apart)."""
        return []

    def _coefficients_or_passthrough(
        self, gramian: Tensor, values: Tensor, grad_scaler, checked: Sequence[Tensor] = ()
    ) -> tuple[Tensor | None, bool]:
        """(the method's coefficients, logged, True); with non-finite gradients (in the Gramian
        or ``checked``) either the policy (without a scaler) or ones (with a scaler, which then
        skips the step), and the method's state is not updated.

        Host synchronisation: on_nonfinite 'raise' and 'skip' (without a scaler) read the
        finiteness on the host once per step, as they must tell the user or skip the step.
        'ignore' and the GradScaler path read nothing: the coefficients are computed from the
        Gramian with its non-finite entries replaced (the identity), the state the method updates
        (its buffers of at most ``_MAX_STATE_NUMEL`` elements, and what ``_commit`` does) is put
        back with ``torch.where`` where the step is not finite, and the coefficients are
        ``torch.where(finite, c, 1)``: the same results, and the step compiles into one graph.
        The second element is then True: ``_commit`` runs and masks its own update by
        ``self._step_finite`` (a 0-dim bool tensor; None when the host knows the step is finite).
        Methods with ``_host_state`` (GradNorm's optimizer, PCGrad's and GradVac's generators,
        the step counters of GradDrop, ExcessMTL and MoCo) read the finiteness on the host with a
        GradScaler, so an overflow leaves that state bitwise as it was; under 'ignore' their host
        state advances on a non-finite step."""
        finite = gramian.isfinite().all()
        if checked:
            finite = finite & grads_finite(checked).to(finite.device)
        self._step_finite = None
        host_read = (grad_scaler is None and self.on_nonfinite != "ignore") or (
            grad_scaler is not None and self._host_state
        )
        if host_read:
            if not bool(finite):  # the documented host read of 'raise' and 'skip'
                if grad_scaler is not None:  # (_host_state: the scaler skips this step)
                    self._step_finite = finite
                    ones = torch.ones(self.num_tasks, dtype=gramian.dtype, device=gramian.device)
                    return ones, False
                message = f"{type(self).__name__}: non-finite task gradients"
                if self.on_nonfinite == "raise":
                    raise ValueError(
                        message + " (on_nonfinite='skip' skips such steps with a warning)"
                    )
                warnings.warn(message + "; skipping this step", stacklevel=3)
                return None, False
            coeffs = self.coefficients(gramian, values)
        else:
            self._step_finite = finite
            k = gramian.shape[0]
            identity = torch.eye(k, dtype=gramian.dtype, device=gramian.device)
            safe = torch.where(finite, gramian, identity)
            if values is not None:
                values = torch.where(values.isfinite(), values, torch.ones_like(values))
            saved = {
                name: b.clone() for name, b in self.named_buffers() if b.numel() <= _MAX_STATE_NUMEL
            }
            coeffs = self.coefficients(safe, values)
            with torch.no_grad():
                for name, old in saved.items():
                    new = self.get_buffer(name)
                    if new is not None and new.shape == old.shape:
                        new.copy_(torch.where(finite.to(new.device), new, old))
            coeffs = torch.where(finite.to(coeffs.device), coeffs, torch.ones_like(coeffs))
            gramian = safe
        if self.zero_gradient_takes_all:
            self._warn_zero_gradients(gramian)
        norms = gramian.diagonal().clamp_min(0).sqrt()
        self.last_weights = coeffs.detach()
        self.last_grad_norms = norms
        if self.needs_full_gramian or self.track_conflict:
            self.last_cosine = gramian / (norms[:, None] * norms[None, :]).clamp_min(self.eps)
        return coeffs, True

    def _warn_zero_gradients(self, gramian: Tensor) -> None:
        """Warns once per task whose gradient is exactly zero, without a host sync: the mask is
        copied to host memory asynchronously (pinned memory and an event on CUDA) and read once
        the copy is complete, at once on the CPU, at a later step on CUDA. Not under
        torch.compile."""
        if torch.compiler.is_compiling():
            return
        zero = (gramian.diagonal() == 0).detach()
        if zero.device.type == "cuda":
            host = torch.empty(zero.shape, dtype=torch.bool, pin_memory=True)
            host.copy_(zero, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = zero.to("cpu", copy=True), None
        pending = getattr(self, "_zero_pending", [])
        pending.append((host, event))
        done = [event is None or event.query() for _, event in pending]
        self._zero_pending = [entry for entry, d in zip(pending, done) if not d]
        for host, _ in [entry for entry, d in zip(pending, done) if d]:
            zero = host.numpy()  # a completed host copy: no device to wait for
            new = [
                task
                for task, z in zip(self.task_names, zero)
                if z and task not in self._warned_zero
            ]
            if new and not zero.all():
                self._warned_zero.update(new)
                warnings.warn(
                    f"{type(self).__name__}: task(s) {new} have an exactly zero gradient: the "
                    "method then puts all the weight on them and the shared update is zero "
                    "(warned once per task)",
                    stacklevel=4,
                )

    def _backward_through_trunk(self, features, feature_grads, coeffs, retain_graph) -> None:
        if self._sharding is not None:
            self._sharding.backward_through_trunk(features, feature_grads, coeffs, retain_graph)
            return
        combined = multi_tensor.combine(feature_grads, coeffs)
        pairs = [(z, g) for z, g in zip(features, combined) if g is not None]
        trunk = torch.autograd.grad(
            [z for z, _ in pairs],
            self._shared,
            [g for _, g in pairs],
            retain_graph=retain_graph,
            allow_unused=True,
        )
        reached = [(p, g) for p, g in zip(self._shared, trunk) if g is not None]
        distributed.mean_([g for _, g in reached])
        _accumulate_grad(reached)


def _accumulate_grad(pairs: list[tuple[Tensor, Tensor]]) -> None:
    """leaf.grad += g, taking g itself where .grad is None (autograd's accumulation)."""
    with torch.no_grad():
        for leaf, g in pairs:
            if leaf.grad is None:
                leaf.grad = g
            else:
                leaf.grad.add_(g)


def _learning_k(coefficients):
    """Wraps a method's coefficients(gramian, losses): checks the Gramian's shape and, for an
    instance built without tasks, takes K from it."""

    @functools.wraps(coefficients)
    def wrapped(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1] or gramian.shape[0] == 0:
            raise ValueError(
                f"{type(self).__name__}.coefficients: expected a K x K Gramian, got shape "
                f"{tuple(gramian.shape)}"
            )
        if self.task_names is None:
            self._bind_task_count(gramian.shape[0])
        elif gramian.shape[0] != self.num_tasks:
            raise ValueError(
                f"{type(self).__name__}.coefficients: a {gramian.shape[0]} x {gramian.shape[0]} "
                f"Gramian for {self.num_tasks} tasks"
            )
        return coefficients(self, gramian, losses)

    return wrapped
