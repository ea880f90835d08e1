"""Sweep 'multi_tensor': fusedmtl's multi-tensor ops against torch._foreach and flatten+cat.

One measurement is one call of an op over the gradients of K tasks (default 4) with respect to
ResNet-18's 62 float32 parameter tensors (11.7M elements); the outputs (standing for .grad) are
allocated and touched once, and every contender writes into them. Each contender's result is
checked against fused's once per op, and its peak extra memory measured (torch.profiler's CPU
allocator events; CUDA's peak statistics).

  normalized_sum  sum_i g_i / (||g_i|| + eps) into the outputs.
    foreach       the issue's recipe (no host sync): torch._foreach_norm over the K x P tensors,
                  then per task _foreach_div by the task's norm (a tensor) and _foreach_copy_ /
                  _foreach_add_ into out: one task's quotients (G floats) alive at a time
    foreach_sync  the fastest foreach code we know, at the price of a host sync: the norms,
                  the K coefficients as Python floats, _foreach_zero_ then _foreach_add_(alpha=c_i)
    flatten       cat into a fresh K x G matrix, row norms, coefficients @ matrix, split, copy
  gramian         <g_i, g_j>: foreach = torch.dot per (i <= j, tensor), summed; flatten = M M^T
  combine         out = sum_i c_i g_i: foreach = _foreach_mul by c_i (a tensor) then add;
                  foreach_sync with coeffs.tolist(); flatten = coeffs @ matrix, split, copy
  trim            TrimmedMean's masks in place (trim 1: the K - 2 middle values kept per
                  coordinate): foreach = per tensor, a stable argsort of the K x numel stack and a
                  scattered mask (fusedmtl's reference); flatten = the same on the K x G matrix,
                  split and copied back. In place, so the timed calls trim already trimmed
                  gradients (no contender's cost depends on the values); the check starts each
                  contender from the same gradients.
  sign_dropout    GradDrop's masks in place (f the identity, leak 0, given uniforms): foreach =
                  per tensor with torch operations (fusedmtl's reference); flatten = the same on
                  the K x G matrix, split and copied back. In place, as trim.

Least traffic (float32): normalized_sum (2K + 1) G 4 bytes (the gradients read twice, out
written), gramian K G 4, combine (K + 1) G 4, trim 2 K G 4 (read and written), sign_dropout
(2 K + 1) G 4 (and the uniforms read). Read-mostly ops
can pass 100 % of the copy bound (the copy's stores also cost a read of the destination line).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import fusedmtl.multi_tensor as mt
from bench.sweep import Common, Row, Sweep, check_targets, cosine_and_diff, targets_line
from bench.tables import fmt_bytes, fmt_ms, fmt_percent, fmt_ratio, render_table
from bench.timing import Clock, CopyBandwidth, num_threads, peak_extra_bytes, time_contenders
from bench.workload import flatten_rows, make_task_grads, resnet18_shapes, split_like
from fusedmtl.multi_tensor import reference

OPS = ("normalized_sum", "gramian", "combine", "trim", "sign_dropout")
IN_PLACE = ("trim", "sign_dropout")
TRIM = 1
EPS = 1e-8
# A wrong result is off by O(1); a float32 matmul over G = 11.7M products is not exact either
# (MKL's sgemm on an AMD EPYC: 2.6e-3 off the float64 Gramian, fused 3e-8).
AGREEMENT_TOLERANCE = 1e-2
SHORT = {"foreach_sync": "sync"}  # table headers


@dataclass
class Config(Common):
    ops: tuple[str, ...] = OPS
    tasks: int = 4
    shape_divisor: int = 1  # > 1 shrinks ResNet-18's shapes (tests)


def contenders(op: str, task_grads, out, coeffs, uniforms=None) -> dict:
    """Zero-argument callables doing one call of ``op`` each way; each returns its result."""
    k, p = len(task_grads), len(task_grads[0])
    every = [t for grads in task_grads for t in grads]
    vectors = [[t.reshape(-1) for t in grads] for grads in task_grads]

    def norms() -> torch.Tensor:
        return torch.stack(torch._foreach_norm(every)).view(k, p).norm(dim=1)

    def per_task_into(scale, factors) -> list[torch.Tensor]:
        for i, grads in enumerate(task_grads):
            (torch._foreach_copy_ if i == 0 else torch._foreach_add_)(out, scale(grads, factors[i]))
        return out

    def sync_into(factors: list[float]) -> list[torch.Tensor]:
        torch._foreach_zero_(out)
        for grads, c in zip(task_grads, factors):
            torch._foreach_add_(out, grads, alpha=c)
        return out

    def flatten_into(weights_of) -> list[torch.Tensor]:
        flat = flatten_rows(task_grads)
        torch._foreach_copy_(out, split_like(weights_of(flat) @ flat, out))
        return out

    def dots() -> torch.Tensor:
        entries = {}
        for i in range(k):
            for j in range(i, k):
                total = torch.stack([torch.dot(a, b) for a, b in zip(vectors[i], vectors[j])]).sum()
                entries[i, j] = entries[j, i] = total
        return torch.stack([entries[i, j] for i in range(k) for j in range(k)]).view(k, k)

    def gram(flat: torch.Tensor) -> torch.Tensor:
        return flat @ flat.T

    leak = torch.zeros(k, device=coeffs.device)

    def sign_dropout_flattened() -> None:
        flat = flatten_rows(task_grads)
        total, magnitude = torch.zeros_like(flat[0]), torch.zeros_like(flat[0])
        for row in flat:
            total.add_(row)
            magnitude.add_(row.abs())
        purity = 0.5 * (1.0 + total / magnitude)
        draw = torch.cat([u.reshape(-1) for u in uniforms])
        up, down = purity > draw, purity < draw
        flat.mul_((up & (flat > 0)) | (down & (flat < 0)))
        for grads, row in zip(task_grads, flat):
            torch._foreach_copy_(list(grads), split_like(row, grads))

    def trim_flattened() -> None:
        flat = flatten_rows(task_grads)
        order = flat.argsort(dim=0, stable=True)
        keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(0, order[TRIM : k - TRIM], True)
        flat.mul_(keep)
        for grads, row in zip(task_grads, flat):
            torch._foreach_copy_(list(grads), split_like(row, grads))

    return {
        "normalized_sum": {
            "fused": lambda: mt.normalized_sum(task_grads, eps=EPS, out=out),
            "foreach": lambda: per_task_into(torch._foreach_div, norms() + EPS),
            "foreach_sync": lambda: sync_into((1.0 / (norms() + EPS)).tolist()),
            "flatten": lambda: flatten_into(lambda flat: 1.0 / (flat.norm(dim=1) + EPS)),
        },
        "gramian": {
            "fused": lambda: mt.gramian(task_grads),
            "foreach": dots,
            "flatten": lambda: gram(flatten_rows(task_grads)),
        },
        "combine": {
            "fused": lambda: mt.combine(task_grads, coeffs, out=out),
            "foreach": lambda: per_task_into(torch._foreach_mul, coeffs),
            "foreach_sync": lambda: sync_into(coeffs.tolist()),
            "flatten": lambda: flatten_into(lambda flat: coeffs),
        },
        "trim": {
            "fused": lambda: mt.trim_(task_grads, TRIM),
            "foreach": lambda: reference.trim_(task_grads, TRIM),
            "flatten": trim_flattened,
        },
        "sign_dropout": {
            "fused": lambda: mt.sign_dropout_(task_grads, uniforms, leak),
            "foreach": lambda: reference.sign_dropout_(task_grads, uniforms, leak),
            "flatten": sign_dropout_flattened,
        },
    }[op]


def result_of(op: str, fn, out, task_grads) -> torch.Tensor:
    """One call's result as a vector: the Gramian, the outputs it wrote, or (the in-place ops)
    the gradients it masked, after which they are put back as they were."""
    if op in IN_PLACE:
        saved = [[t.clone() for t in grads] for grads in task_grads]
        fn()
        result = torch.cat([t.reshape(-1) for grads in task_grads for t in grads])
        for grads, copies in zip(task_grads, saved):
            torch._foreach_copy_(list(grads), copies)
        return result
    value = fn()
    return (
        value.detach().clone().reshape(-1)
        if op == "gramian"
        else torch.cat([t.reshape(-1) for t in out])
    )


class MultiTensor(Sweep):
    name = "multi_tensor"
    contenders = ("fused", "foreach", "foreach_sync", "flatten")

    def add_arguments(self, group) -> None:
        group.add_argument("--ops", default=",".join(OPS), help="from " + ",".join(OPS))
        group.add_argument(
            "--tasks", type=int, default=4, help="K for multi_tensor and weighting_step (default 4)"
        )
        group.add_argument(
            "--shape-divisor",
            type=int,
            default=1,
            help="divide ResNet-18's leading dimensions (multi_tensor and "
            "weighting_step; > 1 only for smoke tests)",
        )

    def config(self, args, common: Common) -> Config:
        ops = tuple(op.strip() for op in args.ops.split(","))
        if set(ops) - set(OPS) or args.tasks < 1:
            raise ValueError(f"--ops from {OPS} and --tasks >= 1, got {args.ops}, {args.tasks}")
        if "trim" in ops and args.tasks < 2 * TRIM + 1:  # (nothing to trim from 1 or 2 tasks)
            if args.ops != ",".join(OPS):
                raise ValueError(f"--ops trim needs --tasks >= {2 * TRIM + 1}")
            ops = tuple(op for op in ops if op != "trim")
        return Config(**vars(common), ops=ops, tasks=args.tasks, shape_divisor=args.shape_divisor)

    def planned_rows(self, c: Config) -> int:
        return len(c.threads) * len(c.ops)

    def run(self, c: Config, progress) -> list[Row]:
        device = torch.device(c.device)
        clock, copy = Clock(device), CopyBandwidth(device)
        shapes = resnet18_shapes(c.shape_divisor)
        task_grads = make_task_grads(shapes, c.tasks, device)
        # (the in-place ops mask their own copy, so the other ops see the same data)
        masked = {
            op: [[t.clone() for t in grads] for grads in task_grads]
            for op in IN_PLACE
            if op in c.ops
        }
        uniforms = None
        if "sign_dropout" in c.ops:
            uniforms = [torch.rand(s, device=device) for s in shapes]
        out = [torch.zeros(s, device=device) for s in shapes]  # touched, like .grad
        coeffs = torch.softmax(
            torch.randn(c.tasks, generator=torch.Generator().manual_seed(1)), 0
        ).to(device)
        k, g = c.tasks, sum(t.numel() for t in out)
        traffic = {
            "normalized_sum": 2 * k + 1,
            "gramian": k,
            "combine": k + 1,
            "trim": 2 * k,
            "sign_dropout": 2 * k + 1,
        }
        rows, checked = [], {}
        for threads in c.threads:
            with num_threads(threads):
                for op in c.ops:
                    progress.row(f"{op} K={k} t{threads}")
                    grads = masked.get(op, task_grads)
                    fns = contenders(op, grads, out, coeffs, uniforms)
                    row = Row(
                        self.name,
                        {
                            "op": op,
                            "tasks": k,
                            "elements": g,
                            "tensors": len(out),
                            "threads": threads,
                            "device": c.device,
                        },
                        {},
                        bytes=traffic[op] * g * 4,
                        bandwidth_gbs=copy.measure_gbs(c.repeats),
                    )
                    if op not in checked:  # once per op: results and memory
                        fused = result_of(op, fns["fused"], out, grads)
                        for name, fn in fns.items():
                            row.cosine[name], row.max_rel_diff[name] = cosine_and_diff(
                                result_of(op, fn, out, grads), fused
                            )
                        for name, fn in fns.items():  # (after the checks: trim's runs mask)
                            row.peak_bytes[name] = peak_extra_bytes(fn, device)
                        bad = {n: d for n, d in row.max_rel_diff.items() if d > AGREEMENT_TOLERANCE}
                        if bad:
                            raise AssertionError(f"{op}: contenders disagree with fused: {bad}")
                        checked[op] = row
                    else:
                        row.peak_bytes, row.max_rel_diff = (
                            checked[op].peak_bytes,
                            checked[op].max_rel_diff,
                        )
                    row.stats = time_contenders(fns, clock, c.repeats, c.warmup)
                    rows.append(row)
        return rows

    def report(self, rows) -> None:
        first, names = rows[0], self.contenders
        render_table(
            f"Multi-tensor ops, float32, K={first.tasks} x {first.tensors} tensors "
            f"(G={first.elements:,}), {first.device}: median ms per call; vs = contender / fused; "
            "sync = foreach_sync",
            [
                "op",
                "thr",
                *(SHORT.get(n, n) for n in names),
                *(f"vs {SHORT.get(n, n)}" for n in names[1:]),
                "% bound",
            ],
            [
                [
                    r.op,
                    str(r.threads),
                    *(fmt_ms(r.median(n)) for n in names),
                    *(fmt_ratio(r.ratio(n)) for n in names[1:]),
                    fmt_percent(r.fraction_of_bound()),
                ]
                for r in rows
            ],
            left_columns=2,
        )
        once = {r.op: r for r in rows}.values()
        render_table(
            "Multi-tensor ops: peak extra memory of a call (beyond gradients and outputs), "
            "largest relative difference from fused",
            ["op", *(SHORT.get(n, n) for n in names), "max rel diff"],
            [
                [
                    r.op,
                    *(fmt_bytes(r.peak_bytes.get(n)) if n in r.peak_bytes else "-" for n in names),
                    f"{max(v for n, v in r.max_rel_diff.items() if n != 'fused'):.1e}",
                ]
                for r in once
            ],
            left_columns=1,
        )
        line = targets_line(self.name, check_targets(self.name, rows))
        if line:
            print(line)
