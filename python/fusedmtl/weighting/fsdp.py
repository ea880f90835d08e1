"""Gradient-based weighting of a shared trunk sharded with FSDP2 (``torch.distributed.fsdp.
fully_shard``): the Gramian from the local shards and one K x K all-reduce.

Under FSDP2 every shared parameter is a DTensor holding one shard per rank, and the autograd
graph runs through the unsharded parameters FSDP all-gathers for forward and backward, so
``torch.autograd.grad`` with respect to the sharded parameters finds them unused. The per-task
gradients therefore come from FSDP itself: one ``loss_i.backward(retain_graph=True)`` per task,
each ending in FSDP's reduce-scatter, which leaves in every shared parameter's .grad this rank's
shard of task i's gradient, already averaged over the ranks (the batch is split across them, so
this is the gradient of the whole batch). The methods need only the K x K Gramian of the task
gradients and a weighted sum, and both decompose over shards:

  M = sum over ranks r of M_r,   M_r[i, j] = <g_i shard r, g_j shard r>   (one all-reduce, K^2)
  d shard r = sum_i c_i g_i shard r                                        (local)

so every rank computes the same M, hence the same coefficients, and writes its shard of d into
its sharded .grad. No rank holds more than its K shards of task gradients, nor a full gradient.

Representation mode (``features=z``) needs no sharded gradients: the feature gradients are local
to each rank's part of the batch (their Gramians add, as with DDP), and one backward pass of
``[sum_i L_i, z]`` with seeds ``[1, sum_i c_i dL_i/dz - sum_i dL_i/dz]`` gives z the combined
gradient and the heads the gradient of their own losses, through FSDP's backward as usual.

Task-specific parameters (heads) that FSDP shards get their gradient from the same backward
passes, reduce-scattered by FSDP; heads left unsharded (only the trunk wrapped) have it averaged
across ranks here, in coalesced buckets, like the DDP path. ``grad_mode`` does not apply: the
per-task passes are FSDP's backward, one per task.

Amortized coefficients (``refresh_every > 1``): a step between refreshes is two backward passes
through FSDP, of sum_i c_i L_i and of sum_i (1 - c_i) L_i (:meth:`Sharding.reuse_backward`): the
shared shards keep the first's gradient, every other parameter receives both, the unweighted
gradient of its own losses (c_i may be 0: nothing is divided by it). The trunk's backward runs
twice, against once without FSDP (there a pruned autograd.grad gives the heads their part).

Not covered: FSDP's gradient sync turned off (``set_requires_gradient_sync(False)``: no sharded
gradient is produced); the gradients of sharded heads, which FSDP writes into their .grad during
the per-task passes, are not seen by the non-finite check, and stay accumulated on a step skipped
for non-finite trunk gradients (``on_nonfinite='skip'``).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from fusedmtl import multi_tensor
from fusedmtl.weighting import distributed
from fusedmtl.weighting.task_gradients import reachable_leaves


def _dtensor_type():
    """DTensor, or None while torch.distributed.tensor is not imported: no DTensor can exist
    then, and importing it here would cost every ``import fusedmtl`` its import time."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(tensor: Tensor | None) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def local(tensor: Tensor | None) -> Tensor | None:
    """This rank's shard of a DTensor (the tensor itself, no copy); any other tensor as it is."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def like(reference: Tensor, shard: Tensor) -> Tensor:
    """``shard`` (this rank's part) as a tensor laid out like ``reference``: a DTensor with the
    same mesh, placements and global shape when ``reference`` is one (no communication)."""
    if not is_dtensor(reference):
        return shard
    return _dtensor_type().from_local(
        shard,
        reference.device_mesh,
        reference.placements,
        run_check=False,
        shape=reference.shape,
        stride=reference.stride(),
    )


def _unsharded_leaves(losses: Sequence[Tensor]) -> list[Tensor]:
    """The unsharded leaves the losses reach (heads outside FSDP; the unsharded parameters FSDP
    all-gathers are leaves too, but FSDP clears their .grad after each reduce-scatter)."""
    plain = {
        id(leaf): leaf
        for loss in losses
        if loss.requires_grad
        for leaf in reachable_leaves(loss)[0]
        if not is_dtensor(leaf)
    }
    return list(plain.values())


def local_part(whole: Tensor, reference: Tensor) -> Tensor:
    """This rank's part of ``whole``, a tensor every rank holds entirely (the same values, e.g.
    drawn from equally seeded generators), as ``reference``'s shard is the rank's part of it:
    no communication. Any other ``reference``: ``whole`` itself."""
    if not is_dtensor(reference):
        return whole
    from torch.distributed.tensor import distribute_tensor

    parts = distribute_tensor(
        whole, reference.device_mesh, reference.placements, src_data_rank=None
    )
    return parts.to_local()


class Sharding:
    """How the shared parameters are sharded: the process group their shards are spread over
    (the gradient of the whole model is the concatenation of the ranks' shards along it).

    Args:
        params: the shared parameters, all DTensors on one device mesh, sharded (``Shard``) along
            exactly one mesh dimension (FSDP2; HSDP's replicate dimension is allowed: replicas
            hold equal shards, so the Gramian is summed over the shard dimension only).
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        from torch.distributed.tensor import Shard

        mesh = params[0].device_mesh
        placements = tuple(params[0].placements)
        for p in params:
            if p.device_mesh != mesh or tuple(p.placements) != placements:
                raise ValueError(
                    "sharded shared parameters must all live on one device mesh with the same "
                    f"placements, got {p.device_mesh} {p.placements} and {mesh} {placements}"
                )
        dims = [d for d, placement in enumerate(placements) if isinstance(placement, Shard)]
        if len(dims) != 1:
            raise ValueError(
                "sharded shared parameters must be sharded along exactly one mesh dimension "
                f"(FSDP2's fully_shard), got placements {placements}"
            )
        self.group = mesh.get_group(dims[0])
        self.pending = None  # representation mode: (losses, raw feature gradient sums)

    # -- the per-task gradients -----------------------------------------------------------------

    def task_gradients(
        self,
        losses: Sequence[Tensor],
        shared: Sequence[Tensor],
        retain_graph: bool,
        names: Sequence[str],
    ) -> tuple[list[list[Tensor | None]], list[tuple[Tensor, Tensor]]]:
        """One ``loss.backward`` per task through FSDP's reduce-scatter.

        Args:
            losses: K scalar tensors (already scaled by a GradScaler if any).
            shared: the P sharded shared parameters (DTensors).
            retain_graph: keep the graph after the last task's pass.
            names: the task names (for the warning about a task that reaches no shared
                parameter).

        Returns:
            (table, specific): table[i][p] is this rank's shard of task i's gradient of shared
            parameter p (a local tensor of the shard's shape, None where task i does not reach
            p); specific lists (leaf, gradient) for the unsharded task-specific leaves, their
            gradient summed over the tasks and averaged across ranks. Every shared .grad is as
            it was before (the update goes in later); sharded task-specific parameters have
            their gradients accumulated into .grad by FSDP.
        """
        shared = list(shared)
        last = max((i for i, loss in enumerate(losses) if loss.requires_grad), default=-1)
        table = []
        with _set_aside_grads(shared, _unsharded_leaves(losses)) as fresh:
            for i, loss in enumerate(losses):
                if loss.requires_grad:
                    loss.backward(retain_graph=retain_graph or i < last)
                table.append([local(p.grad) for p in shared])
                for p in shared:
                    p.grad = None
        for name, row in zip(names, table):
            if all(g is None for g in row):
                warnings.warn(
                    f"task {name!r}: its loss has no path to any shared parameter; its shared "
                    "gradient is taken as zero",
                    stacklevel=5,
                )
        return table, fresh

    # -- the Gramian and the update ------------------------------------------------------------

    def sum_gramian(self, gramian: Tensor, unchecked: Sequence[Tensor] = ()) -> Tensor:
        """The Gramian of the whole gradients from this rank's Gramian of its shards: the sum
        over the shard group, one all-reduce of K x K numbers (no division: FSDP's
        reduce-scatter already averaged the gradients over the ranks).

        Args:
            gramian: Tensor[K, K], the Gramian of this rank's shards.
            unchecked: this rank's shards of task gradients the Gramian does not cover (GradNorm's
                columns outside its layer): a non-finite one makes the summed Gramian non-finite,
                so that every rank takes the same decision on the step.

        Returns:
            Tensor[K, K], equal on every rank of the group.
        """
        unchecked = [g for g in unchecked if g is not None]
        if unchecked:  # 0 * inf = nan: no host read, the decision travels with the sum
            norms = torch.stack(torch._foreach_norm(list(unchecked))).to(gramian)
            gramian = gramian + 0 * norms.sum()
        return self.sum_over_shards(gramian)

    def sum_over_shards(self, partial: Tensor) -> Tensor:
        """A sum over the whole gradients from this rank's sum over its shards (a Gramian, the
        K squared norms, ExcessMTL's excess risks): one all-reduce over the shard group, into a
        copy; equal on every rank of the group."""
        partial = partial.clone()
        dist.all_reduce(partial, group=self.group)
        return partial

    def combine_into_grad_(
        self, shared: Sequence[Tensor], table: Sequence[Sequence[Tensor | None]], coeffs: Tensor
    ) -> None:
        """Every sharded p.grad += sum_i coeffs[i] table[i][p] on this rank's shard (creating
        p.grad as a DTensor laid out like p where it is None); one multi-tensor pass.

        Args:
            shared: the P sharded shared parameters.
            table: K rows of P local shards (or None), as from :meth:`task_gradients`.
            coeffs: Tensor[K].
        """
        reached = [p for p in range(len(shared)) if any(row[p] is not None for row in table)]
        for fresh in (False, True):  # as autograd: accumulate into a .grad, else create it
            chosen = [p for p in reached if (shared[p].grad is None) == fresh]
            if not chosen:
                continue
            columns = [[row[p] for p in chosen] for row in table]
            if fresh:
                for p, g in zip(chosen, multi_tensor.combine(columns, coeffs)):
                    shared[p].grad = like(shared[p], g)
            else:
                out = [local(shared[p].grad) for p in chosen]
                multi_tensor.combine(columns, coeffs, out=out, accumulate=True)

    def reuse_backward(
        self,
        losses: Sequence[Tensor],
        weighted: Tensor,
        rest: Tensor,
        shared: Sequence[Tensor],
        retain_graph: bool,
    ) -> tuple[list[Tensor | None], list[tuple[Tensor, Tensor]]]:
        """A step between refreshes: the shared shards of the gradient of sum_i w_i L_i, and the
        unweighted gradient of the losses for every other parameter, in two FSDP backward passes
        (``weighted``, then ``rest``, whose shared part is dropped).

        Args:
            losses: K scalar tensors (already scaled by a GradScaler if any).
            weighted, rest: sum_i w_i L_i and sum_i (1 - w_i) L_i over the losses that require
                grad (their sum is the unweighted sum of the losses).
            shared: the P sharded shared parameters (DTensors).
            retain_graph: keep the graph after the second pass.

        Returns:
            (shards, specific): shards[p] is this rank's shard of the shared update for
            parameter p (None where no loss reaches it); specific lists (leaf, gradient) for the
            unsharded task-specific leaves, averaged across ranks. Every shared .grad is as it was
            before; FSDP accumulated the sharded task-specific parameters' gradients into .grad.
        """
        shared = list(shared)
        with _set_aside_grads(shared, _unsharded_leaves(losses)) as fresh:
            weighted.backward(retain_graph=True)
            shards = [local(p.grad) for p in shared]
            for p in shared:
                p.grad = None
            rest.backward(retain_graph=retain_graph)
        return shards, fresh

    def backward_through_trunk(
        self,
        features: Sequence[Tensor],
        feature_grads: Sequence[Sequence[Tensor | None]],
        coeffs: Tensor,
        retain_graph: bool,
    ) -> list[tuple[Tensor, Tensor]]:
        """Representation mode: one backward pass of ``[sum_i L_i, z]`` with seeds
        ``[1, sum_i c_i t_i - sum_i dL_i/dz]`` (t: the feature table the coefficients apply to),
        so z receives sum_i c_i t_i and the heads the gradient of their own losses, all through
        FSDP's backward (one reduce-scatter of the trunk).

        The K (scaled) losses and, per feature, sum_i dL_i/dz as autograd delivered it to z,
        come from :func:`sharded_backward` (``pending``).

        Args:
            features: the shared representations z.
            feature_grads: K rows, one gradient per feature (the method's table).
            coeffs: Tensor[K], the coefficients applied to the table.
            retain_graph: keep the graph after this pass.

        Returns:
            (leaf, gradient) for the unsharded leaves the pass reached (heads outside FSDP), with
            their fresh gradient, already averaged across ranks and accumulated into .grad.
        """
        losses, raw_sum = self.pending
        combined = multi_tensor.combine(feature_grads, coeffs)
        roots, seeds = [], []
        reaching = [loss for loss in losses if loss.requires_grad]
        if reaching:
            total = torch.stack([loss.reshape(()) for loss in reaching]).sum()
            roots.append(total)
            seeds.append(torch.ones_like(total))
        for z, c, s in zip(features, combined, raw_sum):
            if c is None and s is None:
                continue
            seed = (c if c is not None else 0) - (s if s is not None else 0)
            roots.append(z)
            seeds.append(seed)
        plain = {id(leaf): leaf for leaf in reachable_leaves(roots[0])[0] if not is_dtensor(leaf)}
        with _set_aside_grads([], list(plain.values())) as fresh:
            torch.autograd.backward(roots, seeds, retain_graph=retain_graph)
        with torch.no_grad():
            for leaf, g in fresh:
                if leaf.grad is None:
                    leaf.grad = g
                else:
                    leaf.grad.add_(g)
        return fresh


@contextlib.contextmanager
def _set_aside_grads(shared: Sequence[Tensor], plain: Sequence[Tensor]):
    """FSDP backward passes on cleared .grad (FSDP accumulates into .grad, and the passes must see
    only their own gradients): every .grad of ``shared`` and ``plain`` is set aside, then put back
    on exit. Yields a list that receives, on exit, (leaf, gradient) for the ``plain`` leaves (the
    unsharded ones, outside FSDP's reduce-scatter) the passes reached, their gradients averaged
    across ranks."""
    saved = [t.grad for t in [*shared, *plain]]
    for t in [*shared, *plain]:
        t.grad = None
    fresh: list[tuple[Tensor, Tensor]] = []
    try:
        yield fresh
    finally:
        fresh.extend((leaf, leaf.grad) for leaf in plain if leaf.grad is not None)
        for t, g in zip([*shared, *plain], saved):
            t.grad = g
    distributed.mean_([g for _, g in fresh])


def sharding(params: Sequence[Tensor] | None, flag: bool | None) -> Sharding | None:
    """The sharding of the shared parameters, or None for the ordinary (single process or DDP)
    path.

    Args:
        params: the shared parameters (None: a coefficients-only instance).
        flag: None detects FSDP2 (every shared parameter a DTensor); True requires it (a
            ValueError if they are not DTensors); False never takes the sharded path.

    Returns:
        A :class:`Sharding`, or None.
    """
    if params is None or flag is False:
        return None
    sharded = [is_dtensor(p) for p in params]
    if flag is None and not any(sharded):
        return None
    if not all(sharded):
        raise ValueError(
            "sharded=True or a mix of DTensor and ordinary shared parameters: under FSDP2 every "
            "shared parameter must be sharded (fully_shard the whole trunk before building the "
            "weighting, and pass the sharded parameters: trunk.parameters() after fully_shard)"
        )
    return Sharding(params)


def sharded_backward(
    weighting,
    losses: list[Tensor],
    values: Tensor,
    scale: float,
    grad_scaler,
    features: list[Tensor] | None,
    retain_graph: bool,
) -> Tensor | None:
    """``GradientWeighting.backward`` on FSDP2-sharded shared parameters, from the point where the
    losses are checked (and scaled by the GradScaler, whose scale is ``scale``): per-task
    gradients through FSDP, then the method's ``_weigh`` (the Gramian is summed over the shards
    there, the update written into the shards of .grad).

    Args:
        weighting: the GradientWeighting (its ``_sharding`` is set).
        losses: K scalar tensors; values: Tensor[K], the detached losses averaged across ranks.
        scale, grad_scaler: the loss scale and the scaler (None without AMP).
        features: the shared representations (representation mode) or None.
        retain_graph: keep the graph after the step.

    Returns:
        Tensor[K], the coefficients, or None when the step was skipped.
    """
    from fusedmtl.weighting.gradient_based import _accumulate_grad

    sharding: Sharding = weighting._sharding
    if features is None:
        table, specific = sharding.task_gradients(
            losses, weighting._shared, retain_graph, weighting.task_names
        )
        coeffs = weighting._weigh(
            table,
            values,
            scale,
            grad_scaler,
            None,
            retain_graph,
            owned=True,
            checked=[g for _, g in specific],
        )
        if coeffs is not None:
            _accumulate_grad(specific)
        return coeffs
    table = [
        list(torch.autograd.grad(loss, features, retain_graph=True, allow_unused=True))
        if loss.requires_grad
        else [None] * len(features)
        for loss in losses
    ]
    if all(g is None for row in table for g in row):
        raise ValueError(
            f"{type(weighting).__name__}.backward: no loss depends on the features given: pass "
            "the shared representation the heads read"
        )
    for name, row in zip(weighting.task_names, table):
        if all(g is None for g in row):
            warnings.warn(
                f"task {name!r}: its loss has no path to the features; its shared gradient is "
                "taken as zero",
                stacklevel=4,
            )
    # what autograd will deliver to z from the losses (before the method may scale the table)
    raw_sum = []
    for f in range(len(features)):
        present = [row[f] for row in table if row[f] is not None]
        raw_sum.append(torch.stack(present).sum(0) if present else None)
    sharding.pending = (losses, raw_sum)
    try:
        return weighting._weigh(
            table, values, scale, grad_scaler, features, retain_graph, owned=True
        )
    finally:
        sharding.pending = None
