"""Each torchjd adapter against the installed torchjd, on a tiny model: it runs, writes every
.grad, and its update points where fusedmtl's does (cosine), so that an API change of the peer
fails here instead of silently dropping a column of the benchmark. (``make test`` installs torchjd
and fails at start-up without it; PEERS=0 skips these tests.)"""

from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("torchjd")

from bench import peers  # noqa: E402
from bench.training_step import FACTORIES, SharedTrunkModel, all_grads  # noqa: E402
from bench.weighting_step import WeightingStep, zero_grads  # noqa: E402
from bench.workload import build, loss_values, make_task_grads  # noqa: E402

METHODS = sorted({**peers.AGGREGATORS, **peers.SCALARIZERS})


def test_torchjd_is_the_pinned_version():
    import importlib.metadata

    assert importlib.metadata.version("torchjd") == peers.PINNED


@pytest.mark.parametrize("name", METHODS)
def test_training_step_adapter_matches_fusedmtl(name):
    torch.manual_seed(0)
    model = SharedTrunkModel(width=32)
    x, targets = model.batch(4, "cpu")
    grads = {}
    for contender in ("fused", "torchjd"):
        FACTORIES[contender](name, model, x, targets)()
        assert all(p.grad is not None for p in model.parameters()), contender
        grads[contender] = all_grads(model)
    assert torch.isfinite(grads["torchjd"]).all()
    cosine = torch.nn.functional.cosine_similarity(
        grads["torchjd"].double(), grads["fused"].double(), dim=0
    )
    # (peers.DIFFERS: random draws, or another formulation of the method)
    assert cosine > (0.5 if name in peers.DIFFERS else 0.9999), float(cosine)


@pytest.mark.parametrize("name", sorted(peers.AGGREGATORS))
def test_weighting_step_adapter_matches_fusedmtl(name):
    # torchjd's random aggregators draw from torch's global generator: seeded, so that their
    # cosine does not depend on the tests run before (GradDrop's ranges from 0.28 to 1 over seeds)
    torch.manual_seed(0)
    shapes = [(8, 3), (8,), (5, 8)]
    params = [torch.zeros(s, requires_grad=True) for s in shapes]
    task_grads = make_task_grads(shapes, 3, "cpu", seed=1)
    # a conflict (not a degenerate one): the methods differ from the mean
    task_grads[1] = [g1 - 0.8 * g0 for g0, g1 in zip(task_grads[0], task_grads[1])]
    zero_grads(params)
    build(name, 3, params).step([[g.clone() for g in row] for row in task_grads], loss_values(3))
    fused = torch.cat([p.grad.flatten() for p in params])
    zero_grads(params)
    peers.weighting_step(name, params, task_grads)()
    peer = torch.cat([p.grad.flatten() for p in params])
    cosine = torch.nn.functional.cosine_similarity(peer.double(), fused.double(), dim=0)
    assert cosine > (0.5 if name in peers.DIFFERS else 0.9999), (name, float(cosine))


def test_methods_torchjd_lacks_are_lookup_errors():
    with pytest.raises(LookupError, match="torchjd has no db_mtl"):
        peers.weighting_step("db_mtl", [], [[]])
    assert WeightingStep.name == "weighting_step"


def test_every_torchjd_method_is_measured():
    """Each public aggregator, weighting and scalarizer class of torchjd is built by an entry of
    peers' tables (directly or inside a GramianWeightedAggregator) or named in NOT_MEASURED with
    a reason; so a method both libraries have cannot be missing from the benchmark's columns."""
    import torchjd.aggregation
    import torchjd.scalarization

    public = {
        f"{module.__name__.split('.')[-1]}.{name}"
        for module in (torchjd.aggregation, torchjd.scalarization)
        for name, value in vars(module).items()
        if inspect.isclass(value) and not name.startswith("_")
    }
    built = {
        f"{family}.{type(part).__name__}"
        for family, table in (
            ("aggregation", peers.AGGREGATORS),
            ("scalarization", peers.SCALARIZERS),
        )
        for name in table
        for part in peers._make(name, 4).modules()
    }
    assert public - built - set(peers.NOT_MEASURED) == set()
    assert set(peers.NOT_MEASURED) <= public - built  # no stale or contradicting reasons
