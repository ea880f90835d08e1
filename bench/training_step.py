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
  fused    ``method.backward(losses)`` of a fusedmtl.weighting module (the exact method).
  r4, r16  gradient-based: the same with ``refresh_every`` 4 and 16 (amortized coefficients); a
           sample is a whole period of 4 or 16 steps (one refresh), its time per step.
  repr     gradient-based: representation mode, ``backward(losses, features=z)``.
  sum      gradient-based: a plain step, one backward pass of sum_i L_i, the floor.
  plain    plain PyTorch. Gradient-based: K torch.autograd.grad calls, the trunk gradients into a
           K x G matrix, its Gramian by a matmul, the same ``coefficients``, split into .grad
           (the weighting_step sweep's flatten contender). Loss-based: sum_i L_i / K backward,
           the floor any loss-based method can reach.
  torchjd  the method's torchjd aggregator (mtl_backward + jac_to_grad) or scalarizer, where
           torchjd has it (bench/peers.py).
Samples: 4 x --repeats per loss-based row, 2 x per gradient-based one (REPEATS_PER_FAMILY).
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
from bench.sweep import Common, Row, Sweep, check_targets, cosine_and_diff, targets_line
from bench.tables import (
    drop_empty_columns,
    fmt_ms,
    fmt_ratio,
    memory_and_agreement_table,
    render_table,
)
from bench.timing import Clock, Stats, num_threads, peak_extra_bytes, time_contenders
from bench.workload import build, chosen_methods, flatten_step, gramian_columns, make_method

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


def _gradient_only(name: str) -> None:
    if name not in weighting.GRADIENT_BASED:
        raise LookupError("gradient-based methods only")


def refresh_step(every: int):
    """``refresh_every=every``: one call is a period of ``every`` steps (the times are divided)."""

    def factory(name: str, model: SharedTrunkModel, x, targets):
        _gradient_only(name)
        options = {**peers.matching_options(name), "refresh_every": every}
        method = make_method(name, len(HEADS), model.shared, **options)

        def period() -> None:
            for _ in range(every):
                model.zero_grad(set_to_none=True)
                method.backward(model.losses(x, targets)[1])

        return period

    return factory


def representation_step(name: str, model: SharedTrunkModel, x, targets):
    _gradient_only(name)
    if not weighting.GRADIENT_BASED[name].representation_mode:
        raise LookupError("no representation mode (its state is per shared parameter)")
    # DB-MTL's running averages of feature gradients would mix batches: without them there
    options = {"beta": 0.0} if name == "db_mtl" else {}
    method = make_method(name, len(HEADS), model.shared, **peers.matching_options(name), **options)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        features, losses = model.losses(x, targets)
        method.backward(losses, features=features)

    return step


def summed_step(name: str, model: SharedTrunkModel, x, targets):
    _gradient_only(name)  # (plain is the summed step of the loss-based rows)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        sum(model.losses(x, targets)[1]).backward()

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


FACTORIES = {
    "fused": fused_step,
    "r4": refresh_step(4),
    "r16": refresh_step(16),
    "repr": representation_step,
    "sum": summed_step,
    "plain": plain_step,
    "torchjd": torchjd_step,
}
STEPS_PER_CALL = {"r4": 4, "r16": 16}
# Samples per row: --repeats times these. The targets are ratios within 3% (loss-based) and 25%
# (r16) of a step whose samples scatter by ~10% (IQR) on a shared 2-core host, where the median
# of 15 moved by +-3% between runs; the loss-based rows (three ~7 ms contenders) cost little.
REPEATS_PER_FAMILY = {"loss": 4, "gradient": 2}
RATIO_COLUMNS = ("f/base", "r16/sum", "jd/f")
SHORT = {"torchjd": "jd"}  # (the table must fit 120 columns)


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
                    repeats = c.repeats * REPEATS_PER_FAMILY[family]
                    row.stats = time_contenders(steps, clock, repeats, c.warmup)
                    for contender, n in STEPS_PER_CALL.items():  # per step
                        if contender in row.stats:
                            samples = row.stats[contender].samples_ms
                            row.stats[contender] = Stats.of([t / n for t in samples])
                    rows.append(row)
        model.zero_grad(set_to_none=True)
        return rows

    def report(self, rows) -> None:
        first, names = rows[0], self.contenders

        def over(r, contender, base) -> str:
            a, b = r.median(contender), r.median(base)
            return fmt_ratio(a / b if a and b else None)

        columns, cells = drop_empty_columns(
            ["method", "kind", "thr", *(SHORT.get(n, n) for n in names), *RATIO_COLUMNS],
            [
                [
                    r.method,
                    r.family,
                    str(r.threads),
                    *(fmt_ms(r.median(n)) for n in names),
                    over(r, "fused", "sum" if r.family == "gradient" else "plain"),
                    over(r, "r16", "sum"),
                    over(r, "torchjd", "fused"),
                ]
                for r in rows
            ],
            keep_first=4,
        )
        render_table(
            f"Training step (zero_grad, forward, K={first.tasks} losses, weighting, .grad) of a "
            f"conv trunk ({first.shared_elements:,} shared parameters), batch {first.batch_size}, "
            f"{first.device}: median ms per step; fused = the exact method, r4/r16 = refresh_every "
            "4/16, repr = representation mode, sum = one backward of sum_i L_i, plain = flatten "
            "(gradient-based) or sum L_i / K (loss-based), jd = torchjd; f/base = fused over sum "
            "(gradient-based) or plain (loss-based)",
            columns,
            cells,
            left_columns=3,
        )
        # the contenders of the exact method (the table fits 120 columns)
        memory_and_agreement_table(self.name, ("fused", "plain", "torchjd"), rows)
        line = targets_line(self.name, check_targets(self.name, rows))
        if line:
            print(line)
