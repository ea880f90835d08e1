"""torchjd (0.18) as a contender: its aggregator or scalarizer for each fusedmtl method it has.

Gradient-based methods run torchjd's Jacobian descent: ``torchjd.autojac.mtl_backward`` (the
Jacobian of the losses with respect to the shared parameters, into their ``.jac``, and each task's
gradient into its head's ``.grad``), then ``torchjd.autojac.jac_to_grad`` with the aggregator (the
K x G Jacobian matrix concatenated, aggregated, split into ``.grad``). The weighting step alone is
``jac_to_grad`` on ``.jac`` fields laid out as mtl_backward leaves them (K x the parameter's
shape). Loss-based methods run a ``torchjd.scalarization`` scalarizer on the stacked losses, then
``.backward()``.

torchjd 0.18 has no GradNormalization, GradNorm, DB-MTL, InitialLoss, PriorLoss, RealTime or
AnchorToMain, and no representation-level (MGDA-UB) form: mtl_backward's ``features`` only splits
the graph, its Jacobian is still taken with respect to the shared parameters.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

PINNED = "0.18.0"  # the version the adapters are written for (Makefile: PEER_REQUIREMENTS)

# fusedmtl method -> (torchjd.aggregation class, its keyword arguments for K tasks, the fusedmtl
# options, beyond its defaults, that make it the same method). torchjd's MGDA works on the raw
# gradients; the other defaults agree (CAGrad c = 0.5, Aligned-MTL scale 'min', Nash-MTL
# max_norm 1, geometric mean = GeneralizedMean gamma 0, UW = Uncertainty's 'regression' kind).
AGGREGATORS: dict[str, tuple[str, Callable[[int], dict], dict]] = {
    "mgda": ("MGDA", lambda k: {}, {"normalization": "none"}),
    "upgrad": ("UPGrad", lambda k: {}, {}),
    "pcgrad": ("PCGrad", lambda k: {}, {}),
    "cagrad": ("CAGrad", lambda k: {"c": 0.5}, {}),
    "imtl_g": ("IMTLG", lambda k: {}, {}),
    "aligned_mtl": ("AlignedMTL", lambda k: {}, {}),
    "nash_mtl": ("NashMTL", lambda k: {"n_tasks": k}, {}),
    "pcd": ("PCD", lambda k: {}, {}),
    "excess_mtl": ("ExcessMTL", lambda k: {}, {}),
    "trimmed_mean": ("TrimmedMean", lambda k: {"trim_number": 1 if k >= 3 else 0}, {}),
}
# fusedmtl method -> (torchjd.scalarization class, its keyword arguments, fusedmtl options).
SCALARIZERS: dict[str, tuple[str, Callable[[int], dict], dict]] = {
    "fixed": ("Mean", lambda k: {}, {}),
    "generalized_mean": ("GeometricMean", lambda k: {}, {}),
    "uncertainty": ("UW", lambda k: {"shape": k}, {}),
    "dwa": ("DWA", lambda k: {}, {}),
    "famo": ("FAMO", lambda k: {"shape": k}, {}),
    "rlw": ("Random", lambda k: {}, {}),
    "pbi": ("PBI", lambda k: {"theta": 5.0, "weights": torch.ones(k)}, {}),
    "cosmos": ("COSMOS", lambda k: {"lambda_": 1.0, "weights": torch.full((k,), 1.0 / k)}, {}),
}
RANDOM = ("rlw", "pcgrad")  # draw random weights or orders: agreement is not expected to be 1


def torchjd():
    """The torchjd package, or LookupError saying why not."""
    try:
        import torchjd as module
        import torchjd.autojac  # noqa: F401
    except ImportError as error:
        raise LookupError(f"torchjd is not installed ({error})") from None
    return module


def matching_options(name: str) -> dict:
    """The fusedmtl options under which ``name`` is the method torchjd implements."""
    return {**AGGREGATORS, **SCALARIZERS}.get(name, ("", None, {}))[2]


def has(name: str) -> bool:
    return name in AGGREGATORS or name in SCALARIZERS


def _make(name: str, k: int):
    if not has(name):
        raise LookupError(f"torchjd has no {name}")
    module = torchjd()
    # cvxpy's note on every Nash-MTL problem torchjd builds (its problem is not DPP)
    warnings.filterwarnings("ignore", message="You are solving a parameterized problem")
    if name in AGGREGATORS:
        class_name, kwargs, _ = AGGREGATORS[name]
        return getattr(module.aggregation, class_name)(**kwargs(k))
    import torchjd.scalarization as scalarization

    class_name, kwargs, _ = SCALARIZERS[name]
    return getattr(scalarization, class_name)(**kwargs(k))


def weighting_step(
    name: str, params: Sequence[torch.Tensor], task_grads: Sequence[Sequence[torch.Tensor]]
) -> Callable[[], object]:
    """torchjd's weighting step for a gradient-based method: ``jac_to_grad`` of the task
    gradients, which are stacked once (untimed) into the ``.jac`` fields mtl_backward fills."""
    if name not in AGGREGATORS:
        raise LookupError(f"torchjd has no {name}")
    aggregator = _make(name, len(task_grads))
    from torchjd.autojac import jac_to_grad

    jacobians = [torch.stack([grads[j] for grads in task_grads]) for j in range(len(params))]

    def step() -> None:
        for p, jac in zip(params, jacobians):
            p.jac = jac
        jac_to_grad(params, aggregator, retain_jac=True)

    return step


def training_step(
    name: str,
    forward: Callable[[], tuple[torch.Tensor, list[torch.Tensor]]],
    shared: Sequence[torch.Tensor],
    heads: Sequence[Sequence[torch.Tensor]],
    zero_grad: Callable[[], None],
) -> Callable[[], object]:
    """A whole training step with torchjd: ``forward()`` returns (the shared features, the K task
    losses); gradient-based methods run mtl_backward + jac_to_grad, loss-based ones a scalarizer.
    FAMO's logits are updated, as fusedmtl's are, from this step's losses before weighting them
    (torchjd's ``update`` with the next batch's losses: the paper's practical variant)."""
    peer = _make(name, len(heads))
    from torchjd.autojac import jac_to_grad, mtl_backward

    if name in AGGREGATORS:

        def jacobian_descent() -> None:
            zero_grad()
            features, losses = forward()
            mtl_backward(losses, features=features, tasks_params=heads, shared_params=shared)
            jac_to_grad(shared, peer)

        return jacobian_descent
    state = {"seen": False}

    def scalarized() -> None:
        zero_grad()
        _, losses = forward()
        values = torch.stack(losses)
        if name == "famo" and state["seen"]:
            peer.update(values.detach())
        state["seen"] = True
        peer(values).backward()

    return scalarized
