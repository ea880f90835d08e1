"""Sweep 'training_step': a whole multi-task step per weighting method, against plain PyTorch and
torchjd.

The model: a conv trunk on 32x32 RGB inputs (convolutions of 8, 16 and 32 channels, the last two
with stride 2, then a linear layer to 128 shared features: 272K shared parameters; --width scales
it) and K = 4 linear heads: two regressions (MSE, smooth-L1) and two classifications
(cross-entropy). Batch 32, random inputs and targets made once. Every contender computes the same
task losses (torch.nn.functional), so the ratios measure the weighting machinery.

One measurement: ``zero_grad(set_to_none=True)``, the forward pass, the K losses, the weighting
and every parameter's .grad written (an optimizer step short of an iteration; the parameters do
not move, so every step sees the same losses).
  fused    ``method.backward(losses)`` of a fusedmtl.weighting module.
  plain    plain PyTorch. Gradient-based: K torch.autograd.grad calls, the trunk gradients into a
           K x G matrix, its Gramian by a matmul, the same ``coefficients``, split into .grad
           (the weighting_step sweep's flatten contender). Loss-based: sum_i L_i / K backward,
           the floor any loss-based method can reach.
  torchjd  the method's torchjd aggregator (mtl_backward + jac_to_grad) or scalarizer, where
           torchjd has it (bench/peers.py).
Agreement: .grad of every parameter after one step of fresh instances, cosine with fused's.
Peak extra memory: one step in steady state. Not memory-bound: no bandwidth bound here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import fusedmtl.weighting as weighting
from bench import peers
from bench.sweep import Common, Row, Sweep, cosine_and_diff
from bench.tables import (
    drop_empty_columns,
    fmt_ms,
    fmt_ratio,
    memory_and_agreement_table,
    render_table,
)
from bench.timing import Clock, num_threads, peak_extra_bytes, time_contenders
from bench.workload import build, chosen_methods, flatten_step, gramian_columns

HEADS = (("regression", 1), ("regression", 4), ("classification", 10), ("classification", 5))


class SharedTrunkModel(nn.Module):
    """Conv trunk -> shared features z -> one linear head per task."""

    def __init__(self, width: int = 128):
        super().__init__()
        channels = max(4, width // 16)  # 8, 16, 32 channels at width 128
        self.trunk = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * channels, 4 * channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * channels * 8 * 8, width),
            nn.ReLU(),
        )
        self.heads = nn.ModuleList(nn.Linear(width, outputs) for _, outputs in HEADS)

    @property
    def shared(self) -> list[torch.Tensor]:
        return list(self.trunk.parameters())

    def batch(self, size: int, device, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(size, 3, 32, 32, generator=generator).to(device)
        targets = [
            torch.randn(size, n, generator=generator).to(device)
            if kind == "regression"
            else torch.randint(n, (size,), generator=generator).to(device)
            for kind, n in HEADS
        ]
        return x, targets

    def losses(self, x, targets) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the shared features, the K task losses)."""
        features = self.trunk(x)
        fns = (F.mse_loss, F.smooth_l1_loss, F.cross_entropy, F.cross_entropy)
        return features, [fn(head(features), t) for fn, head, t in zip(fns, self.heads, targets)]


@dataclass
class Config(Common):
    methods: tuple[str, ...] = (*weighting.GRADIENT_BASED, *weighting.LOSS_BASED)
    batch_size: int = 32
    width: int = 128


def fused_step(name: str, model: SharedTrunkModel, x, targets):
    shared = model.shared
    method = build(name, len(HEADS), shared)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        method.backward(model.losses(x, targets)[1])

    return step


def plain_step(name: str, model: SharedTrunkModel, x, targets):
    k, shared = len(HEADS), model.shared
    if name in weighting.LOSS_BASED:

        def weighted_sum() -> None:
            model.zero_grad(set_to_none=True)
            sum(loss / k for loss in model.losses(x, targets)[1]).backward()

        return weighted_sum
    combine = flatten_step(name, build(name, k, shared), shared, gramian_columns(name, shared))

    def per_task_flatten() -> None:
        model.zero_grad(set_to_none=True)
        losses = model.losses(x, targets)[1]
        task_grads = []
        for i, (loss, head) in enumerate(zip(losses, model.heads)):
            head_params = list(head.parameters())
            grads = torch.autograd.grad(loss, shared + head_params, retain_graph=i < k - 1)
            task_grads.append(list(grads[: len(shared)]))
            for p, g in zip(head_params, grads[len(shared) :]):
                p.grad = g
        combine(task_grads, torch.stack([loss.detach() for loss in losses]))

    return per_task_flatten


def torchjd_step(name: str, model: SharedTrunkModel, x, targets):
    return peers.training_step(
        name,
        lambda: model.losses(x, targets),
        model.shared,
        [list(head.parameters()) for head in model.heads],
        lambda: model.zero_grad(set_to_none=True),
    )


FACTORIES = {"fused": fused_step, "plain": plain_step, "torchjd": torchjd_step}


def all_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
            for p in model.parameters()
        ]
    )


class TrainingStep(Sweep):
    name = "training_step"
    contenders = tuple(FACTORIES)
    full_threads = "1"  # a small model's step scales with threads the same way for every method

    def add_arguments(self, group) -> None:
        group.add_argument("--batch-size", type=int, default=32, help="batch (default 32)")
        group.add_argument(
            "--width",
            type=int,
            default=128,
            help="shared feature width; the trunk's channels scale with it (default 128)",
        )

    def config(self, args, common: Common) -> Config:
        every = {**weighting.GRADIENT_BASED, **weighting.LOSS_BASED}
        return Config(
            **vars(common),
            methods=tuple(chosen_methods(args.methods, every)),
            batch_size=args.batch_size,
            width=args.width,
        )

    def planned_rows(self, c: Config) -> int:
        return len(c.threads) * len(c.methods)

    def make_steps(self, name, model, x, targets) -> tuple[dict, dict]:
        """The contenders that can run this method (each has run one untimed step, which proves
        it works) and notes saying why the others cannot."""
        steps, notes = {}, {}
        for contender, factory in FACTORIES.items():
            try:
                step = factory(name, model, x, targets)
                step()
            except LookupError as missing:
                notes[contender] = str(missing)
                continue
            steps[contender] = step
        return steps, notes

    def run(self, c: Config, progress) -> list[Row]:
        device = torch.device(c.device)
        clock = Clock(device)
        torch.manual_seed(0)
        model = SharedTrunkModel(c.width).to(device)
        x, targets = model.batch(c.batch_size, device)
        shared = sum(p.numel() for p in model.shared)
        rows, first = [], {}
        for threads in c.threads:
            with num_threads(threads):
                for name in c.methods:
                    progress.row(f"{name} B={c.batch_size} t{threads}")
                    family = "gradient" if name in weighting.GRADIENT_BASED else "loss"
                    row = Row(
                        self.name,
                        {
                            "method": name,
                            "family": family,
                            "tasks": len(HEADS),
                            "shared_elements": shared,
                            "batch_size": c.batch_size,
                            "threads": threads,
                            "device": c.device,
                        },
                        {},
                    )
                    if name not in first:  # fresh instances, one step each
                        steps, row.notes = self.make_steps(name, model, x, targets)
                        grads = {}
                        for contender in steps:
                            FACTORIES[contender](name, model, x, targets)()
                            grads[contender] = all_grads(model)
                        for contender, value in grads.items():
                            if contender == "plain" and family == "loss":
                                continue  # constant weights: nothing to compare
                            row.cosine[contender], row.max_rel_diff[contender] = cosine_and_diff(
                                value, grads["fused"]
                            )
                        for contender, step in steps.items():
                            row.peak_bytes[contender] = peak_extra_bytes(step, device)
                        first[name] = row
                    else:
                        seen = first[name]
                        row.cosine, row.max_rel_diff = seen.cosine, seen.max_rel_diff
                        row.peak_bytes, row.notes = seen.peak_bytes, seen.notes
                        steps, _ = self.make_steps(name, model, x, targets)
                    row.stats = time_contenders(steps, clock, c.repeats, c.warmup)
                    rows.append(row)
        model.zero_grad(set_to_none=True)
        return rows

    def report(self, rows) -> None:
        first, names = rows[0], self.contenders
        columns, cells = drop_empty_columns(
            ["method", "kind", "thr", *(f"{n} ms" for n in names), *(f"vs {n}" for n in names[1:])],
            [
                [
                    r.method,
                    r.family,
                    str(r.threads),
                    *(fmt_ms(r.median(n)) for n in names),
                    *(fmt_ratio(r.ratio(n)) for n in names[1:]),
                ]
                for r in rows
            ],
            keep_first=5,
        )
        render_table(
            f"Training step (zero_grad, forward, K={first.tasks} losses, weighting, .grad) of a "
            f"conv trunk ({first.shared_elements:,} shared parameters), batch {first.batch_size}, "
            f"{first.device}: median ms; plain = flatten (gradient-based) or sum L_i / K "
            "(loss-based); vs = contender / fused",
            columns,
            cells,
            left_columns=3,
        )
        memory_and_agreement_table(self.name, names, rows)
