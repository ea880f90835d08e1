"""Per-task gradients: the autograd machinery the gradient-based weightings share.

Shared parameters (or shared features, in representation mode) get one gradient per task; every
other parameter a loss reaches is task-specific and gets the gradient of the losses that reach it,
unweighted (the convention of LibMTL and torchjd). Both come out of the same autograd passes.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fusedmtl import backend

MODES = ("loop", "batched")


@dataclass
class TaskGradients:
    """shared[i][p]: task i's gradient with respect to shared input p (None: no path).
    specific: (leaf, gradient) for every task-specific leaf, summed over the tasks."""

    shared: list[list[Tensor | None]]
    specific: list[tuple[Tensor, Tensor]]
    reached: list[bool] | None = None  # per task: whether its loss reaches a shared input


def task_gradients(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    mode: str = "loop",
    retain_graph: bool = False,
    names: Sequence[str] | None = None,
) -> TaskGradients:
    """The gradient of each loss with respect to the ``shared`` tensors (parameters, or features
    in representation mode), and of their sum with respect to every other leaf they reach.

    mode 'loop': one torch.autograd.grad per task, the graph retained between them.
    mode 'batched': one torch.autograd.grad(..., is_grads_batched=True) over the K losses (vmap
    over the backward pass; the shared gradients then come as one K x shape tensor per input).
    """
    if mode not in MODES:
        raise ValueError(f"per-task gradient mode must be one of {MODES}, got {mode!r}")
    shared = list(shared)
    shared_ids = {id(t) for t in shared}
    stops = [t for t in shared if t.grad_fn is not None]
    specific, reaches_shared = [], []
    for loss in losses:
        leaves, stopped = reachable_leaves(loss, stops)
        specific.append([leaf for leaf in leaves if id(leaf) not in shared_ids])
        reaches_shared.append(stopped or len(specific[-1]) < len(leaves))
    if mode == "batched":
        result = _batched(losses, shared, specific, retain_graph)
    else:
        result = _loop(losses, shared, specific, retain_graph)
    result.reached = reaches_shared
    for i, reaches in enumerate(reaches_shared):
        if not reaches:
            name = names[i] if names is not None else i
            warnings.warn(
                f"task {name!r}: its loss has no path to any shared parameter; its shared gradient "
                "is taken as zero",
                stacklevel=4,
            )
    return result


def _loop(losses, shared, specific, retain_graph) -> TaskGradients:
    table, own = [], {}
    for i, loss in enumerate(losses):
        inputs = shared + specific[i]
        if not loss.requires_grad:
            grads = [None] * len(inputs)
        else:
            last = i == len(losses) - 1
            grads = torch.autograd.grad(
                loss,
                inputs,
                retain_graph=retain_graph or not last,
                allow_unused=True,
                materialize_grads=False,
            )
        table.append(list(grads[: len(shared)]))
        for leaf, g in zip(specific[i], grads[len(shared) :]):
            if g is not None:
                own[id(leaf)] = (leaf, g if id(leaf) not in own else own[id(leaf)][1] + g)
    return TaskGradients(table, list(own.values()))


def _batched(losses, shared, specific, retain_graph) -> TaskGradients:
    leaves = list({id(leaf): leaf for leaves in specific for leaf in leaves}.values())
    stacked = torch.stack([loss.reshape(()) for loss in losses])
    if not stacked.requires_grad:
        return TaskGradients([[None] * len(shared) for _ in losses], [])
    seeds = torch.eye(len(losses), dtype=stacked.dtype, device=stacked.device)
    grads = torch.autograd.grad(
        stacked,
        shared + leaves,
        seeds,
        retain_graph=retain_graph,
        allow_unused=True,
        is_grads_batched=True,
    )
    table = [
        [g[i] if g is not None else None for g in grads[: len(shared)]] for i in range(len(losses))
    ]
    own = [(leaf, g.sum(0)) for leaf, g in zip(leaves, grads[len(shared) :]) if g is not None]
    return TaskGradients(table, own)


def reachable_leaves(root: Tensor, stops: Sequence[Tensor] = ()) -> tuple[list[Tensor], bool]:
    """The leaves requiring grad that ``root``'s graph reaches without passing through the
    grad_fn of a tensor in ``stops``, in a deterministic (depth-first) order, and whether it
    reached a stop. The walk is C++ (a few microseconds for a model's graph, where the Python one
    costs ~1.5 us a node); :func:`reachable_leaves_reference` without the extension."""
    if backend._C is not None:
        return backend._C.reachable_leaves(root, list(stops))
    return reachable_leaves_reference(root, stops)


def reachable_leaves_reference(root: Tensor, stops: Sequence[Tensor] = ()):
    """:func:`reachable_leaves` in Python (the oracle of the C++ walk)."""
    if root.grad_fn is None:
        return ([root] if root.requires_grad else []), False
    stop_nodes = {t.grad_fn for t in stops if t.grad_fn is not None}
    leaves, seen, stack, stopped = [], set(), [root.grad_fn], False
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in stop_nodes:
            stopped = True
            continue
        variable = getattr(node, "variable", None)  # AccumulateGrad: the leaf it accumulates into
        if variable is not None:
            leaves.append(variable)
            continue
        stack.extend(next_node for next_node, _ in reversed(node.next_functions))
    return leaves, stopped


def split_shared_edges(
    losses: Sequence[Tensor], coeffs: Tensor, shared: Sequence[Tensor], stops: Sequence[Tensor]
):
    """Prepares one backward pass of sum(losses) that gives ``shared`` (and the ``stops``) the
    gradient of sum_i coeffs[i] losses[i] and every other leaf the unweighted gradient of the
    losses reaching it: where a node only losses[i] reaches passes its gradient on to the shared
    part of the graph (a node several losses reach, a stop, a shared leaf), a post hook scales it
    by coeffs[i], once. Returns (the other leaves, a token the hooks stay armed while it lives:
    delete it after the pass), or None when the graph does not split so (a leaf other than
    ``shared`` behind the shared part, a loss another loss reaches, more than 64 losses, no
    extension, compiled autograd): then take two passes. The trunk's gradient is then
    sum_i c_i (dL_i/dz)^T dz/dtheta instead of the weighted pass's (c_i dL_i/dz)^T dz/dtheta:
    equal up to rounding."""
    if not _cpp_hooks():
        return None
    return backend._C.split_shared_edges(list(losses), coeffs, list(shared), list(stops))


_PLAIN = (Tensor, torch.nn.Parameter)  # (a subclass, e.g. DTensor, may hold its data elsewhere)


def watch_finite(leaves: Sequence[Tensor]):
    """A token under which the next backward pass reads each gradient it gives ``leaves`` for an
    inf or NaN element as that gradient arrives, while it is still in cache (a C++ tensor hook on
    each leaf, after the user's; removed when the token is released): on the benchmark's step
    ~70 us where a pass over all the gradients after it took ~320 us (cold caches). Exact, unlike
    grads_finite's norm (no overflow of squares). None where it cannot watch (a leaf not a plain
    CPU tensor, no extension, compiled autograd). Read the answer with :func:`watched_finite`."""
    if not _cpp_hooks() or not all(type(leaf) in _PLAIN and leaf.is_cpu for leaf in leaves):
        return None
    return backend._C.watch_finite(list(leaves))


def watched_finite(token) -> bool | None:
    """Whether every gradient the pass gave under ``token`` (:func:`watch_finite`) was finite
    (exactly: no inf or NaN element); None if one arrived that the hook could not read."""
    return backend._C.watched_finite(token)


def _cpp_hooks() -> bool:
    """Whether C++ autograd hooks can run: the extension is built, compiled autograd is off."""
    compiled_autograd = sys.modules.get("torch._dynamo.compiled_autograd")
    return backend._C is not None and not (
        compiled_autograd and compiled_autograd.compiled_autograd_enabled
    )
