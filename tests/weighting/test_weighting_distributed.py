"""Data-parallel equivalence: 2 gloo processes, each with half the batch, end with the same
parameters as one process with the whole batch, with the model wrapped in
DistributedDataParallel or not, for loss-based, gradient-based and randomised methods, in both
the parameter and the representation mode."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from weighting_cases import SharedTrunkNet

from fusedmtl import weighting

WORLD = 2
BATCH = 32
STEPS = 3

CASES = {
    # name: (method factory (trunk params) -> weighting, ddp wrap, representation mode)
    "gradnorm_unwrapped": (lambda p: weighting.GradNormalization(p, 3), False, False),
    "gradnorm_ddp": (lambda p: weighting.GradNormalization(p, 3), True, False),
    "mgda_unwrapped": (lambda p: weighting.MGDA(p, 3), False, False),
    "mgda_ddp": (lambda p: weighting.MGDA(p, 3), True, False),
    "mgda_ub_unwrapped": (lambda p: weighting.MGDA(p, 3), False, True),
    "mgda_ub_ddp": (lambda p: weighting.MGDA(p, 3), True, True),
    "gradnorm_learned_ddp": (
        lambda p: weighting.GradNorm(p[:2], 3, last_shared_layer=p[:2][-1:]),
        True,
        False,
    ),
    "realtime_ddp": (lambda p: weighting.RealTime(3), True, False),
    "rlw_ddp": (lambda p: weighting.RLW(3), True, False),
    "pcgrad_unwrapped": (lambda p: weighting.PCGrad(p, 3), False, False),
    "db_mtl_ddp": (lambda p: weighting.DBMTL(p, 3), True, False),
    "famo_ddp": (lambda p: weighting.FAMO(3), True, False),
    # per-coordinate methods: the same draws (GradDrop) and running sums (ExcessMTL, MoCo) on
    # every rank, from the averaged gradients
    "graddrop_ddp": (lambda p: weighting.GradDrop(p, 3, seed=0), True, False),
    "excess_mtl_ddp": (lambda p: weighting.ExcessMTL(p, 3), True, False),
    "moco_ddp": (lambda p: weighting.MoCo(p, 3), True, False),
    # refresh_every=2: step 2 of 3 reuses step 1's coefficients in one backward pass
    "upgrad_refresh_ddp": (lambda p: weighting.UPGrad(p, 3, refresh_every=2), True, False),
    "mgda_ub_refresh_ddp": (lambda p: weighting.MGDA(p, 3, refresh_every=2), True, True),
}


def _net():
    return SharedTrunkNet(seed=0, in_dim=6, hidden=16, feat=8, out_dims=(1, 1, 4))


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 6, generator=g, dtype=torch.float64)
    return x, [
        x[:, :1] * 3 + 0.1 * torch.randn(BATCH, 1, generator=g, dtype=torch.float64),
        (x[:, 1:2] - x[:, 2:3]) * 0.1,
        torch.randint(0, 4, (BATCH,), generator=g),
    ]


def _train(case: str, rank: int, world: int) -> dict[str, torch.Tensor]:
    """STEPS steps of SGD on this rank's share of the batch; the final parameters."""
    factory, ddp, representation = CASES[case]
    torch.manual_seed(0)  # the seed rank 0 draws for RLW and PCGrad: the one-process run's
    net = _net()
    model = nn.parallel.DistributedDataParallel(net) if ddp and world > 1 else net
    method = factory(list(net.trunk.parameters()))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    x, ys = _batch()
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for _ in range(STEPS):
        z, outputs = model(x[share])
        losses = [
            nn.functional.mse_loss(outputs[0], ys[0][share]),
            nn.functional.l1_loss(outputs[1], ys[1][share]),
            nn.functional.cross_entropy(outputs[2], ys[2][share]),
        ]
        if isinstance(method, weighting.GradientWeighting):
            method.backward(losses, features=z if representation else None)
        else:
            method.backward(losses)
        optimizer.step()
        optimizer.zero_grad()
    return {name: p.detach().clone() for name, p in net.named_parameters()}


def _worker(rank: int, directory: str, case: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=WORLD
    )
    try:
        result = _train(case, rank, WORLD)
        dist.barrier()  # no rank tears its connections down while another is in a collective
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(directory, f"rank{rank}.pt"))
    # CI twice lost a rank to SIGABRT ("terminate called without an active exception", no Python
    # error), with and without DistributedDataParallel, never in 200 local runs; where in torch's
    # native teardown is not known. The barrier above keeps ranks from closing connections another
    # still uses; leaving without the interpreter's teardown skips the rest, which this test of
    # the trained parameters has no business in.
    os._exit(0)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_with_half_batches_match_one_process(case, tmp_path):
    mp.spawn(_worker, args=(str(tmp_path), case), nprocs=WORLD)
    expected = _train(case, rank=0, world=1)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, value in expected.items():
            torch.testing.assert_close(
                got[name], value, rtol=1e-10, atol=1e-12, msg=f"rank {rank}, {name}"
            )


def test_ranks_end_bitwise_identical(tmp_path):
    """Every rank computes the same coefficients from the same averaged gradients."""
    mp.spawn(_worker, args=(str(tmp_path), "mgda_unwrapped"), nprocs=WORLD)
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    for name in first:
        assert torch.equal(first[name], second[name]), name
