#!/usr/bin/env python
"""Forward+backward benchmark of fusedmtl's regression losses, eager PyTorch and torch.compile.

What one measurement is: a training step of a loss with reduction='mean' in float32 -- the forward
pass and ``loss.backward()`` (variant 'plain') or ``(0.37 * loss).backward()`` (variant 'weighted',
which makes grad_output != 1 and so exercises the in-place scaling of fusedmtl's precomputed
gradient) -- on a leaf input that requires grad and a target that does not. ``x.grad`` is set to
None before every step, so each contender writes a fresh gradient buffer as it does in training
(fresh large buffers page-fault on first touch; that cost is part of the step).

Contenders:
  fused    fusedmtl.<loss>                 (on CPU: gradient computed in the forward pass; on
           CUDA: the native CUDA kernels when the extension has them)
  triton   fusedmtl.<loss> with fusedmtl.backend.use("triton")   (CUDA only)
  eager    torch.nn.functional.<loss>
  compile  torch.compile(torch.nn.functional.<loss>, dynamic=False), compiled per (loss, size,
           threads) with the input requiring grad; the compile time is measured separately (the
           first forward+backward call) and is not part of the step times.

How (see /work/shared/BUILD_NOTES.md, "Measuring on a 2-core shared machine"): the contenders are
interleaved -- each repetition runs every contender once, in an order that rotates from one
repetition to the next -- after a few warm-up rounds; the statistics are medians (with min and IQR),
and the ratios eager/fused and compile/fused are taken from the same run. Small sizes time a batch
of several steps per sample, to stay well above the timer's resolution, and divide.

Memory-bandwidth bound: just before each row its copy bandwidth is measured (median of
``dst.copy_(src)`` on two preallocated 64 MB float32 buffers, with the row's thread setting). A loss
step must at least read input and target and write the gradient, 3 * N * 4 bytes, so
bound = 3 * N * 4 / bandwidth, and each contender reaches bound / measured time of it. Sizes that
fit in cache can exceed 100 %.

PyTorch's THP_MEM_ALLOC_ENABLE=1 (huge pages for every CPU allocation, which makes fresh large
buffers cheaper for all contenders) is read once by the process: to compare, run the script twice,
with and without it in the environment. Its value is recorded in the environment block.

Usage:
  python bench/bench_losses.py                     # full sweep: 64K, 1M, 16M x 1 and all threads
  python bench/bench_losses.py --quick             # fewer repeats, no 16M
  python bench/bench_losses.py --json out.json --losses mse_loss --sizes 1M --threads 1
  python bench/bench_losses.py --device cuda       # on a GPU machine (CUDA events for timing)

The functions are importable (``measure_row``, ``run_sweep``, ``check_targets``, ...) for tools
that build on them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

import fusedmtl

LOSSES = ("smooth_l1_loss", "huber_loss", "l1_loss", "mse_loss")
CONTENDERS = ("fused", "triton", "eager", "compile")
# triton runs fusedmtl's Triton kernels: a contender on GPUs only (on the CPU they need the interpreter).
DEFAULT_CONTENDERS = {"cpu": ("fused", "eager", "compile"), "cuda": CONTENDERS}
# Variant -> the Python float the loss is multiplied by before backward (None: loss.backward()).
VARIANTS: dict[str, float | None] = {"plain": None, "weighted": 0.37}
VARIANT_LABELS = {"plain": "loss.backward()", "weighted": "(w*loss).backward()"}
DEFAULT_SIZES = (2**16, 2**20, 2**24)
QUICK_SIZES = (2**16, 2**20)
DEFAULT_REPEATS = 15
QUICK_REPEATS = 5
DEFAULT_WARMUP = 3
# torch's own default thread count, before this script changes it: what "all threads" means.
ALL_THREADS = torch.get_num_threads()
BANDWIDTH_BUFFER_BYTES = 64 * 2**20
BYTES_PER_ELEMENT = 4  # float32
# Samples shorter than this many elements' worth of work batch several steps (see steps_per_sample).
MIN_ELEMENTS_PER_SAMPLE = 2**20


# ----------------------------------------------------------------------------------------------
# Timing primitives


class Clock:
    """Wall time of a callable on one device.

    CPU: time.perf_counter_ns around the call. CUDA: events recorded around the call after a
    torch.cuda.synchronize(), so that the sample holds this call's GPU work and nothing before it.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            self.sync()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        start_ns = time.perf_counter_ns()
        fn()
        return (time.perf_counter_ns() - start_ns) / 1e6


@dataclass
class Stats:
    """Summary of the samples of one contender, in milliseconds per step."""

    median_ms: float
    min_ms: float
    iqr_ms: float
    samples_ms: list[float] = field(repr=False)

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> Stats:
        samples = list(samples_ms)
        if len(samples) >= 2:
            q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
        else:
            q1 = q3 = samples[0]
        return cls(statistics.median(samples), min(samples), q3 - q1, samples)


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """No cyclic garbage collection while timing (it would land in a random contender's sample)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def time_interleaved(
    samples: dict[str, Callable[[], None]],
    clock: Clock,
    repeats: int,
    warmup: int,
    before_each: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Times each callable ``repeats`` times, interleaved, after ``warmup`` untimed rounds.

    Repetition r runs the contenders in the order rotated by r, so that none is always first (cold
    caches, a neighbour's burst of load) or always after the same one. ``before_each`` runs untimed
    before every call (here: dropping the previous gradient, whose freeing is not the next
    contender's cost).
    """
    names = list(samples)
    times: dict[str, list[float]] = {name: [] for name in names}
    with quiet_gc():
        for r in range(warmup + repeats):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                if before_each is not None:
                    before_each()
                elapsed = clock.time_ms(samples[name])
                if r >= warmup:
                    times[name].append(elapsed)
    return times


# ----------------------------------------------------------------------------------------------
# Memory bandwidth


class CopyBuffers:
    """Two preallocated, already touched float32 buffers for the copy-bandwidth measurement."""

    def __init__(self, device: torch.device, nbytes: int = BANDWIDTH_BUFFER_BYTES):
        count = nbytes // BYTES_PER_ELEMENT
        self.src = torch.ones(count, dtype=torch.float32, device=device)
        self.dst = torch.zeros(count, dtype=torch.float32, device=device)
        self.dst.copy_(self.src)  # every page of both buffers mapped before the first sample
        self.nbytes = count * BYTES_PER_ELEMENT


@dataclass
class Bandwidth:
    """Copy bandwidth: bytes read plus bytes written per second, from the median copy time."""

    gbytes_per_s: float
    copy: Stats


def measure_copy_bandwidth(buffers: CopyBuffers, clock: Clock, repeats: int) -> Bandwidth:
    """Median time of dst.copy_(src) with the current thread setting, as read+write bytes/second."""
    samples = time_interleaved(
        {"copy": lambda: buffers.dst.copy_(buffers.src)}, clock, repeats, warmup=1
    )["copy"]
    stats = Stats.of(samples)
    return Bandwidth(2 * buffers.nbytes / (stats.median_ms * 1e-3) / 1e9, stats)


def bound_ms(n: int, bandwidth: Bandwidth) -> float:
    """Least time of a loss step at this bandwidth: read input and target, write the gradient."""
    return 3 * n * BYTES_PER_ELEMENT / (bandwidth.gbytes_per_s * 1e9) * 1e3


# ----------------------------------------------------------------------------------------------
# The contenders and their steps

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def fused_loss(name: str) -> LossFn:
    return getattr(fusedmtl, name)


def triton_loss(name: str) -> LossFn:
    fn = getattr(fusedmtl, name)

    def run(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with fusedmtl.backend.use("triton"):  # the op chosen in forward also runs the backward
            return fn(x, target)

    return run


def eager_loss(name: str) -> LossFn:
    return getattr(F, name)


@dataclass
class Compiled:
    """A torch.compile'd loss and what its compilation cost."""

    fn: LossFn
    compile_s: float
    fx_cache_hits: int
    fx_cache_misses: int


def compile_loss(name: str, x: torch.Tensor, target: torch.Tensor, clock: Clock) -> Compiled:
    """torch.compile(F.<name>, dynamic=False), compiled for these very tensors (x requires grad).

    Dynamo's caches are reset first, so every (loss, size, threads) gets its own compilation
    (Inductor specialises its CPU kernels on the thread count) and no recompile limit is hit. The
    compile time is the first forward+backward call, which compiles both graphs; Inductor's on-disk
    cache can make it much shorter on a second run of the script: its hits and misses are recorded
    (--cold-compile disables the caches).
    """
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    fn = torch.compile(eager_loss(name), dynamic=False)
    inductor = counters["inductor"]
    hits, misses = inductor["fxgraph_cache_hit"], inductor["fxgraph_cache_miss"]

    def first_step() -> None:
        x.grad = None
        fn(x, target).backward()

    elapsed_ms = clock.time_ms(first_step)
    x.grad = None
    return Compiled(
        fn,
        elapsed_ms / 1e3,
        inductor["fxgraph_cache_hit"] - hits,
        inductor["fxgraph_cache_miss"] - misses,
    )


def make_sample(
    loss_fn: LossFn, x: torch.Tensor, target: torch.Tensor, weight: float | None, steps: int
) -> Callable[[], None]:
    """A callable running ``steps`` training steps of the loss, each into a fresh x.grad."""
    if weight is None:

        def step() -> None:
            x.grad = None
            loss_fn(x, target).backward()

    else:

        def step() -> None:
            x.grad = None
            (weight * loss_fn(x, target)).backward()

    if steps == 1:
        return step

    def batch() -> None:
        for _ in range(steps):
            step()

    return batch


def steps_per_sample(n: int) -> int:
    """Steps timed together in one sample: 16 at 64K elements, 1 from 1M on."""
    return max(1, MIN_ELEMENTS_PER_SAMPLE // n)


def make_inputs(n: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A leaf input requiring grad and a target not requiring it, both N(0, 1): their difference
    falls on both sides of beta = delta = 1 (the branches of smooth-L1 and Huber) at random."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=generator).to(device).requires_grad_()
    target = torch.randn(n, generator=generator).to(device)
    return x, target


# ----------------------------------------------------------------------------------------------
# One row: a loss at one size, thread count and backward variant


class ContenderResults:
    """Medians and ratios of a benchmark row; the row provides ``stats`` (contender -> Stats) and
    ``bound_ms``. Shared by the loss and multi-tensor benchmarks."""

    def median(self, contender: str) -> float | None:
        stats = self.stats.get(contender)
        return stats.median_ms if stats else None

    def ratio(self, contender: str) -> float | None:
        """contender's median / fused's median: how many times faster fused is (>1: fused wins)."""
        mine, fused = self.median(contender), self.median("fused")
        return mine / fused if mine and fused else None

    def fraction_of_bound(self, contender: str) -> float | None:
        median = self.median(contender)
        return self.bound_ms / median if median else None


@dataclass
class Row(ContenderResults):
    """The measurements of one (loss, N, threads, variant): per-contender step statistics."""

    loss: str
    n: int
    threads: int
    variant: str
    device: str
    steps_per_sample: int
    repeats: int
    stats: dict[str, Stats]
    bandwidth: Bandwidth
    compile_s: float | None = None
    compile_fx_cache_hits: int | None = None
    compile_fx_cache_misses: int | None = None

    @property
    def bound_ms(self) -> float:
        return bound_ms(self.n, self.bandwidth)



def measure_row(
    loss: str,
    x: torch.Tensor,
    target: torch.Tensor,
    variant: str,
    contenders: dict[str, LossFn],
    buffers: CopyBuffers,
    clock: Clock,
    repeats: int,
    warmup: int = DEFAULT_WARMUP,
    compiled: Compiled | None = None,
) -> Row:
    """Measures the copy bandwidth, then the interleaved steps of the contenders, for one row."""
    n = x.numel()
    steps = steps_per_sample(n)
    bandwidth = measure_copy_bandwidth(buffers, clock, repeats)
    weight = VARIANTS[variant]
    samples = {
        name: make_sample(fn, x, target, weight, steps) for name, fn in contenders.items()
    }

    def drop_grad() -> None:
        x.grad = None

    times = time_interleaved(samples, clock, repeats, warmup, before_each=drop_grad)
    x.grad = None
    stats = {name: Stats.of([t / steps for t in ts]) for name, ts in times.items()}
    return Row(
        loss=loss,
        n=n,
        threads=torch.get_num_threads(),
        variant=variant,
        device=str(x.device),
        steps_per_sample=steps,
        repeats=repeats,
        stats=stats,
        bandwidth=bandwidth,
        compile_s=compiled.compile_s if compiled else None,
        compile_fx_cache_hits=compiled.fx_cache_hits if compiled else None,
        compile_fx_cache_misses=compiled.fx_cache_misses if compiled else None,
    )


# ----------------------------------------------------------------------------------------------
# The sweep


@dataclass
class SweepConfig:
    """What to measure; the defaults are the full sweep."""

    losses: Sequence[str] = LOSSES
    sizes: Sequence[int] = DEFAULT_SIZES
    threads: Sequence[int] = (1, ALL_THREADS)
    variants: Sequence[str] = tuple(VARIANTS)
    contenders: Sequence[str] = CONTENDERS
    repeats: int = DEFAULT_REPEATS
    warmup: int = DEFAULT_WARMUP
    device: str = "cpu"
    cold_compile: bool = False  # Inductor's caches disabled: every compile time is a cold one


def make_contenders(
    loss: str, names: Sequence[str], x: torch.Tensor, target: torch.Tensor, clock: Clock
) -> tuple[dict[str, LossFn], Compiled | None]:
    """The loss functions of the chosen contenders; the torch.compile one compiled for x, target."""
    contenders: dict[str, LossFn] = {}
    compiled = None
    if "fused" in names:
        contenders["fused"] = fused_loss(loss)
    if "triton" in names:
        contenders["triton"] = triton_loss(loss)
    if "eager" in names:
        contenders["eager"] = eager_loss(loss)
    if "compile" in names:
        compiled = compile_loss(loss, x, target, clock)
        contenders["compile"] = compiled.fn
    return contenders, compiled


def run_sweep(
    config: SweepConfig, progress: Callable[[str], None] | None = None
) -> list[Row]:
    """All rows: by thread count, size, loss (compiled once for both variants), variant."""
    import torch._inductor.config as inductor_config

    device = torch.device(config.device)
    clock = Clock(device)
    buffers = CopyBuffers(device)
    total = len(config.threads) * len(config.sizes) * len(config.losses) * len(config.variants)
    rows: list[Row] = []
    previous_threads = torch.get_num_threads()
    previous_force_disable_caches = inductor_config.force_disable_caches
    inductor_config.force_disable_caches = config.cold_compile or previous_force_disable_caches
    try:
        for threads in config.threads:
            torch.set_num_threads(threads)
            for n in config.sizes:
                x, target = make_inputs(n, device)
                for loss in config.losses:
                    contenders, compiled = make_contenders(
                        loss, config.contenders, x, target, clock
                    )
                    for variant in config.variants:
                        if progress:
                            progress(
                                f"[{len(rows) + 1}/{total}] {loss} N={format_size(n)} "
                                f"threads={threads} {VARIANT_LABELS[variant]}"
                            )
                        rows.append(
                            measure_row(
                                loss, x, target, variant, contenders, buffers, clock,
                                config.repeats, config.warmup, compiled,
                            )
                        )
                del x, target
    finally:
        torch.set_num_threads(previous_threads)
        inductor_config.force_disable_caches = previous_force_disable_caches
        torch._dynamo.reset()
    return rows


# ----------------------------------------------------------------------------------------------
# Targets of the issue


@dataclass(frozen=True)
class Target:
    """fused must be at least ``min_ratio`` times faster than ``against`` on the matching rows."""

    label: str
    variant: str
    against: str
    min_ratio: float
    n: int | None = None  # None: every size
    threads: int = 1


TARGETS = (
    Target("64K >=1x eager", "plain", "eager", 1.0, n=2**16),
    Target("1M >=2.5x eager", "plain", "eager", 2.5, n=2**20),
    Target("1M >=1.5x compile", "plain", "compile", 1.5, n=2**20),
    Target("16M >=3x eager", "plain", "eager", 3.0, n=2**24),
    Target("16M >=2x compile", "plain", "compile", 2.0, n=2**24),
    Target("weighted >=1x compile", "weighted", "compile", 1.0),
)


def check_targets(rows: Sequence[Row], targets: Sequence[Target] = TARGETS) -> list[dict]:
    """For each target: the worst ratio over the matching rows (all losses) and PASS/MISS/n/a."""
    results = []
    for target in targets:
        ratios = {
            f"{row.loss}@{format_size(row.n)}": row.ratio(target.against)
            for row in rows
            if row.variant == target.variant
            and row.threads == target.threads
            and (target.n is None or row.n == target.n)
            and row.ratio(target.against) is not None
        }
        worst_row = min(ratios, key=ratios.get) if ratios else None
        worst = ratios[worst_row] if ratios else None
        status = "n/a" if worst is None else ("PASS" if worst >= target.min_ratio else "MISS")
        passed = sum(ratio >= target.min_ratio for ratio in ratios.values())
        results.append(
            {**asdict(target), "status": status, "worst_ratio": worst, "worst_row": worst_row,
             "rows_passed": passed, "rows": len(ratios), "ratios": ratios}
        )
    return results


def targets_line(results: Sequence[dict]) -> str:
    """One line: each target with PASS/MISS and its worst ratio."""
    parts = []
    for result in results:
        worst = (
            "" if result["worst_ratio"] is None
            else f" ({result['worst_ratio']:.2f}x {result['worst_row']}, "
            f"{result['rows_passed']}/{result['rows']} rows pass)"
        )
        parts.append(f"{result['label']}: {result['status']}{worst}")
    return "Targets (1 thread; worst row, fused speed-up): " + " | ".join(parts)


# ----------------------------------------------------------------------------------------------
# Environment and output


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode, e.g. 'always [madvise] never'."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as mode:
            return mode.read().strip()
    except OSError:
        return None


def environment(device: str) -> dict:
    """What the numbers depend on: versions, backend, threads, CPU, load, huge pages, date."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fusedmtl": getattr(fusedmtl, "__version__", None),
        "fusedmtl_path": os.path.dirname(fusedmtl.__file__),
        "backend": fusedmtl.backend.info(),
        "device": device,
        "torch_default_threads": ALL_THREADS,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "loadavg": list(os.getloadavg()),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "transparent_hugepage": thp_mode(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def format_size(n: int) -> str:
    for unit, scale in (("M", 2**20), ("K", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


TABLE_COLUMNS = (
    "loss", "N", "threads", "variant", "fused ms", "triton ms", "eager ms", "compile ms",
    "eager/fused", "compile/fused", "bound ms", "fused % of bound",
)


def table_columns(rows: Sequence[Row]) -> tuple[str, ...]:
    """TABLE_COLUMNS without 'triton ms' when no row timed the Triton kernels (the CPU)."""
    if any(row.median("triton") is not None for row in rows):
        return TABLE_COLUMNS
    return tuple(c for c in TABLE_COLUMNS if c != "triton ms")


def table_cells(row: Row, columns: Sequence[str] = TABLE_COLUMNS) -> list[str]:
    cells = {
        "loss": row.loss,
        "N": format_size(row.n),
        "threads": str(row.threads),
        "variant": VARIANT_LABELS[row.variant],
        "fused ms": _ms(row.median("fused")),
        "triton ms": _ms(row.median("triton")),
        "eager ms": _ms(row.median("eager")),
        "compile ms": _ms(row.median("compile")),
        "eager/fused": _times(row.ratio("eager")),
        "compile/fused": _times(row.ratio("compile")),
        "bound ms": _ms(row.bound_ms),
        "fused % of bound": _percent(row.fraction_of_bound("fused")),
    }
    return [cells[column] for column in columns]


def print_table(rows: Sequence[Row]) -> None:
    """The results table, with rich if it is installed, else as plain text."""
    columns = table_columns(rows)
    cells = [table_cells(row, columns) for row in rows]
    section_ends = [
        next_row is not None and (next_row.n, next_row.threads) != (row.n, row.threads)
        for row, next_row in zip(rows, [*rows[1:], None])
    ]
    render_table(
        "Forward+backward, float32, reduction='mean': median ms per step",
        columns, cells, left_columns=4, section_ends=section_ends,
    )


def render_table(
    title: str,
    columns: Sequence[str],
    cells: Sequence[Sequence[str]],
    left_columns: int = 4,
    section_ends: Sequence[bool] | None = None,
    width: int = 160,
) -> None:
    """Prints a table of text cells, with rich if it is installed, else as plain text.

    The first ``left_columns`` columns are left-aligned, the others (numbers) right-aligned;
    ``section_ends[i]`` draws a rule under line i (rich only); ``width`` is rich's line width when
    the output is not a terminal. Shared with the other benchmarks.
    """
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        widths = [max(len(c) for c in column) for column in zip(columns, *cells)]
        for line in [list(columns), *cells]:
            text = zip(line[:left_columns], widths[:left_columns])
            numbers = zip(line[left_columns:], widths[left_columns:])
            print("  ".join([c.ljust(w) for c, w in text] + [c.rjust(w) for c, w in numbers]))
        return
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="right" if i >= left_columns else "left", no_wrap=True)
    ends = list(section_ends) if section_ends is not None else [False] * len(cells)
    for line, group_ends in zip(cells, ends):
        table.add_row(*line, end_section=group_ends)
    console = Console()
    if not console.is_terminal:  # piped or redirected: rich would assume 80 columns and squeeze
        console = Console(width=width)
    console.print(table)


def print_side_notes(rows: Sequence[Row]) -> None:
    """Copy bandwidth per thread count and the torch.compile times (not part of the step times)."""
    by_threads: dict[int, list[float]] = {}
    for row in rows:
        by_threads.setdefault(row.threads, []).append(row.bandwidth.gbytes_per_s)
    summaries = [
        f"{threads} thread(s): {statistics.median(gbs):.1f} [{min(gbs):.1f}-{max(gbs):.1f}]"
        for threads, gbs in by_threads.items()
    ]
    print("Copy bandwidth (read+write GB/s, median over rows [min-max]): " + "; ".join(summaries))

    compiles = {(row.loss, row.n, row.threads): row for row in rows if row.compile_s is not None}
    if compiles:
        times = []
        for (loss, n, threads), row in compiles.items():
            hit = row.compile_fx_cache_hits and not row.compile_fx_cache_misses
            mark = " (hit)" if hit else ""
            times.append(f"{loss} {format_size(n)} t{threads}: {row.compile_s:.2f}s{mark}")
        print(
            "torch.compile time (first forward+backward; '(hit)': from Inductor's FX graph cache): "
            + "; ".join(times)
        )


def rows_to_records(rows: Sequence[Row]) -> list[dict]:
    """One flat record per (row, contender), for JSON."""
    records = []
    for row in rows:
        for contender, stats in row.stats.items():
            compiled = contender == "compile"
            records.append(
                {
                    "loss": row.loss,
                    "n": row.n,
                    "threads": row.threads,
                    "variant": row.variant,
                    "backward": VARIANT_LABELS[row.variant],
                    "weight": VARIANTS[row.variant],
                    "device": row.device,
                    "contender": contender,
                    "median_ms": stats.median_ms,
                    "min_ms": stats.min_ms,
                    "iqr_ms": stats.iqr_ms,
                    "repeats": row.repeats,
                    "steps_per_sample": row.steps_per_sample,
                    "ratio_to_fused": row.ratio(contender),
                    "bandwidth_gbs": row.bandwidth.gbytes_per_s,
                    "copy_median_ms": row.bandwidth.copy.median_ms,
                    "bound_ms": row.bound_ms,
                    "fraction_of_bound": row.fraction_of_bound(contender),
                    "compile_s": row.compile_s if compiled else None,
                    "compile_fx_cache_hits": row.compile_fx_cache_hits if compiled else None,
                    "compile_fx_cache_misses": row.compile_fx_cache_misses if compiled else None,
                    "samples_ms": stats.samples_ms,
                }
            )
    return records


def write_json(
    path: str, env: dict, config: SweepConfig, rows: Sequence[Row], targets: list[dict]
) -> None:
    """The environment block, the configuration, the records and the targets, as one JSON file."""
    document = {
        "environment": env,
        "config": asdict(config) | {"sizes": list(config.sizes), "threads": list(config.threads)},
        "rows": rows_to_records(rows),
        "targets": targets,
    }
    with open(path, "w") as out:
        json.dump(document, out, indent=1)
        out.write("\n")


# ----------------------------------------------------------------------------------------------
# Command line


def parse_size(text: str) -> int:
    """'64K', '1M', '16M', '2**20' or a plain integer, in elements (K = 1024)."""
    text = text.strip().upper()
    if "**" in text:
        base, exponent = text.split("**")
        return int(base) ** int(exponent)
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(text[:-1] if scale > 1 else text) * scale


def parse_threads(text: str) -> list[int]:
    """'1,all' -> [1, torch's default thread count], duplicates removed."""
    threads: list[int] = []
    for item in text.split(","):
        count = ALL_THREADS if item.strip() == "all" else int(item)
        if count not in threads:
            threads.append(count)
    return threads


def _choices(text: str, allowed: Sequence[str], what: str) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {unknown}; expected some of {list(allowed)}"
        )
    return chosen


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Forward+backward time of fusedmtl's losses, eager PyTorch and torch.compile."
    )
    add = parser.add_argument
    add("--sizes", help="comma-separated element counts (default 64K,1M,16M; --quick: 64K,1M)")
    add("--threads", default="1,all",
        help=f"comma-separated thread counts, 'all' = torch's default ({ALL_THREADS}); "
        "default 1,all")
    add("--losses", default=",".join(LOSSES), help="comma-separated losses; default all four")
    add("--variants", default=",".join(VARIANTS),
        help="plain: loss.backward(); weighted: (0.37 * loss).backward(); default both")
    add("--contenders", default=None,
        help="comma-separated from fused,triton,eager,compile; default fused,eager,compile on the "
             "CPU and all four on CUDA")
    add("--repeats", type=int,
        help=f"timed samples per contender and row (default {DEFAULT_REPEATS}; "
        f"--quick: {QUICK_REPEATS})")
    add("--warmup", type=int, default=DEFAULT_WARMUP,
        help=f"untimed rounds per row (default {DEFAULT_WARMUP})")
    add("--quick", action="store_true", help="fewer repeats and no 16M")
    add("--device", default="cpu", help="cpu (default), or cuda: used only when asked")
    add("--cold-compile", action="store_true",
        help="disable Inductor's caches, so that compile times are cold ones (slower)")
    add("--json", metavar="PATH",
        help="write the environment and one record per (row, contender) as JSON")
    return parser


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here")
    if args.sizes:
        sizes = [parse_size(size) for size in args.sizes.split(",")]
    else:
        sizes = list(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    if args.repeats is not None:
        repeats = args.repeats
    else:
        repeats = QUICK_REPEATS if args.quick else DEFAULT_REPEATS
    return SweepConfig(
        losses=_choices(args.losses, LOSSES, "losses"),
        sizes=sizes,
        threads=parse_threads(args.threads),
        variants=_choices(args.variants, tuple(VARIANTS), "variants"),
        contenders=_choices(
            args.contenders or ",".join(DEFAULT_CONTENDERS[torch.device(args.device).type]),
            CONTENDERS, "contenders",
        ),
        repeats=repeats,
        warmup=args.warmup,
        device=args.device,
        cold_compile=args.cold_compile,
    )


def run_cli(bench, argv: Sequence[str] | None = None) -> int:
    """The command line of a benchmark module: parse, sweep, print the table, the side notes and
    the targets, write the JSON. ``bench`` provides build_parser, config_from_args, run_sweep,
    check_targets, print_table, print_side_notes, targets_line and write_json."""
    parser = bench.build_parser()
    args = parser.parse_args(argv)
    try:
        config = bench.config_from_args(args)
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    env = environment(config.device)
    started = time.perf_counter()
    print(
        f"torch {env['torch']}, fusedmtl backend {env['backend']['selected']}, "
        f"CPU {env['cpu_model']} x{env['cpu_count']}, load {env['loadavg'][0]:.2f}, "
        f"THP_MEM_ALLOC_ENABLE={env['THP_MEM_ALLOC_ENABLE']}, device {config.device}",
        file=sys.stderr,
    )
    rows = bench.run_sweep(config, progress=lambda line: print(line, file=sys.stderr, flush=True))
    env["loadavg_end"] = list(os.getloadavg())
    env["elapsed_s"] = round(time.perf_counter() - started, 1)
    targets = bench.check_targets(rows)
    bench.print_table(rows)
    bench.print_side_notes(rows)
    print(bench.targets_line(targets))
    print(
        f"({env['elapsed_s']} s; 1-minute load average {env['loadavg'][0]:.2f} at start, "
        f"{env['loadavg_end'][0]:.2f} at end)"
    )
    if args.json:
        bench.write_json(args.json, env, config, rows, targets)
        print(f"wrote {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
