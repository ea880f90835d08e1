"""What every sweep of ``fusedmtl-bench`` shares: timing, copy bandwidth, environment, tables,
progress, parameter shapes and the flatten-and-concatenate idiom the baselines use.

How a measurement is taken (see /work/shared/BUILD_NOTES.md, "Measuring on a 2-core shared
machine"): the contenders of one row are interleaved -- each repetition runs every contender
once, in an order that rotates from one repetition to the next -- after untimed warm-up rounds,
with the cyclic garbage collector off; the statistics are medians (with min and IQR), and every
ratio is taken between contenders of the same row, so of the same run. Just before each
memory-bound row the copy bandwidth is measured with the row's thread setting, and the row's
least traffic over that bandwidth is its bound ("% of bound" = bound / median time).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

import fusedmtl

# torch's own default thread count, read before any sweep changes it: what "all threads" means.
ALL_THREADS = torch.get_num_threads()
DEFAULT_WARMUP = 3
BANDWIDTH_BUFFER_BYTES = 64 * 2**20
REFERENCE = "fused"  # the contender every ratio is taken against

DTYPES = {
    "float32": torch.float32, "float64": torch.float64,
    "bfloat16": torch.bfloat16, "float16": torch.float16,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

TaskGrads = list[list[torch.Tensor]]

# ----------------------------------------------------------------------------------------------
# Timing


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

    def record(self) -> dict:
        return {
            "median_ms": self.median_ms, "min_ms": self.min_ms, "iqr_ms": self.iqr_ms,
            "samples_ms": self.samples_ms,
        }


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
    samples: dict[str, Callable[[], object]],
    clock: Clock,
    repeats: int,
    warmup: int,
    before_each: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Times each callable ``repeats`` times, interleaved, after ``warmup`` untimed rounds.

    Repetition r runs the contenders in the order rotated by r, so that none is always first (cold
    caches, a neighbour's burst of load) or always after the same one. ``before_each`` runs untimed
    before every call (e.g. dropping the previous gradient, whose freeing is not the next
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


def time_contenders(
    samples: dict[str, Callable[[], object]],
    clock: Clock,
    repeats: int,
    warmup: int,
    before_each: Callable[[], None] | None = None,
    calls_per_sample: int = 1,
) -> dict[str, Stats]:
    """time_interleaved, summarised per contender in ms per call (a sample may batch several)."""
    times = time_interleaved(samples, clock, repeats, warmup, before_each)
    return {name: Stats.of([t / calls_per_sample for t in ts]) for name, ts in times.items()}


@contextlib.contextmanager
def num_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set for the block, restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------
# Memory bandwidth


class CopyBuffers:
    """Two preallocated, already touched float32 buffers for the copy-bandwidth measurement."""

    def __init__(self, device: torch.device, nbytes: int = BANDWIDTH_BUFFER_BYTES):
        count = nbytes // 4
        self.src = torch.ones(count, dtype=torch.float32, device=device)
        self.dst = torch.zeros(count, dtype=torch.float32, device=device)
        self.dst.copy_(self.src)  # every page of both buffers mapped before the first sample
        self.nbytes = count * 4


@dataclass
class Bandwidth:
    """Copy bandwidth: bytes read plus bytes written per second, from the median copy time."""

    gbytes_per_s: float
    copy: Stats

    def bound_ms(self, nbytes: int) -> float:
        """Least time to move ``nbytes`` at this bandwidth."""
        return nbytes / (self.gbytes_per_s * 1e9) * 1e3


def measure_copy_bandwidth(buffers: CopyBuffers, clock: Clock, repeats: int) -> Bandwidth:
    """Median time of dst.copy_(src) with the current thread setting, as read+write bytes/second."""
    stats = time_contenders(
        {"copy": lambda: buffers.dst.copy_(buffers.src)}, clock, repeats, warmup=1
    )["copy"]
    return Bandwidth(2 * buffers.nbytes / (stats.median_ms * 1e-3) / 1e9, stats)


# ----------------------------------------------------------------------------------------------
# Rows: contender statistics and the ratios between them


class ContenderResults:
    """Medians and ratios of a benchmark row. The row provides ``stats`` (contender -> Stats) and,
    for memory-bound rows, ``bandwidth`` and ``bytes`` (its least traffic). (No class attributes
    here: dataclass rows would take them as their fields' defaults.)"""

    def median(self, contender: str) -> float | None:
        stats = self.stats.get(contender)
        return stats.median_ms if stats else None

    def ratio(self, contender: str) -> float | None:
        """contender's median / fused's median: how many times faster fused is (>1: fused wins)."""
        mine, fused = self.median(contender), self.median(REFERENCE)
        return mine / fused if mine and fused else None

    @property
    def bound_ms(self) -> float | None:
        bandwidth, nbytes = getattr(self, "bandwidth", None), getattr(self, "bytes", None)
        if bandwidth is None or nbytes is None:
            return None
        return bandwidth.bound_ms(nbytes)

    def fraction_of_bound(self, contender: str) -> float | None:
        median, bound = self.median(contender), self.bound_ms
        return bound / median if median and bound else None

    def contender_records(self, row_id: str, fields: dict) -> list[dict]:
        """One flat record per contender: the row's ``fields``, then the statistics, the ratio to
        fused and, for memory-bound rows, the bandwidth and bound."""
        records = []
        for contender, stats in self.stats.items():
            record = {"row_id": row_id, **fields, "contender": contender, **stats.record()}
            record["ratio_to_fused"] = self.ratio(contender)
            if getattr(self, "bandwidth", None) is not None:
                record |= {
                    "bandwidth_gbs": self.bandwidth.gbytes_per_s,
                    "copy_median_ms": self.bandwidth.copy.median_ms,
                    "bytes": self.bytes,
                    "bound_ms": self.bound_ms,
                    "fraction_of_bound": self.fraction_of_bound(contender),
                }
            records.append(record)
        return records


def bandwidth_note(rows: Sequence) -> str | None:
    """Copy bandwidth per thread count over the memory-bound rows (median [min-max])."""
    by_threads: dict[int, list[float]] = {}
    for row in rows:
        if getattr(row, "bandwidth", None) is not None:
            by_threads.setdefault(row.threads, []).append(row.bandwidth.gbytes_per_s)
    if not by_threads:
        return None
    return "Copy bandwidth (read+write GB/s, median over rows [min-max]): " + "; ".join(
        f"{threads} thread(s): {statistics.median(gbs):.1f} [{min(gbs):.1f}-{max(gbs):.1f}]"
        for threads, gbs in by_threads.items()
    )


# ----------------------------------------------------------------------------------------------
# Parameter shapes, task gradients and the flatten idiom


RESNET18_TENSORS = 62
RESNET18_ELEMENTS = 11_689_512


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
    assert len(shapes) == RESNET18_TENSORS, len(shapes)
    assert sum(math.prod(shape) for shape in shapes) == RESNET18_ELEMENTS
    return shapes


def scaled_shapes(shapes: Sequence[tuple[int, ...]], divisor: int) -> list[tuple[int, ...]]:
    """The same list of tensors with every leading dimension divided by ``divisor`` (at least 1):
    a small stand-in with the same tensor count, for tests and smoke runs."""
    return [(max(1, shape[0] // divisor), *shape[1:]) for shape in shapes]


def make_task_grads(
    shapes: Sequence[tuple[int, ...]], k: int, device: torch.device, seed: int = 0
) -> TaskGrads:
    """K lists of N(0, 1) float32 gradients of the given shapes."""
    generator = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(shape, generator=generator).to(device) for shape in shapes]
        for _ in range(k)
    ]


def flatten_rows(task_grads: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """A fresh K x G matrix holding each task's flattened gradients in a row (one copy per task:
    cat(out=row), the cheapest form of the idiom)."""
    k, g = len(task_grads), sum(t.numel() for t in task_grads[0])
    first = task_grads[0][0]
    flat = torch.empty((k, g), dtype=first.dtype, device=first.device)
    for i, grads in enumerate(task_grads):
        torch.cat([t.reshape(-1) for t in grads], out=flat[i])
    return flat


def split_like(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A G vector cut into views with the shapes of ``like``."""
    pieces = vector.split([t.numel() for t in like])
    return [piece.view_as(t) for piece, t in zip(pieces, like)]


def copy_split_into(vector: torch.Tensor, out: Sequence[torch.Tensor]) -> None:
    """Splits a G vector back into the shapes of ``out`` and copies it into them."""
    torch._foreach_copy_(list(out), split_like(vector, out))


def add_split_into_grad(vector: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
    """p.grad += the piece of a G vector that belongs to p, creating .grad where it is None (the
    way autograd accumulates, as fusedmtl's combine_into_grad_ does)."""
    with torch.no_grad():
        pieces = split_like(vector, params)
        existing = [(p.grad, piece) for p, piece in zip(params, pieces) if p.grad is not None]
        if existing:
            torch._foreach_add_([g for g, _ in existing], [piece for _, piece in existing])
        for p, piece in zip(params, pieces):
            if p.grad is None:
                p.grad = piece.clone()


# ----------------------------------------------------------------------------------------------
# Environment


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
    """What the numbers depend on: versions, backend, threads, CPU/GPU, load, huge pages, date."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fusedmtl": getattr(fusedmtl, "__version__", None),
        "fusedmtl_path": os.path.dirname(fusedmtl.__file__),
        "backend": fusedmtl.backend.info(),
        "device": device,
        "torch_default_threads": ALL_THREADS,
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "gpu": None,
        "loadavg": list(os.getloadavg()),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "transparent_hugepage": thp_mode(),
        "argv": sys.argv,
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(
            torch.device(device) if device.startswith("cuda") else None
        )
    return env


def environment_line(env: dict) -> str:
    return (
        f"torch {env['torch']}, fusedmtl backend {env['backend']['selected']}, "
        f"CPU {env['cpu_model']} x{env['cpu_count']}, GPU {env['gpu'] or 'none'}, "
        f"{env['torch_default_threads']} threads, load {env['loadavg'][0]:.2f}, "
        f"THP_MEM_ALLOC_ENABLE={env['THP_MEM_ALLOC_ENABLE']}, device {env['device']}"
    )


# ----------------------------------------------------------------------------------------------
# Formatting and tables


def format_size(n: int) -> str:
    for unit, scale in (("M", 2**20), ("K", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def fmt_percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def fmt_mb(value: int | None) -> str:
    """MB with one decimal; below 0.1 MB, kilobytes with a K ("0" for nothing at all)."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    return f"{value / 2**20:.1f}" if value >= 2**20 / 10 else f"{value / 2**10:.1f}K"


def section_ends(keys: Sequence[object]) -> list[bool]:
    """A rule under line i when the grouping key changes after it."""
    return [i + 1 < len(keys) and keys[i + 1] != keys[i] for i in range(len(keys))]


def render_table(
    title: str,
    columns: Sequence[str],
    cells: Sequence[Sequence[str]],
    left_columns: int = 1,
    ends: Sequence[bool] | None = None,
    width: int = 200,
) -> None:
    """Prints a table of text cells, with rich if it is installed, else as plain text.

    The first ``left_columns`` columns are left-aligned, the others (numbers) right-aligned;
    ``ends[i]`` draws a rule under line i (rich only); ``width`` is rich's line width when the
    output is not a terminal (rich would assume 80 columns and squeeze).
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
    for line, end in zip(cells, ends if ends is not None else [False] * len(cells)):
        table.add_row(*line, end_section=end)
    console = Console()
    if not console.is_terminal:
        console = Console(width=width)
    console.print(table)


def drop_empty_columns(columns: Sequence[str], cells: list[list[str]], optional: Sequence[str]):
    """Removes the ``optional`` columns whose cells are all '-' (e.g. triton on the CPU)."""
    keep = [
        i for i, column in enumerate(columns)
        if column not in optional or any(line[i] != "-" for line in cells)
    ]
    return [columns[i] for i in keep], [[line[i] for i in keep] for line in cells]


# ----------------------------------------------------------------------------------------------
# Progress


class Progress:
    """A rich progress bar on stderr (one line per row without rich, or when disabled)."""

    def __init__(self, enabled: bool = True):
        self._bar = None
        self._task = None
        self._enabled = enabled

    def __enter__(self) -> Progress:
        if self._enabled:
            try:
                from rich.console import Console
                from rich.progress import (
                    BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                    TimeElapsedColumn,
                )
            except ImportError:
                pass
            else:
                self._bar = RichProgress(
                    TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=Console(stderr=True), transient=True,
                )
                self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def start(self, sweep: str, total: int) -> None:
        """A new sweep of ``total`` rows."""
        if self._bar is not None:
            if self._task is not None:
                self._bar.remove_task(self._task)
            self._task = self._bar.add_task(sweep, total=total)
        self._sweep, self._done, self._total = sweep, 0, total

    def row(self, description: str) -> None:
        """Called before each row: shows what is being measured, advances after the previous."""
        if self._bar is not None:
            self._bar.update(
                self._task, completed=self._done, description=f"{self._sweep}: {description}"
            )
        elif self._enabled:
            print(f"[{self._sweep} {self._done + 1}/{self._total}] {description}",
                  file=sys.stderr, flush=True)
        self._done += 1

    def finish(self) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=self._total)


# ----------------------------------------------------------------------------------------------
# Command-line parsing helpers


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


def parse_choices(text: str, allowed: Sequence[str], what: str) -> list[str]:
    """A comma-separated subset of ``allowed`` ('all': every one), in the order given."""
    if text.strip() == "all":
        return list(allowed)
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in allowed]
    if unknown or not chosen:
        raise ValueError(f"unknown {what} {unknown}; expected some of {list(allowed)}")
    return chosen


def optional_module(name: str):
    """The module if it imports, else None (optional comparison libraries)."""
    import importlib

    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return None
