"""Gradient-based weighting on a trunk sharded with FSDP2 (torch.distributed.fsdp.fully_shard):
2 gloo processes with half the batch each end with parameter shards equal to the corresponding
slices of one unsharded process trained on the whole batch (float64), for MGDA, UPGrad,
GradNormalization, PCGrad and DB-MTL, in parameter and representation mode, with a GradScaler,
with the heads sharded too or left plain; a loss-based method under FSDP; a checkpoint saved with
torch.distributed.checkpoint and loaded into a fresh sharded run continues identically; the
communication of a step is counted (one K x K all-reduce beyond FSDP's own collectives) against
the unsharded data-parallel path.

All cases run in one pair of spawned processes (a spawn costs seconds here); each test reads its
case's result."""

from __future__ import annotations

import os
from collections import defaultdict

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fusedmtl import multi_tensor, weighting

pytestmark = pytest.mark.skipif(
    not dist.is_available(), reason="torch.distributed is not available"
)

WORLD = 2
BATCH = 32
STEPS = 3
K = 3


class Net(nn.Module):
    """A trunk whose parameters shard unevenly over 2 ranks (15 rows: 8 and 7) or not at all
    (``gate``, one row: rank 1's shard is empty), and three heads."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.trunk = Trunk()
            self.heads = nn.ModuleList(nn.Linear(8, d) for d in (1, 1, 4))
        self.double()

    def forward(self, x):
        z = self.trunk(x)
        return z, [head(z) for head in self.heads]


class _Overflow(torch.autograd.Function):
    """The identity, whose backward puts inf into the first element of the gradient: an
    overflow in one rank's backward pass only."""

    @staticmethod
    def forward(ctx, h):
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad.view(-1)[0] = float("inf")
        return grad


class Trunk(nn.Module):
    overflow = False  # set on one rank to overflow that rank's gradient of `first`

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 15)
        self.second = nn.Linear(15, 8)
        self.gate = nn.Parameter(torch.rand(1, 8) + 0.5)

    def forward(self, x):
        h = self.first(x)
        if self.overflow:
            h = _Overflow.apply(h)
        return torch.tanh(self.second(torch.tanh(h))) * self.gate


# name: (method factory (trunk params) -> weighting, heads sharded too, representation, scaler)
CASES = {
    "mgda": (lambda p: weighting.MGDA(p, K), True, False, False),
    "mgda_plain_heads": (lambda p: weighting.MGDA(p, K), False, False, False),
    "upgrad": (lambda p: weighting.UPGrad(p, K), True, False, False),
    # HSDP on a 2 x 1 mesh: the ranks are replicas (each shard is the whole tensor), FSDP
    # all-reduces the gradients over the replicate dimension, the Gramian sums over the shard one
    # (GradNormalization: its coefficients see the Gramian's scale, which a wrong group doubles)
    "grad_normalization_hsdp": (lambda p: weighting.GradNormalization(p, K), True, False, False),
    "grad_normalization": (lambda p: weighting.GradNormalization(p, K), False, False, False),
    "pcgrad": (lambda p: weighting.PCGrad(p, K, seed=0), True, False, False),
    "db_mtl": (lambda p: weighting.DBMTL(p, K), True, False, False),
    "gradnorm_learned": (
        lambda p: weighting.GradNorm(p, K, last_shared_layer=p[3:5]),
        True,
        False,
        False,
    ),
    "mgda_ub": (lambda p: weighting.MGDA(p, K), True, True, False),
    "mgda_ub_plain_heads": (lambda p: weighting.MGDA(p, K), False, True, False),
    # step(): per-task gradients the caller took (the sharded .grad DTensors)
    "mgda_step": (lambda p: weighting.MGDA(p, K), True, False, False),
    "upgrad_scaler": (lambda p: weighting.UPGrad(p, K), True, False, True),
    # (torch's GradScaler needs every gradient sharded or none: the heads are sharded too)
    "db_mtl_scaler": (lambda p: weighting.DBMTL(p, K), True, False, True),
    # refresh_every=2: the second of the STEPS steps reuses the first's coefficients (two FSDP
    # backward passes), with the heads sharded or not, in representation mode, under a scaler
    "mgda_refresh": (lambda p: weighting.MGDA(p, K, refresh_every=2), True, False, False),
    "upgrad_refresh_plain_heads": (
        lambda p: weighting.UPGrad(p, K, refresh_every=2),
        False,
        False,
        False,
    ),
    "mgda_ub_refresh": (lambda p: weighting.MGDA(p, K, refresh_every=2), True, True, False),
    "db_mtl_refresh_scaler": (lambda p: weighting.DBMTL(p, K, refresh_every=2), True, False, True),
    "uncertainty": (lambda p: weighting.Uncertainty(K), True, False, False),
    "rlw": (lambda p: weighting.RLW(K), True, False, False),
    "famo": (lambda p: weighting.FAMO(K), True, False, False),
}
# every registered method, through its example, heads sharded
CASES.update(
    {
        f"registry_{name}": (lambda p, cls=cls: cls.example(K, p), True, False, False)
        for name, cls in {**weighting.GRADIENT_BASED, **weighting.LOSS_BASED}.items()
    }
)
CHECKPOINT_CASE = "db_mtl"
LOSS_CASES = ("uncertainty", "rlw", "famo", *(f"registry_{n}" for n in weighting.LOSS_BASED))
GRADIENT_CASES = tuple(c for c in CASES if c not in LOSS_CASES)


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 6, generator=g, dtype=torch.float64)
    return x, [
        x[:, :1] * 3 + 0.1 * torch.randn(BATCH, 1, generator=g, dtype=torch.float64),
        (x[:, 1:2] - x[:, 2:3]) * 0.1,
        torch.randint(0, 4, (BATCH,), generator=g),
    ]


def _setup(case: str, sharded: bool):
    """The model (sharded over the default group when ``sharded``), the method, the optimizer
    and the scaler of a case."""
    factory, shard_heads, _, scaler = CASES[case]
    torch.manual_seed(0)
    model = Net()
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if case.endswith("_hsdp"):
            mesh = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh("cpu", (WORLD,))
        fully_shard(model.trunk.first, mesh=mesh)
        fully_shard(model.trunk, mesh=mesh)
        if shard_heads:
            fully_shard(model, mesh=mesh)
    method = factory(list(model.trunk.parameters()))
    optimizer = torch.optim.SGD([*model.parameters(), *method.parameters()], lr=0.1, momentum=0.9)
    grad_scaler = (
        torch.amp.GradScaler("cpu", init_scale=2.0**6, growth_interval=1) if scaler else None
    )
    return model, method, optimizer, grad_scaler


def _steps(case, model, method, optimizer, grad_scaler, rank, world, steps):
    _, _, representation, _ = CASES[case]
    x, ys = _batch()
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    coeffs = None
    for _ in range(steps):
        z, outputs = model(x[share])
        losses = [
            nn.functional.mse_loss(outputs[0], ys[0][share]),
            nn.functional.l1_loss(outputs[1], ys[1][share]),
            nn.functional.cross_entropy(outputs[2], ys[2][share]),
        ]
        if case.endswith("_step"):
            shared, grads = list(model.trunk.parameters()), []
            for i, loss in enumerate(losses):
                loss.backward(retain_graph=i < K - 1)
                grads.append([p.grad for p in shared])
                for p in shared:
                    p.grad = None
            coeffs = method.step(grads)
        elif isinstance(method, weighting.GradientWeighting):
            coeffs = method.backward(
                losses, features=z if representation else None, grad_scaler=grad_scaler
            )
        else:
            coeffs = method.backward(losses, grad_scaler=grad_scaler)
        if grad_scaler is not None:
            grad_scaler.step(optimizer)
            grad_scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad()
    return coeffs


def _local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if hasattr(t, "to_local") else t).detach().clone()


def _result(model, method, coeffs) -> dict:
    return {
        "params": {name: _local(p) for name, p in model.named_parameters()},
        "method": {name: _local(p) for name, p in method.named_parameters()},
        "coeffs": coeffs.detach().clone(),
    }


def _reference(case: str, steps: int = STEPS) -> dict:
    model, method, optimizer, grad_scaler = _setup(case, sharded=False)
    coeffs = _steps(case, model, method, optimizer, grad_scaler, 0, 1, steps)
    return _result(model, method, coeffs)


def _recording_gramian(shapes: list):
    """multi_tensor.gramian, recording the shape of every gradient it is handed."""
    original = multi_tensor.gramian

    def recording(task_grads, diagonal_only=False):
        shapes.extend(tuple(g.shape) for row in task_grads for g in row if g is not None)
        return original(task_grads, diagonal_only=diagonal_only)

    return original, recording


def _counting_collectives(counts: dict):
    """Wraps the collectives FSDP2 and fusedmtl call, adding each call's tensor bytes (what a
    rank puts in) to ``counts[op]``; returns a function that restores them."""
    names = ("all_reduce", "all_gather_single", "reduce_scatter_single", "broadcast")
    originals = {name: getattr(dist, name) for name in names}

    def wrap(name, original):
        def counted(*args, **kwargs):
            tensor = {
                "all_reduce": lambda: args[0] if args else kwargs["tensor"],
                "broadcast": lambda: args[0] if args else kwargs["tensor"],
                "all_gather_single": lambda: args[1] if len(args) > 1 else kwargs["input_tensor"],
                "reduce_scatter_single": lambda: args[1] if len(args) > 1 else kwargs["input"],
            }[name]()
            counts[name] += tensor.numel() * tensor.element_size()
            return original(*args, **kwargs)

        return counted

    for name, original in originals.items():
        setattr(dist, name, wrap(name, original))
    return lambda: [setattr(dist, name, f) for name, f in originals.items()]


def _communication(rank: int, sharded: bool) -> dict:
    """The bytes each collective carries in one MGDA step (the second: after set-up)."""
    model, method, optimizer, _ = _setup("mgda", sharded=sharded)
    _steps("mgda", model, method, optimizer, None, rank, WORLD, 1)
    counts = defaultdict(int)
    restore = _counting_collectives(counts)
    try:
        _steps("mgda", model, method, optimizer, None, rank, WORLD, 1)
    finally:
        restore()
    return dict(counts)


def _worker(rank: int, directory: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=WORLD
    )
    results = {}
    try:
        for case in CASES:
            shapes = []
            original, recording = _recording_gramian(shapes)
            multi_tensor.gramian = recording
            try:
                model, method, optimizer, grad_scaler = _setup(case, sharded=True)
                coeffs = _steps(case, model, method, optimizer, grad_scaler, rank, WORLD, STEPS)
            finally:
                multi_tensor.gramian = original
            results[case] = {**_result(model, method, coeffs), "gramian_shapes": shapes}
        results["overflow"] = _overflow_run(rank)
        results["flags"] = _flag_checks()
        results["checkpoint"] = _checkpoint_run(rank, os.path.join(directory, "checkpoint"))
        results["bytes_fsdp"] = _communication(rank, sharded=True)
        results["bytes_ddp"] = _communication(rank, sharded=False)
        dist.barrier()  # no rank tears its connections down while another is in a collective
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(directory, f"rank{rank}.pt"))
    # As in test_weighting_distributed.py: skip the interpreter's teardown, which twice lost a
    # rank to SIGABRT in CI there.
    os._exit(0)


def _overflow_run(rank: int) -> dict:
    """A step on which only rank 0's gradient overflows (in its shard of `first`), under a
    GradScaler: what each rank's scaler, parameters and DB-MTL's state did."""
    model, method, optimizer, grad_scaler = _setup("db_mtl_scaler", sharded=True)
    _steps("db_mtl_scaler", model, method, optimizer, grad_scaler, rank, WORLD, 1)
    before = {name: _local(p) for name, p in model.named_parameters()}
    scale = grad_scaler.get_scale()
    model.trunk.overflow = rank == 0
    _steps("db_mtl_scaler", model, method, optimizer, grad_scaler, rank, WORLD, 1)
    return {
        "scale": (scale, grad_scaler.get_scale()),
        "unchanged": all(
            torch.equal(before[name], _local(p)) for name, p in model.named_parameters()
        ),
        "steps_done": int(method.steps_done),
    }


def _flag_checks() -> dict:
    """What ``sharded=`` does with ordinary, sharded and mixed shared parameters."""
    out = {}
    plain = list(Net().trunk.parameters())
    try:
        weighting.MGDA(plain, K, sharded=True)
    except ValueError as error:
        out["plain_required"] = str(error)
    out["plain_detected"] = weighting.MGDA(plain, K)._sharding is None
    model, *_ = _setup("mgda", sharded=True)
    shards = list(model.trunk.parameters())
    out["sharded_detected"] = weighting.MGDA(shards, K)._sharding is not None
    out["sharded_off"] = weighting.MGDA(shards, K, sharded=False)._sharding is None
    try:
        weighting.MGDA([*shards, *plain[:1]], K)
    except ValueError as error:
        out["mixed"] = str(error)
    return out


def _checkpoint_run(rank: int, path: str) -> dict:
    """2 steps, dcp.save of the model, the optimizer and the method; a fresh sharded model,
    optimizer and method loaded with dcp.load, 2 more steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    case = CHECKPOINT_CASE
    model, method, optimizer, _ = _setup(case, sharded=True)
    _steps(case, model, method, optimizer, None, rank, WORLD, 2)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save(
        {"model": model_state, "optimizer": optimizer_state, "method": method.state_dict()},
        checkpoint_id=path,
    )
    del model, method, optimizer
    model, method, optimizer, _ = _setup(case, sharded=True)
    # A fresh run's state differs: one step on another batch part, so loading must overwrite it.
    _steps(case, model, method, optimizer, None, 1 - rank, WORLD, 1)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state, "method": method.state_dict()}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )
    method.load_state_dict(state["method"])
    coeffs = _steps(case, model, method, optimizer, None, rank, WORLD, 2)
    return _result(model, method, coeffs)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(str(directory),), nprocs=WORLD)
    return [torch.load(directory / f"rank{r}.pt") for r in range(WORLD)]


def _shard(full: torch.Tensor, rank: int) -> torch.Tensor:
    """FSDP2's shard of ``full`` on ``rank``: torch.chunk along dim 0, empty past the chunks."""
    chunks = torch.chunk(full, WORLD, dim=0)
    return chunks[rank] if rank < len(chunks) else full[:0]


def _assert_matches(ranks, key: str, expected: dict) -> None:
    for rank, got in enumerate(r[key] for r in ranks):
        for name, value in expected["params"].items():
            local = got["params"][name]
            # sharded: the rank's slice; plain heads: the whole tensor
            want = _shard(value, rank) if local.shape != value.shape else value
            torch.testing.assert_close(
                local, want, rtol=1e-10, atol=1e-12, msg=f"{key}: rank {rank}, {name}"
            )
        for name, value in expected["method"].items():
            torch.testing.assert_close(got["method"][name], value, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got["coeffs"], expected["coeffs"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_ranks_match_one_process(ranks, case):
    _assert_matches(ranks, case, _reference(case))
    if case.endswith("_hsdp"):
        return
    # the trunk is sharded for real: rank 1's shard of `gate` is empty, of `first` 7 of 15 rows
    assert ranks[1][case]["params"]["trunk.gate"].shape == (0, 8)
    assert ranks[1][case]["params"]["trunk.first.weight"].shape == (7, 6)


@pytest.mark.parametrize("case", list(CASES))
def test_coefficients_identical_on_every_rank(ranks, case):
    assert torch.equal(ranks[0][case]["coeffs"], ranks[1][case]["coeffs"])


@pytest.mark.parametrize("case", [c for c, v in CASES.items() if not v[2] and c in GRADIENT_CASES])
def test_gramian_reads_only_local_shards(ranks, case):
    """At most the rank's shard of each task gradient: never a full trunk gradient."""
    full = {tuple(p.shape) for p in Net().trunk.parameters()}
    for rank in range(WORLD):
        local = {
            tuple(p.shape) for name, p in ranks[rank][case]["params"].items() if "trunk" in name
        }
        shapes = set(ranks[rank][case]["gramian_shapes"])
        assert shapes and shapes <= local, (rank, shapes, local)
        assert not shapes & (full - local)


def test_overflow_on_one_rank_skips_the_step_on_every_rank(ranks):
    """Only rank 0's shard is non-finite: the summed Gramian is non-finite on every rank, so no
    rank updates DB-MTL's state, and every rank's GradScaler skips the step (DTensor reduces
    the scaler's found-inf flag over the mesh)."""
    for rank in range(WORLD):
        got = ranks[rank]["overflow"]
        assert got["scale"][1] == got["scale"][0] / 2, (rank, got)
        assert got["unchanged"], rank
        assert got["steps_done"] == 1, rank


def test_sharded_flag(ranks):
    flags = ranks[0]["flags"]
    assert "every shared parameter must be sharded" in flags["plain_required"]
    assert flags["plain_detected"] and flags["sharded_detected"] and flags["sharded_off"]
    assert "every shared parameter must be sharded" in flags["mixed"]


def test_checkpoint_continues_identically(ranks):
    _assert_matches(ranks, "checkpoint", _reference(CHECKPOINT_CASE, steps=4))


def test_communication_one_gramian_all_reduce(ranks):
    """FSDP: K reduce-scatters of the trunk's gradient, all-gathers of its parameters, and
    all-reduces of K losses and one K x K Gramian only (plus the plain heads: none here, sharded);
    the unsharded path all-reduces K whole gradients."""
    params = list(Net().trunk.parameters())
    numel = sum(p.numel() for p in params)
    heads = sum(p.numel() for p in Net().heads.parameters())
    for rank in range(WORLD):
        fsdp, ddp = ranks[rank]["bytes_fsdp"], ranks[rank]["bytes_ddp"]
        assert fsdp["all_reduce"] == (K + K * K) * 8, fsdp
        # FSDP pads every tensor's dim 0 to a multiple of WORLD before the reduce-scatter
        assert fsdp["reduce_scatter_single"] >= K * numel * 8
        assert ddp["all_reduce"] == (K + K * numel + heads) * 8, ddp
        assert "reduce_scatter_single" not in ddp
    print("\nbytes per rank per MGDA step (K=3):", ranks[0]["bytes_fsdp"], ranks[0]["bytes_ddp"])
