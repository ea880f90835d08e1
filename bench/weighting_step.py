"""Sweep 'weighting_step': the step of every gradient-based method after the K per-task backward
passes, fused against the same step done the flatten way and against torchjd.

On K (default 4) task gradients of ResNet-18's shapes (62 tensors, 11.7M elements), into the
parameters' existing .grad:
  fused    ``method.step(task_grads, losses)``: the Gramian (or its diagonal) in one multi-tensor
           pass, ``method.coefficients``, sum_i c_i g_i added into .grad in a second pass.
  flatten  torch.cat into a fresh K x G matrix, the Gramian by a matmul (over the last layer's
           columns for GradNorm), the same ``method.coefficients``, coeffs @ matrix split into
           .grad. DB-MTL's running averages are kept the flatten way too (a K x G matrix, scaled
           and lerped in place).
  torchjd  ``torchjd.autojac.jac_to_grad`` with the method's aggregator, on .jac fields as
           mtl_backward leaves them (see bench/peers.py); methods torchjd has.
Each contender has its own fresh method instance (stateful methods evolve independently).
Agreement: one step of each from fresh instances into zeroed .grad, the cosine and the largest
relative difference of its .grad from fused's. A step() that modifies the gradients it is given
(DB-MTL scales them in place) gets a private copy for the timed calls (marked *).

Least traffic: the Gramian pass reads K x G (GradNorm: the last layer's columns), the combine pass
reads them again and reads and writes .grad: (K G_gram + K G + 2 G) 4 bytes. Peak extra memory:
one step in steady state (after a first one), state kept between steps not included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import fusedmtl.weighting as weighting
from bench import peers
from bench.sweep import Common, Row, Sweep, cosine_and_diff
from bench.tables import (
    drop_empty_columns,
    fmt_ms,
    fmt_percent,
    fmt_ratio,
    memory_and_agreement_table,
    render_table,
)
from bench.timing import Clock, CopyBandwidth, num_threads, peak_extra_bytes, time_contenders
from bench.workload import (
    build,
    chosen_methods,
    flatten_step,
    gramian_columns,
    loss_values,
    make_task_grads,
    resnet18_shapes,
)

AGREEMENT_TOLERANCE = 1e-2  # see multi_tensor: flatten's float32 Gramian is 2.6e-3 off on AMD


@dataclass
class Config(Common):
    methods: tuple[str, ...] = tuple(weighting.GRADIENT_BASED)
    tasks: int = 4
    shape_divisor: int = 1


def zero_grads(params) -> None:
    for p in params:
        p.grad = torch.zeros_like(p)


class WeightingStep(Sweep):
    name = "weighting_step"
    contenders = ("fused", "flatten", "torchjd")
    full_threads = "1"  # memory-bound like multi_tensor, whose sweep shows the thread scaling

    def add_arguments(self, group) -> None:
        group.add_argument(
            "--methods",
            default="all",
            help="comma-separated weighting names "
            "(GRADIENT_BASED for weighting_step, LOSS_BASED too for training_step)",
        )

    def config(self, args, common: Common) -> Config:
        return Config(
            **vars(common),
            methods=tuple(chosen_methods(args.methods, weighting.GRADIENT_BASED)),
            tasks=args.tasks,
            shape_divisor=args.shape_divisor,
        )

    def planned_rows(self, c: Config) -> int:
        return len(c.threads) * len(c.methods)

    def steps(self, name, params, task_grads, losses, fused_grads):
        """Fresh contenders (fused on ``fused_grads``, the others on ``task_grads``) and notes
        saying why a contender cannot run."""
        k, columns = len(task_grads), gramian_columns(name, params)
        fused, flatten = build(name, k, params), build(name, k, params)
        combine = flatten_step(name, flatten, params, columns)
        steps = {
            "fused": lambda: fused.step(fused_grads, losses),
            "flatten": lambda: combine(task_grads, losses),
        }
        notes = {}
        try:
            steps["torchjd"] = peers.weighting_step(name, params, task_grads)
        except LookupError as missing:
            notes["torchjd"] = str(missing)
        return steps, notes

    def agreement(self, row: Row, name, params, task_grads, losses) -> bool:
        """One step of each contender from fresh instances into zeroed .grad (cosine and largest
        relative difference from fused's .grad); returns whether fused's step modified its
        input."""
        copies = [[t.clone() for t in grads] for grads in task_grads]
        steps, row.notes = self.steps(name, params, task_grads, losses, copies)
        grads = {}
        for contender, step in steps.items():
            zero_grads(params)
            step()
            grads[contender] = torch.cat([p.grad.reshape(-1) for p in params])
        for contender, value in grads.items():
            row.cosine[contender], row.max_rel_diff[contender] = cosine_and_diff(
                value, grads["fused"]
            )
        return any(
            not torch.equal(a, b) for ra, rb in zip(copies, task_grads) for a, b in zip(ra, rb)
        )

    def run(self, c: Config, progress) -> list[Row]:
        device = torch.device(c.device)
        clock, copy = Clock(device), CopyBandwidth(device)
        shapes = resnet18_shapes(c.shape_divisor)
        params = [torch.zeros(s, device=device, requires_grad=True) for s in shapes]
        task_grads = make_task_grads(shapes, c.tasks, device)
        losses = loss_values(c.tasks, device)
        k, g = c.tasks, sum(p.numel() for p in params)
        rows, first = [], {}
        for threads in c.threads:
            with num_threads(threads):
                for name in c.methods:
                    progress.row(f"{name} K={k} t{threads}")
                    row = Row(
                        self.name,
                        {
                            "method": name,
                            "tasks": k,
                            "elements": g,
                            "tensors": len(params),
                            "threads": threads,
                            "device": c.device,
                        },
                        {},
                        bytes=(k * (gramian_columns(name, params) or g) + k * g + 2 * g) * 4,
                        bandwidth_gbs=copy.measure_gbs(c.repeats),
                    )
                    if name in first:
                        seen = first[name]
                        row.cosine, row.max_rel_diff = seen.cosine, seen.max_rel_diff
                        row.notes, row.info["mutates_input"] = seen.notes, seen.mutates_input
                    else:
                        row.info["mutates_input"] = self.agreement(
                            row, name, params, task_grads, losses
                        )
                    private = (
                        [[t.clone() for t in grads] for grads in task_grads]
                        if row.mutates_input
                        else task_grads
                    )
                    steps, _ = self.steps(name, params, task_grads, losses, private)
                    zero_grads(params)
                    if name not in first:
                        for contender, step in steps.items():
                            step()  # steady state: lazily made state is not this step's
                            row.peak_bytes[contender] = peak_extra_bytes(step, device)
                        first[name] = row
                    else:
                        row.peak_bytes = first[name].peak_bytes
                    row.stats = time_contenders(steps, clock, c.repeats, c.warmup)
                    rows.append(row)
        for p in params:
            p.grad = None
        return rows

    def report(self, rows) -> None:
        first, names = rows[0], self.contenders
        columns, cells = drop_empty_columns(
            ["method", "thr", *(f"{n} ms" for n in names), "vs flatten", "vs torchjd", "% bound"],
            [
                [
                    r.method + (" *" if r.mutates_input else ""),
                    str(r.threads),
                    *(fmt_ms(r.median(n)) for n in names),
                    fmt_ratio(r.ratio("flatten")),
                    fmt_ratio(r.ratio("torchjd")),
                    fmt_percent(r.fraction_of_bound()),
                ]
                for r in rows
            ],
            keep_first=4,
        )
        render_table(
            f"Weighting step after the per-task backward passes, float32, K={first.tasks} x "
            f"{first.tensors} tensors (G={first.elements:,}), {first.device}: median ms; "
            "vs = contender / fused",
            columns,
            cells,
            left_columns=2,
        )
        memory_and_agreement_table(self.name, names, rows)
        if any(r.mutates_input for r in rows):
            print(
                "* step() scales the task gradients it is given in place; its fused contender "
                "was timed on a private copy."
            )
