"""Sweep 'multi_tensor': fusedmtl's multi-tensor ops against torch._foreach and flatten+cat.

What one measurement is: one call of an op over the gradients of K tasks (default 4) with respect
to a ResNet-18-like list of 62 float32 parameter tensors (11,689,512 elements, see
``common.resnet18_shapes``). The task gradients are random N(0, 1), generated once; the P output
tensors (standing for the parameters' .grad) are allocated and touched once, before timing, and
every contender writes into them.

Ops and contenders (all compute the same result; checked once per op before timing):
  normalized_sum  sum_i g_i / (||g_i|| + eps) into the outputs.
    fused         fusedmtl.multi_tensor.normalized_sum(task_grads, out=out)
    foreach       the issue's recipe, as a training step would write it (no host sync): one
                  torch._foreach_norm over the K x P tensors, a total norm per task, then per
                  task torch._foreach_div by that norm (a tensor) and torch._foreach_copy_ (first
                  task) or torch._foreach_add_ into out; one task's quotients alive at a time
    foreach_sync  the fastest hand-written foreach code we know, at the price of a host sync
                  (a GPU stall): the norms as above, the K coefficients 1 / (norm + eps) as
                  Python floats, then torch._foreach_zero_(out) and torch._foreach_add_(out, g_i,
                  alpha=c_i) per task (no gradient-sized temporaries)
    flatten       torch.cat of each task's flattened gradients into the rows of a fresh K x G
                  matrix, its row norms, the coefficients, coeffs @ matrix (a fresh G vector),
                  split back and copied into out
  gramian         the K x K matrix of inner products <g_i, g_j>.
    fused         fusedmtl.multi_tensor.gramian(task_grads)
    foreach       torch.dot per (i <= j, parameter) summed: K(K+1)/2 x P dot products, no
                  temporaries, no host sync (torch._foreach_mul(g_i, g_j) then sums writes a
                  G-sized temporary per pair and measured about 5x slower than the dots)
    flatten       the K x G matrix as above, then matrix @ matrix.T
  combine         out = sum_i c_i g_i with given coefficients (Tensor[K]).
    fused         fusedmtl.multi_tensor.combine(task_grads, coeffs, out=out)
    foreach       per task torch._foreach_mul by c_i (a tensor), then _foreach_copy_ / _add_
    foreach_sync  coeffs.tolist(), torch._foreach_zero_(out), torch._foreach_add_(out, g_i,
                  alpha=c_i)
    flatten       the K x G matrix, coeffs @ matrix, split, copied into out

Least traffic (float32 bytes): normalized_sum reads the K x G gradients twice and writes G,
(2K + 1) G 4; gramian reads them once, K G 4; combine reads them once and writes G, (K + 1) G 4.
Read-mostly ops can pass 100 % of the bound: the copy's stores also cost a read of the destination
line (write-allocate), which the copy's read+write byte count does not include.

Extra memory: ``estimate_extra_bytes`` (the table on the CPU: an estimate from the tensors each
approach allocates) and ``measure_extra_bytes`` (the table on CUDA: torch.cuda.max_memory_allocated
deltas; on the CPU the peak of torch.profiler's allocator events, printed as a cross-check).
The flatten approach allocates a fresh K x G matrix every call (187 MB at K = 4): large fresh CPU
buffers page-fault on first touch, a real cost of that approach (THP_MEM_ALLOC_ENABLE=1 lowers it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

import fusedmtl.multi_tensor as mt
from fusedmtl.bench.common import (
    ALL_THREADS, DEFAULT_WARMUP, Bandwidth, Clock, ContenderResults, CopyBuffers, Progress, Stats,
    TaskGrads, bandwidth_note, copy_split_into, flatten_rows, fmt_mb, fmt_ms, fmt_percent,
    fmt_ratio, make_task_grads, measure_copy_bandwidth, num_threads, parse_choices,
    render_table, resnet18_shapes, scaled_shapes, section_ends, time_contenders,
)

NAME = "multi_tensor"
OPS = ("normalized_sum", "gramian", "combine")
CONTENDERS = ("fused", "foreach", "foreach_sync", "flatten")
DEFAULT_TASKS = 4
EPS = 1e-8
BYTES_PER_ELEMENT = 4  # float32
# A contender computing the wrong thing is off by O(1). A float32 matmul over G = 11.7M products
# is not exact either: MKL's sgemm on an AMD EPYC was 2.6e-3 off the float64 Gramian (fused: 3e-8).
AGREEMENT_TOLERANCE = 1e-2


@dataclass
class Config:
    ops: Sequence[str] = OPS
    threads: Sequence[int] = (1, ALL_THREADS)
    tasks: int = DEFAULT_TASKS
    shape_divisor: int = 1  # >1 shrinks the ResNet-18 shapes (tests)
    repeats: int = 15
    warmup: int = DEFAULT_WARMUP
    device: str = "cpu"


def model_shapes(shape_divisor: int) -> list[tuple[int, ...]]:
    """ResNet-18's parameter shapes, shrunk by ``shape_divisor`` when it is above 1."""
    shapes = resnet18_shapes()
    return shapes if shape_divisor <= 1 else scaled_shapes(shapes, shape_divisor)


def make_coeffs(k: int, device: torch.device, seed: int = 1) -> torch.Tensor:
    """Given combination weights, as a weighting method would produce them: positive, sum 1."""
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(k, generator=generator), 0).to(device)


# ----------------------------------------------------------------------------------------------
# The contenders: each returns a zero-argument callable doing one op call


def per_task_foreach_into(
    out: list[torch.Tensor], task_grads: TaskGrads,
    scale: Callable[[list[torch.Tensor], torch.Tensor], list[torch.Tensor]], factors: torch.Tensor,
) -> None:
    """out = sum_i scale(task_grads[i], factors[i]) with torch._foreach ops and no host sync."""
    for i, grads in enumerate(task_grads):
        scaled = scale(list(grads), factors[i])
        (torch._foreach_copy_ if i == 0 else torch._foreach_add_)(out, scaled)
        del scaled  # one task's temporaries alive at a time


def foreach_sync_into(out: list[torch.Tensor], task_grads: TaskGrads, coeffs: list[float]) -> None:
    """out = sum_i coeffs[i] task_grads[i], coefficients already on the host."""
    torch._foreach_zero_(out)
    for grads, c in zip(task_grads, coeffs):
        torch._foreach_add_(out, grads, alpha=c)


def normalized_sum_contenders(
    task_grads: TaskGrads, out: list[torch.Tensor], eps: float = EPS
) -> dict[str, Callable[[], object]]:
    k, p = len(task_grads), len(task_grads[0])
    every = [t for grads in task_grads for t in grads]

    def task_norms() -> torch.Tensor:
        per_tensor = torch.stack(torch._foreach_norm(every)).view(k, p)
        return torch.linalg.vector_norm(per_tensor, dim=1)

    def fused() -> object:
        return mt.normalized_sum(task_grads, eps=eps, out=out)

    def foreach() -> object:
        norms = task_norms()
        per_task_foreach_into(out, task_grads, torch._foreach_div, norms + eps)
        return out, norms

    def foreach_sync() -> object:
        norms = task_norms()
        foreach_sync_into(out, task_grads, (1.0 / (norms + eps)).tolist())
        return out, norms

    def flatten() -> object:
        flat = flatten_rows(task_grads)
        norms = torch.linalg.vector_norm(flat, dim=1)
        copy_split_into((1.0 / (norms + eps)) @ flat, out)
        return out, norms

    return {"fused": fused, "foreach": foreach, "foreach_sync": foreach_sync, "flatten": flatten}


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
        flat = flatten_rows(task_grads)
        return flat @ flat.T

    return {"fused": fused, "foreach": foreach, "flatten": flatten}


def combine_contenders(
    task_grads: TaskGrads, coeffs: torch.Tensor, out: list[torch.Tensor]
) -> dict[str, Callable[[], object]]:
    def fused() -> object:
        return mt.combine(task_grads, coeffs, out=out)

    def foreach() -> object:
        per_task_foreach_into(out, task_grads, torch._foreach_mul, coeffs)
        return out

    def foreach_sync() -> object:
        foreach_sync_into(out, task_grads, coeffs.tolist())
        return out

    def flatten() -> object:
        copy_split_into(coeffs @ flatten_rows(task_grads), out)
        return out

    return {"fused": fused, "foreach": foreach, "foreach_sync": foreach_sync, "flatten": flatten}


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


def max_rel_diff(value: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference over the reference's largest magnitude."""
    reference = reference.double()
    scale = reference.abs().max().clamp_min(1e-30)
    return float((value.double() - reference).abs().max() / scale)


def check_agreement(
    op: str, contenders: dict[str, Callable[[], object]], out: list[torch.Tensor]
) -> dict[str, float]:
    """Runs each contender once and returns its largest relative difference from fused (over the
    output tensors, or the Gramian). Raises if one is off by more than AGREEMENT_TOLERANCE."""
    results: dict[str, torch.Tensor] = {}
    for name, fn in contenders.items():
        value = fn()
        results[name] = (
            value.detach().clone() if op == "gramian"
            else torch.cat([t.reshape(-1) for t in out])
        )
    errors = {name: max_rel_diff(value, results["fused"]) for name, value in results.items()}
    bad = {name: error for name, error in errors.items() if error > AGREEMENT_TOLERANCE}
    if bad:
        raise AssertionError(f"{op}: contenders disagree with fused: {bad}")
    return errors


# ----------------------------------------------------------------------------------------------
# Traffic and memory


def op_bytes(op: str, k: int, g: int) -> int:
    """Least bytes an op moves (float32): see the module docstring."""
    elements = {"normalized_sum": (2 * k + 1) * g, "gramian": k * g, "combine": (k + 1) * g}[op]
    return elements * BYTES_PER_ELEMENT


def estimate_extra_bytes(op: str, contender: str, k: int, g: int, p: int) -> int:
    """Peak memory an approach allocates beyond the gradients and the preallocated outputs,
    estimated from the tensors its code creates (float32; the CPU allocator rounds small blocks
    up, which these few-byte terms ignore):

      fused    only its small results: normalized_sum the K norms, then norm + eps and the
               coefficients (3K); gramian the K x K matrix; combine nothing (coefficients given).
      foreach  normalized_sum: K P per-tensor norms (0-dim), their stack (K P), the K total
               norms and norm + eps, and one task's quotients (G) at a time; gramian, for the
               pair being summed, P dot results and their stack, plus the K(K+1)/2 sums and the
               K x K matrix; combine one task's products (G) at a time.
      foreach_sync  no gradient-sized temporaries: normalized_sum the norms as foreach and the
               coefficients; combine nothing.
      flatten  the K x G matrix, alive for the whole call, plus: normalized_sum the combined G
               vector and the K norms and coefficients; gramian the K x K product; combine the
               combined G vector.
    """
    pairs = k * (k + 1) // 2
    elements = {
        ("normalized_sum", "fused"): 3 * k,
        ("normalized_sum", "foreach"): g + 2 * k * p + 2 * k,
        ("normalized_sum", "foreach_sync"): 2 * k * p + 3 * k,
        ("normalized_sum", "flatten"): k * g + g + 3 * k,
        ("gramian", "fused"): k * k,
        ("gramian", "foreach"): 2 * p + pairs + k * k,
        ("gramian", "flatten"): k * g + k * k,
        ("combine", "fused"): 0,
        ("combine", "foreach"): g,
        ("combine", "foreach_sync"): 0,
        ("combine", "flatten"): k * g + g,
    }[op, contender]
    return elements * BYTES_PER_ELEMENT


@contextlib.contextmanager
def stderr_to_devnull() -> Iterator[None]:
    """Silences file descriptor 2: kineto writes a "USDT: ... profiler_start" line per profile
    straight to it, with no setting to turn it off, and they would break up the progress bar."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def measure_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated by one call of ``fn`` above what was allocated before it.

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated
    before. CPU: the running sum of the allocation and free events of PyTorch's CPU allocator that
    torch.profiler records (profile_memory=True), in time order, at its maximum. None when the
    profiler records no memory events."""
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

    with stderr_to_devnull(), profile(
        activities=[ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        result = fn()
        del result
    try:
        events = prof.profiler.kineto_results.events()
        memory = sorted(
            (event.start_ns(), event.nbytes()) for event in events if event.name() == "[memory]"
        )
    except AttributeError:  # another profiler layout: no cross-check
        return None
    live = peak = 0
    for _, nbytes in memory:
        live += nbytes
        peak = max(peak, live)
    return peak


# ----------------------------------------------------------------------------------------------
# Rows


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
    def row_id(self) -> str:
        return f"{self.op}|K{self.k}|t{self.threads}"

    def extra_bytes(self, contender: str) -> int | None:
        """What the table shows: the estimate on the CPU, the measurement on CUDA."""
        if self.device.startswith("cuda"):
            return self.extra_bytes_measured.get(contender)
        return self.extra_bytes_estimate.get(contender)


def measure_op(
    op: str, task_grads: TaskGrads, out: list[torch.Tensor], coeffs: torch.Tensor,
    buffers: CopyBuffers, clock: Clock, repeats: int, warmup: int, check: bool,
    measure_memory: bool,
) -> Row:
    """The copy bandwidth, the agreement check and the extra memory (when asked), then the
    interleaved calls."""
    device = out[0].device
    k, p, g = len(task_grads), len(task_grads[0]), sum(t.numel() for t in out)
    bandwidth = measure_copy_bandwidth(buffers, clock, repeats)
    contenders = make_contenders(op, task_grads, out, coeffs)
    errors = check_agreement(op, contenders, out) if check else {}
    measured = {
        name: measure_extra_bytes(fn, device) if measure_memory else None
        for name, fn in contenders.items()
    }
    return Row(
        op=op, k=k, g=g, p=p, threads=torch.get_num_threads(), device=str(device),
        repeats=repeats, stats=time_contenders(contenders, clock, repeats, warmup),
        bandwidth=bandwidth,
        extra_bytes_estimate={name: estimate_extra_bytes(op, name, k, g, p) for name in contenders},
        extra_bytes_measured=measured, max_rel_diff=errors,
    )


def planned_rows(config: Config) -> int:
    return len(config.threads) * len(config.ops)


def run(config: Config, progress: Progress) -> list[Row]:
    """All rows, by thread count then op; the gradients and outputs are made once."""
    device = torch.device(config.device)
    clock = Clock(device)
    buffers = CopyBuffers(device)
    shapes = model_shapes(config.shape_divisor)
    task_grads = make_task_grads(shapes, config.tasks, device)
    out = [torch.zeros(shape, device=device) for shape in shapes]  # touched, like .grad
    coeffs = make_coeffs(config.tasks, device)
    rows: list[Row] = []
    for threads in config.threads:
        with num_threads(threads):
            for op in config.ops:
                progress.row(f"{op} K={config.tasks} t{threads}")
                first = threads == config.threads[0]
                rows.append(measure_op(
                    op, task_grads, out, coeffs, buffers, clock, config.repeats, config.warmup,
                    check=first,
                    # CPU: the profiler cross-check once per op; CUDA: every row (the table's)
                    measure_memory=first or device.type == "cuda",
                ))
    return rows


# ----------------------------------------------------------------------------------------------
# Targets of the issue (1 thread, normalized_sum): reported, not asserted


@dataclass(frozen=True)
class Target:
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
        results.append({
            "label": target.label, "status": status, "ratio": worst, "aim": target.aim,
            "aim_reached": None if worst is None else worst >= target.aim,
        })
    return results


# ----------------------------------------------------------------------------------------------
# Output

COLUMNS = (
    "op", "threads", "fused ms", "foreach ms", "foreach_sync ms", "flatten ms", "foreach/fused",
    "foreach_sync/fused", "flatten/fused", "bound ms", "fused % of bound",
    "extra MB fused/foreach/foreach_sync/flatten", "max rel diff",
)


def table_cells(row: Row) -> list[str]:
    diff = max((v for n, v in row.max_rel_diff.items() if n != "fused"), default=None)
    return [
        row.op, str(row.threads),
        *(fmt_ms(row.median(name)) for name in CONTENDERS),
        *(fmt_ratio(row.ratio(name)) for name in CONTENDERS[1:]),
        fmt_ms(row.bound_ms), fmt_percent(row.fraction_of_bound("fused")),
        "/".join(fmt_mb(row.extra_bytes(name)) for name in CONTENDERS),
        "-" if diff is None else f"{diff:.1e}",
    ]


def report(rows: Sequence[Row]) -> None:
    if not rows:
        return
    first = rows[0]
    memory = "measured peak" if first.device.startswith("cuda") else "estimated peak"
    render_table(
        f"Multi-tensor ops, float32, K={first.k} tasks x {first.p} tensors (G={first.g:,}), "
        f"{first.device}: median ms per call; MB = {memory} extra memory",
        COLUMNS, [table_cells(row) for row in rows], left_columns=2,
        ends=section_ends([row.threads for row in rows]),
    )
    note = bandwidth_note(rows)
    if note:
        print(note)
    if not first.device.startswith("cuda"):
        parts = [
            f"{row.op} " + "/".join(
                f"{fmt_mb(row.extra_bytes_measured.get(name))} "
                f"(est {fmt_mb(row.extra_bytes_estimate.get(name))})" for name in row.stats
            )
            for row in rows if any(v is not None for v in row.extra_bytes_measured.values())
        ]
        if parts:
            print("Extra MB (contenders as in the table) measured by torch.profiler's CPU allocator "
                  "events (est = table): " + "; ".join(parts))
    parts = []
    for result in check_targets(rows):
        if result["ratio"] is None:
            parts.append(f"{result['label']}: n/a")
            continue
        aim = "reached" if result["aim_reached"] else "not reached"
        parts.append(f"{result['label']}: {result['status']} ({result['ratio']:.2f}x; "
                     f"aim {result['aim']:g}x {aim})")
    print("Multi-tensor targets (1 thread, fused speed-up): " + " | ".join(parts))


def records(rows: Sequence[Row]) -> list[dict]:
    out = []
    for row in rows:
        fields = {
            "sweep": NAME, "op": row.op, "tasks": row.k, "elements": row.g, "tensors": row.p,
            "threads": row.threads, "device": row.device, "repeats": row.repeats,
        }
        for record in row.contender_records(row.row_id, fields):
            name = record["contender"]
            record |= {
                "extra_bytes_estimate": row.extra_bytes_estimate.get(name),
                "extra_bytes_measured": row.extra_bytes_measured.get(name),
                "max_rel_diff_from_fused": row.max_rel_diff.get(name),
            }
            out.append(record)
    return out


# ----------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi_tensor sweep (and the weighting_step sweep's K)")
    group.add_argument("--ops", default=",".join(OPS), help="comma-separated from " + ",".join(OPS))
    group.add_argument("--tasks", type=int, default=DEFAULT_TASKS,
                       help=f"K for multi_tensor and weighting_step (default {DEFAULT_TASKS})")
    group.add_argument("--shape-divisor", type=int, default=1,
                       help="divide the first dimension of every ResNet-18 shape by this "
                       "(multi_tensor and weighting_step; >1 only for smoke tests)")


def config_from_args(args: argparse.Namespace, common: dict) -> Config:
    if args.tasks < 1:
        raise ValueError("--tasks must be at least 1")
    return Config(
        ops=parse_choices(args.ops, OPS, "ops"), tasks=args.tasks,
        shape_divisor=args.shape_divisor, **common,
    )
