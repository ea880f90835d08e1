"""Sweep 'training_step': a whole multi-task step per weighting method, against plain PyTorch.

The model (``SharedTrunkModel``): a conv trunk on 32x32 RGB inputs (3 convolutions of 8, 16 and 32
channels, the last two with stride 2, then a linear layer to 128 shared features: 272K shared
parameters; --width scales it) and K = 4 linear task heads: two
regressions (1 output, MSE; 4 outputs, smooth-L1) and two classifications (10 and 5 classes,
cross-entropy). Batch 32 by default, random inputs and targets made once. All contenders compute
the same task losses (torch.nn.functional), so the ratios measure the weighting machinery, not
the losses (the losses sweep measures those).

What one measurement is: ``model.zero_grad(set_to_none=True)``, the forward pass, the K losses,
the per-task gradients, the weighting, and every parameter's .grad written -- an optimizer step
short of a training iteration (parameters are not updated, so every step sees the same losses).
  fused    ``method.backward(losses)``: a fusedmtl.weighting module (fresh instance).
  plain    plain PyTorch. Gradient-based methods: K torch.autograd.grad calls over the trunk and
           the task's head, the trunk gradients flattened into a K x G matrix, the Gramian by a
           matmul, the same method's ``coefficients`` (a second fresh instance), coeffs @ matrix
           split into the trunk's .grad, each head's gradient into its .grad (the weighting_step
           sweep's flatten contender after the autograd calls). Loss-based methods:
           ``sum_i w_i L_i`` with constant weights 1/K, then ``.backward()``: the floor any
           loss-based method can reach.
  torchjd  ``torchjd.mtl_backward`` with the matching aggregator, when torchjd is importable.
  libmtl   LibMTL's weighting class of the same method driven through a small adapter, when
           LibMTL is importable.
Optional libraries are never required: when one is missing, or has no such method, or fails on
its first step, its column stays empty and a note says why.

Not memory-bound (convolutions and autograd dominate): no bandwidth bound here.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import fusedmtl.weighting as weighting
from fusedmtl.bench.common import (
    ALL_THREADS, DEFAULT_WARMUP, Clock, ContenderResults, Progress, Stats, drop_empty_columns,
    fmt_ms, fmt_ratio,
    num_threads, optional_module, render_table, section_ends, time_contenders,
)
from fusedmtl.bench.multi_tensor import max_rel_diff
from fusedmtl.bench.weighting import (
    AGREEMENT_TOLERANCE, chosen_methods, flatten_step, gramian_columns, make_method,
)

# The full run measures 1 thread only: a small model's step scales with
# threads the same way for every method.
FULL_THREADS = "1"
NAME = "training_step"
CONTENDERS = ("fused", "plain", "torchjd", "libmtl")
DEFAULT_BATCH = 32
# (kind, outputs) per task head: regression heads are fit with MSE / smooth-L1, classification
# heads with cross-entropy.
HEADS = (("regression", 1), ("regression", 4), ("classification", 10), ("classification", 5))

# The same method in the optional libraries: torchjd aggregator classes (with their
# constructor's keyword arguments) and LibMTL weighting classes.
TORCHJD_AGGREGATORS = {
    "upgrad": ("UPGrad", {}), "mgda": ("MGDA", {}), "pcgrad": ("PCGrad", {}),
    "cagrad": ("CAGrad", {"c": 0.5}), "imtl_g": ("IMTLG", {}), "aligned_mtl": ("AlignedMTL", {}),
    "nash_mtl": ("NashMTL", {"n_tasks": len(HEADS)}),
}
LIBMTL_WEIGHTINGS = {
    "mgda": "MGDA", "pcgrad": "PCGrad", "cagrad": "CAGrad", "imtl_g": "IMTL",
    "aligned_mtl": "Aligned_MTL", "nash_mtl": "Nash_MTL", "db_mtl": "DB_MTL", "gradnorm": "GradNorm",
    "fixed": "EW", "uncertainty": "UW", "rlw": "RLW", "dwa": "DWA",
}
# Keyword arguments LibMTL's weightings read in backward(losses, **kwargs), at fusedmtl's defaults.
LIBMTL_KWARGS = {
    "mgda_gn": "l2", "calpha": 0.5, "rescale": 0, "alpha": 1.5, "DB_beta": 0.9,
    "DB_beta_sigma": 0.5, "update_weights_every": 1, "optim_niter": 20, "max_norm": 1.0, "T": 2.0,
}


@dataclass
class Config:
    methods: Sequence[str] = (*weighting.GRADIENT_BASED, *weighting.LOSS_BASED)
    threads: Sequence[int] = (1, ALL_THREADS)
    batch_size: int = DEFAULT_BATCH
    width: int = 128  # shared features; the trunk's channels scale with width / 16
    repeats: int = 15
    warmup: int = DEFAULT_WARMUP
    device: str = "cpu"


# ----------------------------------------------------------------------------------------------
# The model and its data


class SharedTrunkModel(nn.Module):
    """Conv trunk -> shared features z -> one linear head per task."""

    def __init__(self, width: int = 128, heads: Sequence[tuple[str, int]] = HEADS):
        super().__init__()
        channels = max(4, width // 16)  # 8, 16, 32 channels at width 128
        self.trunk = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * channels, 4 * channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(4 * channels * 8 * 8, width), nn.ReLU(),
        )
        self.heads = nn.ModuleList(nn.Linear(width, outputs) for _, outputs in heads)
        self.kinds = [kind for kind, _ in heads]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = self.trunk(x)
        return features, [head(features) for head in self.heads]

    @property
    def shared(self) -> list[torch.Tensor]:
        return list(self.trunk.parameters())

    @property
    def last_shared_layer(self) -> list[torch.Tensor]:
        return list(self.trunk[-2].parameters())


def make_batch(model: SharedTrunkModel, batch: int, device: torch.device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=generator).to(device)
    targets = []
    for kind, head in zip(model.kinds, model.heads):
        if kind == "regression":
            targets.append(torch.randn(batch, head.out_features, generator=generator).to(device))
        else:
            targets.append(torch.randint(head.out_features, (batch,), generator=generator).to(device))
    return x, targets


def task_losses(model: SharedTrunkModel, outputs, targets) -> list[torch.Tensor]:
    regression = iter((F.mse_loss, F.smooth_l1_loss))
    losses = []
    for kind, output, target in zip(model.kinds, outputs, targets):
        if kind == "regression":
            losses.append(next(regression, F.mse_loss)(output, target))
        else:
            losses.append(F.cross_entropy(output, target))
    return losses


# ----------------------------------------------------------------------------------------------
# The contenders: each a zero-argument callable doing one whole step


Step = Callable[[], object]


def fused_step(name: str, model: SharedTrunkModel, x, targets) -> Step:
    k = len(model.heads)
    method = make_method(name, k, model.shared, model.last_shared_layer)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        _, outputs = model(x)
        method.backward(task_losses(model, outputs, targets))

    return step


def plain_step(name: str, model: SharedTrunkModel, x, targets) -> Step:
    k = len(model.heads)
    if name in weighting.LOSS_BASED:

        def weighted_sum() -> None:
            model.zero_grad(set_to_none=True)
            _, outputs = model(x)
            sum(loss / k for loss in task_losses(model, outputs, targets)).backward()

        return weighted_sum

    shared = model.shared
    method = make_method(name, k, shared, model.last_shared_layer)
    combine = flatten_step(name, method, shared, gramian_columns(name, shared))

    def per_task_flatten() -> None:
        model.zero_grad(set_to_none=True)
        _, outputs = model(x)
        losses = task_losses(model, outputs, targets)
        task_grads = []
        for i, (loss, head) in enumerate(zip(losses, model.heads)):
            head_params = list(head.parameters())
            grads = torch.autograd.grad(loss, shared + head_params, retain_graph=i < k - 1)
            task_grads.append(list(grads[: len(shared)]))
            for p, g in zip(head_params, grads[len(shared):]):
                p.grad = g
        combine(task_grads, torch.stack([loss.detach() for loss in losses]))

    return per_task_flatten


def torchjd_step(name: str, model: SharedTrunkModel, x, targets) -> Step:
    torchjd = optional_module("torchjd")
    if torchjd is None:
        raise LookupError("torchjd is not installed")
    if name not in TORCHJD_AGGREGATORS:
        raise LookupError(f"torchjd has no {name}")
    from torchjd import aggregation

    class_name, options = TORCHJD_AGGREGATORS[name]
    aggregator = getattr(aggregation, class_name)(**options)
    shared = model.shared

    def step() -> None:
        model.zero_grad(set_to_none=True)
        features, outputs = model(x)
        losses = task_losses(model, outputs, targets)
        if hasattr(torchjd, "jac_to_grad"):  # torchjd >= 0.9: Jacobians first, then aggregation
            torchjd.mtl_backward(losses, features)
            torchjd.jac_to_grad(shared, aggregator)
        else:
            torchjd.mtl_backward(losses=losses, features=features, aggregator=aggregator)

    return step


def libmtl_step(name: str, model: SharedTrunkModel, x, targets) -> Step:
    module = optional_module("LibMTL.weighting")
    if module is None:
        raise LookupError("LibMTL is not installed")
    if name not in LIBMTL_WEIGHTINGS or not hasattr(module, LIBMTL_WEIGHTINGS[name]):
        raise LookupError(f"LibMTL has no {name}")
    base = getattr(module, LIBMTL_WEIGHTINGS[name])
    device = x.device
    k = len(model.heads)

    class Adapter(base):
        """What LibMTL's trainer provides a weighting: the task count, the device, the shared
        parameters and the epoch."""

        def __init__(self) -> None:
            super().__init__()
            self.task_num, self.device, self.rep_grad, self.epoch = k, device, False, 0
            self.train_loss_buffer = torch.ones(k, 2)
            self.init_param()

        def get_share_params(self):
            return model.trunk.parameters()

        def zero_grad_share_params(self) -> None:
            model.trunk.zero_grad(set_to_none=False)

    adapter = Adapter().to(device)
    accepted = inspect.signature(base.backward).parameters
    kwargs = LIBMTL_KWARGS if "kwargs" in accepted else {}

    def step() -> None:
        model.zero_grad(set_to_none=True)
        _, outputs = model(x)
        adapter.backward(torch.stack(task_losses(model, outputs, targets)), **kwargs)

    return step


STEP_FACTORIES = {"fused": fused_step, "plain": plain_step, "torchjd": torchjd_step,
                  "libmtl": libmtl_step}


# ----------------------------------------------------------------------------------------------
# Rows


@dataclass
class Row(ContenderResults):
    method: str
    family: str
    k: int
    shared_elements: int
    batch_size: int
    threads: int
    device: str
    repeats: int
    stats: dict[str, Stats]
    max_rel_diff: float | None = None
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def row_id(self) -> str:
        return f"{self.method}|B{self.batch_size}|t{self.threads}"


def grads_of(model: nn.Module) -> torch.Tensor:
    return torch.cat([
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
        for p in model.parameters()
    ])


def make_steps(name: str, model: SharedTrunkModel, x, targets) -> tuple[dict[str, Step], dict]:
    """The contenders that can run this method, each having run one untimed step (which also
    proves it works); notes say why the others cannot."""
    steps, notes = {}, {}
    for contender, factory in STEP_FACTORIES.items():
        try:
            step = factory(name, model, x, targets)
            step()
        except LookupError as missing:
            notes[contender] = str(missing)
            continue
        except Exception as error:  # noqa: BLE001 - an optional library failing is reported
            if contender in ("fused", "plain"):
                raise
            notes[contender] = f"failed: {type(error).__name__}: {error}"
            continue
        steps[contender] = step
    return steps, notes


def agreement(name: str, model: SharedTrunkModel, x, targets) -> float | None:
    """Gradient-based methods: .grad after one step of fresh fused and plain contenders, the
    largest difference relative to the largest magnitude (loss-based plain uses constant
    weights, so there is nothing to compare)."""
    if name not in weighting.GRADIENT_BASED:
        return None
    fused_step(name, model, x, targets)()
    fused = grads_of(model)
    plain_step(name, model, x, targets)()
    return max_rel_diff(grads_of(model), fused)


def planned_rows(config: Config) -> int:
    return len(config.threads) * len(config.methods)


def run(config: Config, progress: Progress) -> list[Row]:
    device = torch.device(config.device)
    clock = Clock(device)
    torch.manual_seed(0)
    model = SharedTrunkModel(config.width).to(device)
    x, targets = make_batch(model, config.batch_size, device)
    k = len(model.heads)
    shared_elements = sum(p.numel() for p in model.shared)
    diffs: dict[str, float | None] = {}
    rows: list[Row] = []
    for threads in config.threads:
        with num_threads(threads):
            for name in config.methods:
                progress.row(f"{name} B={config.batch_size} t{threads}")
                if name not in diffs:
                    diffs[name] = agreement(name, model, x, targets)
                steps, notes = make_steps(name, model, x, targets)
                stats = time_contenders(steps, clock, config.repeats, config.warmup)
                rows.append(Row(
                    method=name,
                    family="gradient" if name in weighting.GRADIENT_BASED else "loss",
                    k=k, shared_elements=shared_elements, batch_size=config.batch_size,
                    threads=threads, device=str(device), repeats=config.repeats, stats=stats,
                    max_rel_diff=diffs[name], notes=notes,
                ))
    model.zero_grad(set_to_none=True)
    return rows


# ----------------------------------------------------------------------------------------------
# Output

COLUMNS = (
    "method", "kind", "threads", "fused ms", "plain ms", "torchjd ms", "libmtl ms", "plain/fused",
    "torchjd/fused", "libmtl/fused", "max rel diff",
)


def table_cells(row: Row) -> list[str]:
    diff = "-" if row.max_rel_diff is None else f"{row.max_rel_diff:.1e}"
    if row.max_rel_diff is not None and not row.max_rel_diff <= AGREEMENT_TOLERANCE:
        diff += " MISMATCH"
    return [
        row.method, row.family, str(row.threads),
        *(fmt_ms(row.median(c)) for c in CONTENDERS),
        *(fmt_ratio(row.ratio(c)) for c in CONTENDERS[1:]), diff,
    ]


def report(rows: Sequence[Row]) -> None:
    if not rows:
        return
    first = rows[0]
    columns, cells = drop_empty_columns(
        COLUMNS, [table_cells(row) for row in rows],
        ("torchjd ms", "libmtl ms", "torchjd/fused", "libmtl/fused"),
    )
    render_table(
        f"Training step (zero_grad, forward, K={first.k} losses, per-task gradients, weighting, "
        f".grad) of a conv trunk ({first.shared_elements:,} shared parameters), batch "
        f"{first.batch_size}, {first.device}: median ms; plain = flatten (gradient-based) or a "
        "constant weighted sum (loss-based)",
        columns, cells, left_columns=3,
        ends=section_ends([(row.threads, row.family) for row in rows]),
    )
    missing: dict[str, set[str]] = {}
    for row in rows:
        for contender, note in row.notes.items():
            key = note if note.endswith("not installed") else f"{row.method}: {note}"
            missing.setdefault(contender, set()).add(key)
    for contender, notes in missing.items():
        print(f"{contender}: " + "; ".join(sorted(notes)))


def records(rows: Sequence[Row]) -> list[dict]:
    out = []
    for row in rows:
        fields = {
            "sweep": NAME, "method": row.method, "family": row.family, "tasks": row.k,
            "shared_elements": row.shared_elements, "batch_size": row.batch_size,
            "threads": row.threads, "device": row.device, "repeats": row.repeats,
            "max_rel_diff": row.max_rel_diff,
        }
        out += row.contender_records(row.row_id, fields)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training_step sweep")
    group.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                       help=f"training_step batch size (default {DEFAULT_BATCH})")
    group.add_argument("--width", type=int, default=128,
                       help="training_step shared feature width; the trunk's channels scale "
                       "with it (default 128)")


def config_from_args(args: argparse.Namespace, common: dict) -> Config:
    every = (*weighting.GRADIENT_BASED, *weighting.LOSS_BASED)
    return Config(
        methods=chosen_methods(args.methods, every), batch_size=args.batch_size,
        width=args.width, **common,
    )
