"""torchjd (0.18) as a contender: its aggregator or scalarizer for each fusedmtl method it has.

Gradient-based methods run torchjd's Jacobian descent: ``torchjd.autojac.mtl_backward`` (the
Jacobian of the losses with respect to the shared parameters, into their ``.jac``, and each task's
gradient into its head's ``.grad``), then ``torchjd.autojac.jac_to_grad`` with the aggregator (the
K x G Jacobian matrix concatenated, aggregated, split into ``.grad``). The weighting step alone is
``jac_to_grad`` on ``.jac`` fields laid out as mtl_backward leaves them (K x the parameter's
shape). Loss-based methods run a ``torchjd.scalarization`` scalarizer on the stacked losses, then
``.backward()``.

torchjd 0.18 has no GradNormalization, GradNorm, DB-MTL, IMTL (IMTL-L with IMTL-G), MoCo,
InitialLoss, PriorLoss, RealTime, AnchorToMain or Alternating, and no representation-level
(MGDA-UB) form: mtl_backward's ``features`` only splits the graph, its Jacobian is still taken with
respect to the shared parameters. Every other method of torchjd is in the tables below (a test
holds the tables to torchjd's public classes); DIFFERS says where agreement is not expected.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

PINNED = "0.18.0"  # the version the adapters are written for (Makefile: PEER_REQUIREMENTS)

# fusedmtl method -> (its torchjd aggregator for K tasks, from the torchjd.aggregation module; the
# fusedmtl options, beyond its defaults, that make it the same method). torchjd's MGDA works on the
# raw gradients; the other defaults agree (CAGrad c = 0.5, Aligned-MTL scale 'min', Nash-MTL
# max_norm 1, FairGrad alpha 1, Krum without byzantine tasks, CR-MOGM over UPGrad, geometric
# mean = GeneralizedMean gamma 0, UW = Uncertainty's 'regression' kind). MoDo, SDMGrad and CR-MOGM
# are weightings of the Gramian in torchjd: its GramianWeightedAggregator makes them aggregators.
Factory = Callable[[object, int], object]
AGGREGATORS: dict[str, tuple[Factory, dict]] = {
    "mgda": (lambda jd, k: jd.MGDA(), {"normalization": "none"}),
    "upgrad": (lambda jd, k: jd.UPGrad(), {}),
    "pcgrad": (lambda jd, k: jd.PCGrad(), {}),
    "cagrad": (lambda jd, k: jd.CAGrad(c=0.5), {}),
    "imtl_g": (lambda jd, k: jd.IMTLG(), {}),
    "aligned_mtl": (lambda jd, k: jd.AlignedMTL(), {}),
    "nash_mtl": (lambda jd, k: jd.NashMTL(n_tasks=k), {}),
    "pcd": (lambda jd, k: jd.PCD(), {}),
    "excess_mtl": (lambda jd, k: jd.ExcessMTL(), {}),
    "trimmed_mean": (lambda jd, k: jd.TrimmedMean(trim_number=1 if k >= 3 else 0), {}),
    "dualproj": (lambda jd, k: jd.DualProj(), {}),
    "config": (lambda jd, k: jd.ConFIG(), {}),
    "krum": (lambda jd, k: jd.Krum(n_byzantine=0, n_selected=1), {}),
    "fairgrad": (lambda jd, k: jd.FairGrad(alpha=1.0), {}),
    "gradvac": (lambda jd, k: jd.GradVac(), {}),
    "graddrop": (lambda jd, k: jd.GradDrop(), {}),
    "modo": (lambda jd, k: jd.GramianWeightedAggregator(jd.MoDoWeighting()), {}),
    "sdmgrad": (lambda jd, k: jd.GramianWeightedAggregator(jd.SDMGradWeighting()), {}),
    "crmogm": (
        lambda jd, k: jd.GramianWeightedAggregator(jd.CRMOGMWeighting(jd.UPGradWeighting())),
        {},
    ),
}
# fusedmtl method -> (its torchjd scalarizer for K tasks, from torchjd.scalarization; options).
SCALARIZERS: dict[str, tuple[Factory, dict]] = {
    "fixed": (lambda jd, k: jd.Mean(), {}),
    "generalized_mean": (lambda jd, k: jd.GeometricMean(), {}),
    "uncertainty": (lambda jd, k: jd.UW(shape=k), {}),
    "imtl_l": (lambda jd, k: jd.IMTLL(shape=k), {}),
    "dwa": (lambda jd, k: jd.DWA(), {}),
    "famo": (lambda jd, k: jd.FAMO(shape=k), {}),
    "rlw": (lambda jd, k: jd.Random(), {}),
    "pbi": (lambda jd, k: jd.PBI(theta=5.0, weights=torch.ones(k)), {}),
    "cosmos": (lambda jd, k: jd.COSMOS(lambda_=1.0, weights=torch.full((k,), 1.0 / k)), {}),
    "stch": (lambda jd, k: jd.STCH(mu=1.0), {}),
}
# torchjd's public classes the benchmark does not time, and why (a test holds every other public
# aggregator, weighting and scalarizer of torchjd to an entry of the tables above).
NOT_MEASURED = {
    **dict.fromkeys(
        ["aggregation.Aggregator", "aggregation.Weighting", "aggregation.WeightedAggregator"]
        + ["scalarization.Scalarizer"],
        "a base class",
    ),
    **dict.fromkeys(
        [f"aggregation.{n}" for n in ("Mean", "Sum", "Constant", "Random")]
        + ["aggregation.ConstantWeighting", "aggregation.RandomWeighting"],
        "fixed or random weights on the Jacobian: the update of the scalarizer on the losses "
        "(Fixed, RLW), which is timed",
    ),
    **dict.fromkeys(
        ["scalarization.Sum", "scalarization.Constant"],
        "Fixed with other weights: timed as Mean",
    ),
}
# Methods whose update is not expected to point exactly where fusedmtl's does, and why.
DIFFERS = {
    "rlw": "random weights",
    "pcgrad": "random projection orders",
    "gradvac": "random projection orders",
    "graddrop": "random sign masks",
    "stch": "torchjd's STCH smooths the max of the raw losses (weights 1/K), fusedmtl's (the "
    "paper's code) that of the log-losses over a nadir point",
}


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
    return {**AGGREGATORS, **SCALARIZERS}.get(name, (None, {}))[1]


def has(name: str) -> bool:
    return name in AGGREGATORS or name in SCALARIZERS


def _make(name: str, k: int):
    if not has(name):
        raise LookupError(f"torchjd has no {name}")
    module = torchjd()
    # cvxpy's note on every Nash-MTL problem torchjd builds (its problem is not DPP)
    warnings.filterwarnings("ignore", message="You are solving a parameterized problem")
    if name in AGGREGATORS:
        return AGGREGATORS[name][0](module.aggregation, k)
    import torchjd.scalarization as scalarization

    return SCALARIZERS[name][0](scalarization, k)


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
