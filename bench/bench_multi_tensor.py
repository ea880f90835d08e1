#!/usr/bin/env python
"""Benchmark of fusedmtl's multi-tensor ops against torch._foreach and flatten-and-concatenate.

What one measurement is: one call of an op over the gradients of K tasks (default 4) with respect
to a ResNet-18-like list of 62 float32 parameter tensors (11,689,512 elements, see
``resnet18_shapes``). The task gradients are random N(0, 1), generated once; the P output tensors
(standing for the parameters' .grad) are allocated and touched once, before timing, and every
contender writes into them.

Ops and contenders (all three compute the same result; checked once per op before timing):
  normalized_sum  sum_i g_i / (||g_i|| + eps) into the outputs.
    fused    fusedmtl.multi_tensor.normalized_sum(task_grads, out=out)
    foreach  one torch._foreach_norm over the K x P tensors, a total norm per task, the K
             coefficients 1 / (norm + eps) as Python floats, then torch._foreach_zero_(out) and
             torch._foreach_add_(out, g_i, alpha=c_i) per task (no gradient-sized temporaries)
    flatten  torch.cat of each task's flattened gradients into the rows of a fresh K x G matrix
             (one copy: cat(out=row), the cheapest form of the idiom), its row norms, the
             coefficients, coeffs @ matrix (a fresh G vector), split back and copied into out
  gramian         the K x K matrix of inner products <g_i, g_j>.
    fused    fusedmtl.multi_tensor.gramian(task_grads)
    foreach  torch.dot per (i <= j, parameter) summed: K(K+1)/2 x P dot products, no temporaries
             (torch._foreach_mul(g_i, g_j) then sums is the other foreach spelling; it writes a
             G-sized temporary per pair and measured about 5x slower than the dots here)
    flatten  the K x G matrix as above, then matrix @ matrix.T
  combine         out = sum_i c_i g_i with given coefficients (Tensor[K]).
    fused    fusedmtl.multi_tensor.combine(task_grads, coeffs, out=out)
    foreach  coeffs.tolist(), torch._foreach_zero_(out), torch._foreach_add_(out, g_i, alpha=c_i)
    flatten  the K x G matrix, coeffs @ matrix, split, copied into out

How (see /work/shared/BUILD_NOTES.md, "Measuring on a 2-core shared machine", and
bench_losses.py, whose timing helpers this script imports): the contenders of one op are
interleaved in an order rotating from one repetition to the next, after warm-up rounds, with the
cyclic garbage collector off; statistics are medians (with min and IQR), and the ratios
foreach/fused and flatten/fused come from the same run. Each row is measured with 1 thread and
with all threads (torch's default).

Memory-bandwidth bound: just before each row the copy bandwidth is measured (bench_losses'
``measure_copy_bandwidth``: dst.copy_(src) on two 64 MB buffers, same thread setting). The least
traffic of each op, in float32 bytes: normalized_sum reads the K x G gradients twice (norms, then
the weighted sum) and writes G, (2K + 1) G 4; gramian reads them once, K G 4; combine reads them
once and writes G, (K + 1) G 4. bound = bytes / bandwidth; "fused % of bound" = bound / fused time.
Read-mostly ops (gramian, combine) can pass 100 %: the copy's stores also cost a read of the
destination line (write-allocate), which the copy's read+write byte count does not include, so
streaming reads go faster than the copy bandwidth says.

Extra memory: see ``estimate_extra_bytes`` (CPU: an estimate from the tensors each approach
allocates) and ``measure_extra_bytes`` (CUDA: torch.cuda.max_memory_allocated deltas; CPU: the
peak of the allocator events recorded by torch.profiler, printed as a cross-check).

The flatten approach allocates a fresh K x G matrix every call (187 MB at K = 4): large fresh CPU
buffers page-fault on first touch, a real cost of that approach. PyTorch's THP_MEM_ALLOC_ENABLE=1
makes that cheaper; run the script with and without it to compare (its value is recorded).

Usage:
  python bench/bench_multi_tensor.py                  # 1 and all threads, 15 repeats
  python bench/bench_multi_tensor.py --quick          # 5 repeats (about 30 s)
  python bench/bench_multi_tensor.py --threads 1 --tasks 8 --ops normalized_sum --json out.json
  python bench/bench_multi_tensor.py --device cuda    # CUDA events for timing

The functions are importable (``resnet18_shapes``, ``make_task_grads``, ``measure_op``,
``run_sweep``, ``check_targets``, ...).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # imported from elsewhere
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fusedmtl  # noqa: E402
import fusedmtl.multi_tensor as mt  # noqa: E402
from bench_losses import (  # noqa: E402
    ALL_THREADS,
    DEFAULT_WARMUP,
    Bandwidth,
    Clock,
    ContenderResults,
    CopyBuffers,
    Stats,
    environment,
    measure_copy_bandwidth,
    parse_threads,
    render_table,
    run_cli,
    time_interleaved,
)

OPS = ("normalized_sum", "gramian", "combine")
CONTENDERS = ("fused", "foreach", "flatten")
DEFAULT_TASKS = 4
DEFAULT_REPEATS = 15
QUICK_REPEATS = 5
QUICK_WARMUP = 2
EPS = 1e-8
BYTES_PER_ELEMENT = 4  # float32
RESNET18_TENSORS = 62
RESNET18_ELEMENTS = 11_689_512

TaskGrads = list[list[torch.Tensor]]


# ----------------------------------------------------------------------------------------------
# The parameter list and the gradients


def resnet18_shapes() -> list[tuple[int, ...]]:
    """The parameter shapes of torchvision's ResNet-18 (1000 classes), in module order: 62 tensors,
    11,689,512 elements.

    conv1 64x3x7x7 and bn1 (weight, bias of 64); then four stages of two BasicBlocks with widths
    64, 128, 256, 512. A BasicBlock is conv 3x3 (in -> width), bn, conv 3x3 (width -> width), bn;
    the first block of stages 2-4 (where the width doubles and the stride is 2) also has a
    downsample 1x1 conv (in -> width) and its bn. Finally fc: weight 1000x512 and bias 1000.
    Convolutions have no bias; each BatchNorm contributes its weight and bias vectors (running
    statistics are buffers, not parameters).
    """
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_channels = 64
    for stage, width in enumerate((64, 128, 256, 512)):
        for block in range(2):
            shapes += [(width, in_channels, 3, 3), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            if block == 0 and stage > 0:
                shapes += [(width, in_channels, 1, 1), (width,), (width,)]
            in_channels = width
    shapes += [(1000, 512), (1000,)]
    total = sum(math.prod(shape) for shape in shapes)
    assert len(shapes) == RESNET18_TENSORS, len(shapes)
    assert total == RESNET18_ELEMENTS, total
    return shapes


def make_task_grads(
    shapes: Sequence[tuple[int, ...]], k: int, device: torch.device, seed: int = 0
) -> TaskGrads:
    """K lists of N(0, 1) float32 gradients of the given shapes."""
    generator = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(shape, generator=generator).to(device) for shape in shapes]
        for _ in range(k)
    ]


def make_outputs(shapes: Sequence[tuple[int, ...]], device: torch.device) -> list[torch.Tensor]:
    """Preallocated, touched output tensors, one per parameter (like .grad)."""
    return [torch.zeros(shape, device=device) for shape in shapes]


def make_coeffs(k: int, device: torch.device, seed: int = 1) -> torch.Tensor:
    """Given combination weights, as a weighting method would produce them: positive, sum 1."""
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(k, generator=generator), 0).to(device)


# ----------------------------------------------------------------------------------------------
# The contenders: each returns a zero-argument callable doing one op call


def _flatten(task_grads: TaskGrads) -> torch.Tensor:
    """A fresh K x G matrix holding each task's flattened gradients in a row (one copy)."""
    k, g = len(task_grads), sum(t.numel() for t in task_grads[0])
    first = task_grads[0][0]
    flat = torch.empty((k, g), dtype=first.dtype, device=first.device)
    for i, grads in enumerate(task_grads):
        torch.cat([t.reshape(-1) for t in grads], out=flat[i])
    return flat


def _unflatten_into(vector: torch.Tensor, out: Sequence[torch.Tensor]) -> None:
    """Splits a G vector back into the parameters' shapes and copies it into ``out``."""
    pieces = vector.split([t.numel() for t in out])
    torch._foreach_copy_(list(out), [piece.view_as(t) for piece, t in zip(pieces, out)])


def normalized_sum_contenders(
    task_grads: TaskGrads, out: list[torch.Tensor], eps: float = EPS
) -> dict[str, Callable[[], object]]:
    k, p = len(task_grads), len(task_grads[0])
    every = [t for grads in task_grads for t in grads]

    def fused() -> object:
        return mt.normalized_sum(task_grads, eps=eps, out=out)

    def foreach() -> object:
        per_tensor = torch.stack(torch._foreach_norm(every)).view(k, p)
        norms = torch.linalg.vector_norm(per_tensor, dim=1)
        coeffs = (1.0 / (norms + eps)).tolist()
        torch._foreach_zero_(out)
        for grads, c in zip(task_grads, coeffs):
            torch._foreach_add_(out, grads, alpha=c)
        return out, norms

    def flatten() -> object:
        flat = _flatten(task_grads)
        norms = torch.linalg.vector_norm(flat, dim=1)
        combined = (1.0 / (norms + eps)) @ flat
        _unflatten_into(combined, out)
        return out, norms

    return {"fused": fused, "foreach": foreach, "flatten": flatten}


def gramian_contenders(task_grads: TaskGrads) -> dict[str, Callable[[], object]]:
    k = len(task_grads)
    vectors = [[t.reshape(-1) for t in grads] for grads in task_grads]

    def fused() -> object:
        return mt.gramian(task_grads)

    def foreach() -> object:
        entries: dict[tuple[int, int], torch.Tensor] = {}
        for i in range(k):
            for j in range(i, k):
                dots = [torch.dot(a, b) for a, b in zip(vectors[i], vectors[j])]
                entries[i, j] = entries[j, i] = torch.stack(dots).sum()
        return torch.stack([entries[i, j] for i in range(k) for j in range(k)]).view(k, k)

    def flatten() -> object:
        flat = _flatten(task_grads)
        return flat @ flat.T

    return {"fused": fused, "foreach": foreach, "flatten": flatten}


def combine_contenders(
    task_grads: TaskGrads, coeffs: torch.Tensor, out: list[torch.Tensor]
) -> dict[str, Callable[[], object]]:
    def fused() -> object:
        return mt.combine(task_grads, coeffs, out=out)

    def foreach() -> object:
        torch._foreach_zero_(out)
        for grads, c in zip(task_grads, coeffs.tolist()):
            torch._foreach_add_(out, grads, alpha=c)
        return out

    def flatten() -> object:
        _unflatten_into(coeffs @ _flatten(task_grads), out)
        return out

    return {"fused": fused, "foreach": foreach, "flatten": flatten}


def make_contenders(
    op: str, task_grads: TaskGrads, out: list[torch.Tensor], coeffs: torch.Tensor
) -> dict[str, Callable[[], object]]:
    if op == "normalized_sum":
        return normalized_sum_contenders(task_grads, out)
    if op == "gramian":
        return gramian_contenders(task_grads)
    if op == "combine":
        return combine_contenders(task_grads, coeffs, out)
    raise ValueError(f"unknown op {op!r}")


def check_agreement(
    op: str, contenders: dict[str, Callable[[], object]], out: list[torch.Tensor]
) -> dict[str, float]:
    """Runs each contender once and returns its largest relative difference from fused (over the
    output tensors, or the Gramian), so that the timed contenders are known to compute the same
    thing. Raises if one is off by more than 1e-3."""

    def result() -> torch.Tensor:
        if op == "gramian":
            return contenders[name]().detach().clone()
        contenders[name]()
        return torch.cat([t.reshape(-1) for t in out])

    references: dict[str, torch.Tensor] = {}
    for name in contenders:
        references[name] = result()
    fused = references["fused"].double()
    scale = fused.abs().max().clamp_min(1e-30)
    errors = {
        name: float((value.double() - fused).abs().max() / scale)
        for name, value in references.items()
    }
    bad = {name: error for name, error in errors.items() if error > 1e-3}
    if bad:
        raise AssertionError(f"{op}: contenders disagree with fused: {bad}")
    return errors


# ----------------------------------------------------------------------------------------------
# Traffic, bound and memory


def op_bytes(op: str, k: int, g: int) -> int:
    """Least bytes an op moves (float32): see the module docstring."""
    elements = {"normalized_sum": (2 * k + 1) * g, "gramian": k * g, "combine": (k + 1) * g}[op]
    return elements * BYTES_PER_ELEMENT


def estimate_extra_bytes(op: str, contender: str, k: int, g: int, p: int) -> int:
    """Peak memory an approach allocates beyond the gradients and the preallocated outputs,
    estimated from the tensors its code creates (float32, 4 bytes an element; the CPU allocator
    rounds small blocks up, which these few-byte terms ignore):

      fused    only its small results: normalized_sum the K norms, then norm + eps and the
               coefficients (3K); gramian the K x K matrix; combine nothing (coefficients given).
               Per-thread partial sums inside the kernels are K x K at most, not counted.
      foreach  no gradient-sized temporaries: normalized_sum K P per-tensor norms (0-dim), their
               stack (K P), the K total norms and coefficients; gramian, for the pair being
               summed, P dot results (0-dim) and their stack, plus the K(K+1)/2 pair sums and the
               K x K matrix; combine nothing.
      flatten  the K x G matrix, alive for the whole call, plus: normalized_sum the combined G
               vector and the K norms and coefficients; gramian the K x K product; combine the
               combined G vector.
    """
    pairs = k * (k + 1) // 2
    elements = {
        ("normalized_sum", "fused"): 3 * k,
        ("normalized_sum", "foreach"): 2 * k * p + 3 * k,
        ("normalized_sum", "flatten"): k * g + g + 3 * k,
        ("gramian", "fused"): k * k,
        ("gramian", "foreach"): 2 * p + pairs + k * k,
        ("gramian", "flatten"): k * g + k * k,
        ("combine", "fused"): 0,
        ("combine", "foreach"): 0,
        ("combine", "flatten"): k * g + g,
    }[op, contender]
    return elements * BYTES_PER_ELEMENT


def measure_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated by one call of ``fn`` above what was allocated before it.

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated
    before. CPU: the running sum of the allocation and free events of PyTorch's CPU allocator that
    torch.profiler records (profile_memory=True), in time order, at its maximum. Returns None when
    the profiler records no memory events."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return peak
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    try:
        events = prof.profiler.kineto_results.events()
        memory = sorted(
            (event.start_ns(), event.nbytes()) for event in events if event.name() == "[memory]"
        )
    except AttributeError:  # another profiler layout: no cross-check
        return None
    if not memory:
        return 0
    live = peak = 0
    for _, nbytes in memory:
        live += nbytes
        peak = max(peak, live)
    return peak


# ----------------------------------------------------------------------------------------------
# One row: an op at one thread count


@dataclass
class Row(ContenderResults):
    """The measurements of one (op, threads): per-contender statistics in ms per call."""

    op: str
    k: int
    g: int
    p: int
    threads: int
    device: str
    repeats: int
    stats: dict[str, Stats]
    bandwidth: Bandwidth
    extra_bytes_estimate: dict[str, int]
    extra_bytes_measured: dict[str, int | None]
    max_rel_diff: dict[str, float] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return op_bytes(self.op, self.k, self.g)

    @property
    def bound_ms(self) -> float:
        return self.bytes / (self.bandwidth.gbytes_per_s * 1e9) * 1e3


    def extra_bytes(self, contender: str) -> int | None:
        """What the table shows: the estimate on the CPU, the measurement on CUDA."""
        if self.device.startswith("cuda"):
            return self.extra_bytes_measured.get(contender)
        return self.extra_bytes_estimate.get(contender)


def measure_op(
    op: str,
    task_grads: TaskGrads,
    out: list[torch.Tensor],
    coeffs: torch.Tensor,
    buffers: CopyBuffers,
    clock: Clock,
    repeats: int,
    warmup: int = DEFAULT_WARMUP,
    contenders: Sequence[str] = CONTENDERS,
    check: bool = True,
    measure_memory: bool = True,
) -> Row:
    """The copy bandwidth, the agreement check and the extra memory (when asked), then the
    interleaved calls."""
    device = out[0].device
    k, p, g = len(task_grads), len(task_grads[0]), sum(t.numel() for t in out)
    bandwidth = measure_copy_bandwidth(buffers, clock, repeats)
    every = make_contenders(op, task_grads, out, coeffs)
    chosen = {name: every[name] for name in contenders}
    errors = check_agreement(op, every, out) if check else {}
    measured = {
        name: measure_extra_bytes(fn, device) if measure_memory else None
        for name, fn in chosen.items()
    }
    times = time_interleaved({name: fn for name, fn in chosen.items()}, clock, repeats, warmup)
    return Row(
        op=op,
        k=k,
        g=g,
        p=p,
        threads=torch.get_num_threads(),
        device=str(device),
        repeats=repeats,
        stats={name: Stats.of(samples) for name, samples in times.items()},
        bandwidth=bandwidth,
        extra_bytes_estimate={name: estimate_extra_bytes(op, name, k, g, p) for name in chosen},
        extra_bytes_measured=measured,
        max_rel_diff=errors,
    )


# ----------------------------------------------------------------------------------------------
# The sweep


@dataclass
class SweepConfig:
    ops: Sequence[str] = OPS
    threads: Sequence[int] = (1, ALL_THREADS)
    tasks: int = DEFAULT_TASKS
    repeats: int = DEFAULT_REPEATS
    warmup: int = DEFAULT_WARMUP
    device: str = "cpu"


def run_sweep(config: SweepConfig, progress: Callable[[str], None] | None = None) -> list[Row]:
    """All rows, by thread count then op; the gradients and outputs are made once."""
    device = torch.device(config.device)
    clock = Clock(device)
    buffers = CopyBuffers(device)
    shapes = resnet18_shapes()
    task_grads = make_task_grads(shapes, config.tasks, device)
    out = make_outputs(shapes, device)
    coeffs = make_coeffs(config.tasks, device)
    total = len(config.threads) * len(config.ops)
    rows: list[Row] = []
    previous_threads = torch.get_num_threads()
    try:
        for threads in config.threads:
            torch.set_num_threads(threads)
            for op in config.ops:
                if progress:
                    progress(f"[{len(rows) + 1}/{total}] {op} K={config.tasks} threads={threads}")
                rows.append(
                    measure_op(
                        op, task_grads, out, coeffs, buffers, clock, config.repeats,
                        config.warmup, check=threads == config.threads[0],
                        # CPU: the profiler cross-check once per op; CUDA: every row (the table's)
                        measure_memory=threads == config.threads[0] or device.type == "cuda",
                    )
                )
    finally:
        torch.set_num_threads(previous_threads)
    return rows


# ----------------------------------------------------------------------------------------------
# Targets of the issue (1 thread, normalized_sum): reported, not asserted


@dataclass(frozen=True)
class Target:
    """fused must be ``min_ratio`` times faster than ``against`` (aiming at ``aim``)."""

    label: str
    op: str
    against: str
    min_ratio: float
    aim: float
    threads: int = 1


TARGETS = (
    Target("normalized_sum >=2x foreach", "normalized_sum", "foreach", 2.0, 3.0),
    Target("normalized_sum >=5x flatten", "normalized_sum", "flatten", 5.0, 8.0),
)


def check_targets(rows: Sequence[Row], targets: Sequence[Target] = TARGETS) -> list[dict]:
    results = []
    for target in targets:
        ratios = [
            row.ratio(target.against) for row in rows
            if row.op == target.op and row.threads == target.threads
            and row.ratio(target.against) is not None
        ]
        worst = min(ratios) if ratios else None
        status = "n/a" if worst is None else ("PASS" if worst >= target.min_ratio else "MISS")
        aim = None if worst is None else worst >= target.aim
        results.append({**asdict(target), "status": status, "ratio": worst, "aim_reached": aim})
    return results


def targets_line(results: Sequence[dict]) -> str:
    parts = []
    for result in results:
        if result["ratio"] is None:
            parts.append(f"{result['label']}: n/a")
            continue
        aim = "reached" if result["aim_reached"] else "not reached"
        parts.append(
            f"{result['label']}: {result['status']} ({result['ratio']:.2f}x; "
            f"aim {result['aim']:g}x {aim})"
        )
    return "Targets (1 thread, fused speed-up): " + " | ".join(parts)


# ----------------------------------------------------------------------------------------------
# Output


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _mb(value: int | None) -> str:
    """MB with one decimal; below 0.1 MB, kilobytes with a K ("0" for nothing at all)."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    return f"{value / 2**20:.1f}" if value >= 2**20 / 10 else f"{value / 2**10:.1f}K"


TABLE_COLUMNS = (
    "op", "threads", "fused ms", "foreach ms", "flatten ms", "foreach/fused", "flatten/fused",
    "bound ms", "fused % of bound", "MB fused", "MB foreach", "MB flatten",
)


def table_cells(row: Row) -> list[str]:
    return [
        row.op,
        str(row.threads),
        _ms(row.median("fused")),
        _ms(row.median("foreach")),
        _ms(row.median("flatten")),
        _times(row.ratio("foreach")),
        _times(row.ratio("flatten")),
        _ms(row.bound_ms),
        _percent(row.fraction_of_bound("fused")),
        _mb(row.extra_bytes("fused")),
        _mb(row.extra_bytes("foreach")),
        _mb(row.extra_bytes("flatten")),
    ]


def print_table(rows: Sequence[Row]) -> None:
    if not rows:
        return
    first = rows[0]
    memory = "measured peak" if first.device.startswith("cuda") else "estimated peak"
    title = (
        f"Multi-tensor ops, float32, K={first.k} tasks x ResNet-18 ({first.p} tensors, "
        f"G={first.g:,}), {first.device}: median ms per call; MB = {memory} extra memory"
    )
    section_ends = [
        next_row is not None and next_row.threads != row.threads
        for row, next_row in zip(rows, [*rows[1:], None])
    ]
    render_table(
        title, TABLE_COLUMNS, [table_cells(row) for row in rows], left_columns=2,
        section_ends=section_ends, width=170,
    )


def print_side_notes(rows: Sequence[Row]) -> None:
    """Copy bandwidth per thread count, min times, the memory cross-check and the agreement."""
    by_threads: dict[int, list[float]] = {}
    for row in rows:
        by_threads.setdefault(row.threads, []).append(row.bandwidth.gbytes_per_s)
    print(
        "Copy bandwidth (read+write GB/s, median over rows [min-max]): " + "; ".join(
            f"{threads} thread(s): {statistics.median(gbs):.1f} [{min(gbs):.1f}-{max(gbs):.1f}]"
            for threads, gbs in by_threads.items()
        )
    )
    for label, attribute in (("Min", "min_ms"), ("IQR", "iqr_ms")):
        print(
            f"{label} ms fused/foreach/flatten: " + "; ".join(
                f"{row.op} t{row.threads}: " + "/".join(
                    _ms(getattr(row.stats[name], attribute)) if name in row.stats else "-"
                    for name in CONTENDERS
                )
                for row in rows
            )
        )
    if rows and not rows[0].device.startswith("cuda"):
        seen = set()
        parts = []
        for row in rows:
            if row.op in seen or all(v is None for v in row.extra_bytes_measured.values()):
                continue
            seen.add(row.op)
            parts.append(
                f"{row.op} " + "/".join(
                    f"{_mb(row.extra_bytes_measured.get(name))} "
                    f"(est {_mb(row.extra_bytes_estimate.get(name))})"
                    for name in CONTENDERS if name in row.stats
                )
            )
        print(
            "Extra MB fused/foreach/flatten measured by torch.profiler's CPU allocator events, "
            f"t{rows[0].threads} (est = table): " + "; ".join(parts)
        )
    errors = [
        f"{row.op} " + "/".join(f"{row.max_rel_diff[name]:.1e}" for name in CONTENDERS)
        for row in rows if row.max_rel_diff
    ]
    if errors:
        print("Max relative difference from fused, fused/foreach/flatten: " + "; ".join(errors))


def rows_to_records(rows: Sequence[Row]) -> list[dict]:
    """One flat record per (row, contender), for JSON."""
    records = []
    for row in rows:
        for contender, stats in row.stats.items():
            records.append(
                {
                    "op": row.op,
                    "tasks": row.k,
                    "elements": row.g,
                    "tensors": row.p,
                    "threads": row.threads,
                    "device": row.device,
                    "contender": contender,
                    "median_ms": stats.median_ms,
                    "min_ms": stats.min_ms,
                    "iqr_ms": stats.iqr_ms,
                    "repeats": row.repeats,
                    "ratio_to_fused": row.ratio(contender),
                    "bandwidth_gbs": row.bandwidth.gbytes_per_s,
                    "copy_median_ms": row.bandwidth.copy.median_ms,
                    "bytes": row.bytes,
                    "bound_ms": row.bound_ms,
                    "fraction_of_bound": row.fraction_of_bound(contender),
                    "extra_bytes_estimate": row.extra_bytes_estimate.get(contender),
                    "extra_bytes_measured": row.extra_bytes_measured.get(contender),
                    "max_rel_diff_from_fused": row.max_rel_diff.get(contender),
                    "samples_ms": stats.samples_ms,
                }
            )
    return records


def write_json(
    path: str, env: dict, config: SweepConfig, rows: Sequence[Row], targets: list[dict]
) -> None:
    shapes = resnet18_shapes()
    document = {
        "environment": env,
        "config": asdict(config) | {
            "ops": list(config.ops), "threads": list(config.threads),
            "parameter_shapes": [list(shape) for shape in shapes],
            "elements": sum(math.prod(shape) for shape in shapes), "eps": EPS,
        },
        "rows": rows_to_records(rows),
        "targets": targets,
    }
    with open(path, "w") as out:
        json.dump(document, out, indent=1)
        out.write("\n")


# ----------------------------------------------------------------------------------------------
# Command line


def _ops(text: str) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in OPS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown ops {unknown}; expected some of {list(OPS)}")
    return chosen


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="fusedmtl's multi-tensor ops against torch._foreach and flatten+cat."
    )
    add = parser.add_argument
    add("--threads", default="1,all",
        help=f"comma-separated thread counts, 'all' = torch's default ({ALL_THREADS}); "
        "default 1,all")
    add("--tasks", type=int, default=DEFAULT_TASKS, help=f"K (default {DEFAULT_TASKS})")
    add("--ops", default=",".join(OPS), help="comma-separated from " + ",".join(OPS))
    add("--repeats", type=int,
        help=f"timed calls per contender and row (default {DEFAULT_REPEATS}; "
        f"--quick: {QUICK_REPEATS})")
    add("--warmup", type=int,
        help=f"untimed rounds per row (default {DEFAULT_WARMUP}; --quick: {QUICK_WARMUP})")
    add("--quick", action="store_true", help="fewer repeats and warm-up rounds (about 30 s)")
    add("--device", default="auto", help="auto (default: cuda when available, else cpu), cpu, cuda")
    add("--json", metavar="PATH", help="write the environment and one record per "
        "(row, contender) as JSON")
    return parser


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available here")
    if args.tasks < 1:
        raise argparse.ArgumentTypeError("--tasks must be at least 1")
    repeats = args.repeats if args.repeats is not None else (
        QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    warmup = args.warmup if args.warmup is not None else (
        QUICK_WARMUP if args.quick else DEFAULT_WARMUP)
    return SweepConfig(
        ops=_ops(args.ops),
        threads=parse_threads(args.threads),
        tasks=args.tasks,
        repeats=repeats,
        warmup=warmup,
        device=device,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
