"""Sweep 'losses': forward+backward of fusedmtl's regression losses, eager PyTorch, torch.compile.

What one measurement is: a training step of a loss -- the forward pass and ``loss.backward()``
(variant 'plain') or ``(0.37 * loss).backward()`` (variant 'weighted', which makes grad_output != 1
and so exercises the in-place scaling of fusedmtl's precomputed gradient) -- on a leaf input that
requires grad and a target that does not, for each reduction ('none' backpropagates a
preallocated tensor of ones) and dtype. ``x.grad`` is set to None before every step, untimed, so
each contender writes a fresh gradient buffer as it does in training (fresh large buffers
page-fault on first touch; that cost is part of the step).

Contenders:
  fused    fusedmtl.<loss>                 (on CPU: gradient computed in the forward pass; on
           CUDA: the native CUDA kernels when the extension has them)
  triton   fusedmtl.<loss> with fusedmtl.backend.use("triton")   (CUDA only)
  eager    torch.nn.functional.<loss>
  compile  torch.compile(torch.nn.functional.<loss>, dynamic=False), compiled per (loss, size,
           threads, dtype, reduction) with the input requiring grad; the compile time is measured
           separately (the first forward+backward call) and is not part of the step times.

Bound: a step must at least read input and target and write the gradient, 3N elements (5N with
reduction 'none': the loss is written and grad_output read too), at the row's copy bandwidth.
Sizes that fit in cache can exceed 100 %. Small sizes time a batch of several steps per sample,
to stay well above the timer's resolution, and divide.

PyTorch's THP_MEM_ALLOC_ENABLE=1 (huge pages for every CPU allocation) is read once by the
process: to compare, run twice, with and without it. Its value is in the environment block.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import fusedmtl
from fusedmtl.bench.common import (
    ALL_THREADS, DEFAULT_WARMUP, DTYPES, Bandwidth, Clock, ContenderResults,
    CopyBuffers, Progress, Stats, bandwidth_note, drop_empty_columns, fmt_ms, fmt_percent,
    fmt_ratio, format_size, measure_copy_bandwidth, num_threads, parse_choices, parse_size,
    render_table, section_ends, time_contenders,
)

NAME = "losses"
LOSSES = ("smooth_l1_loss", "huber_loss", "l1_loss", "mse_loss")
CONTENDERS = ("fused", "triton", "eager", "compile")
# triton runs fusedmtl's Triton kernels: a contender on GPUs only (on the CPU they need the interpreter).
DEFAULT_CONTENDERS = {"cpu": ("fused", "eager", "compile"), "cuda": CONTENDERS}
# Variant -> the Python float the loss is multiplied by before backward (None: loss.backward()).
VARIANTS: dict[str, float | None] = {"plain": None, "weighted": 0.37}
VARIANT_LABELS = {"plain": "loss.backward()", "weighted": "(w*loss).backward()"}
REDUCTIONS = ("mean", "sum", "none")
# The full sweep: 96 rows, 48 compilations (the variants share one). 'sum' and 'none' on request.
FULL = {"sizes": (2**16, 2**20, 2**24), "dtypes": ("float32", "bfloat16"),
        "reductions": ("mean",), "variants": ("plain", "weighted")}
QUICK = {"sizes": (2**16, 2**20), "dtypes": ("float32",), "reductions": ("mean",),
         "variants": ("plain",)}
# Samples shorter than this many elements' worth of work batch several steps (see steps_per_sample).
MIN_ELEMENTS_PER_SAMPLE = 2**20
MAX_STEPS_PER_SAMPLE = 16  # tiny sizes (tests) would otherwise batch hundreds of steps

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Config:
    """What to measure; the defaults are the full sweep."""

    losses: Sequence[str] = LOSSES
    sizes: Sequence[int] = FULL["sizes"]
    dtypes: Sequence[str] = FULL["dtypes"]
    reductions: Sequence[str] = FULL["reductions"]
    variants: Sequence[str] = FULL["variants"]
    threads: Sequence[int] = (1, ALL_THREADS)
    contenders: Sequence[str] = DEFAULT_CONTENDERS["cpu"]
    repeats: int = 15
    warmup: int = DEFAULT_WARMUP
    device: str = "cpu"
    cold_compile: bool = False  # Inductor's caches disabled: every compile time is a cold one


# ----------------------------------------------------------------------------------------------
# The contenders and their steps


def loss_function(name: str, contender: str, reduction: str) -> LossFn:
    """The eager callable of a contender (compile is built from 'eager' by compile_loss)."""
    module = F if contender in ("eager", "compile") else fusedmtl
    fn = getattr(module, name)
    if contender == "triton":

        def run(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            with fusedmtl.backend.use("triton"):  # the op chosen in forward also runs backward
                return fn(x, target, reduction=reduction)

        return run

    def call(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return fn(x, target, reduction=reduction)

    return call


@dataclass
class Compiled:
    """A torch.compile'd loss and what its compilation cost."""

    fn: LossFn
    compile_s: float
    fx_cache_hits: int
    fx_cache_misses: int


def compile_loss(
    eager: LossFn, x: torch.Tensor, target: torch.Tensor, grad_output: torch.Tensor | None,
    clock: Clock,
) -> Compiled:
    """torch.compile(eager, dynamic=False), compiled for these very tensors (x requires grad).

    Dynamo's caches are reset first, so every row gets its own compilation (Inductor specialises
    its CPU kernels on the thread count) and no recompile limit is hit. The compile time is the
    first forward+backward call, which compiles both graphs; Inductor's on-disk cache can make it
    much shorter on a second run: its hits and misses are recorded (--cold-compile disables it).
    """
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    fn = torch.compile(eager, dynamic=False)
    inductor = counters["inductor"]
    hits, misses = inductor["fxgraph_cache_hit"], inductor["fxgraph_cache_miss"]

    def first_step() -> None:
        x.grad = None
        fn(x, target).backward(grad_output)

    elapsed_ms = clock.time_ms(first_step)
    x.grad = None
    return Compiled(
        fn, elapsed_ms / 1e3,
        inductor["fxgraph_cache_hit"] - hits, inductor["fxgraph_cache_miss"] - misses,
    )


def make_sample(
    loss_fn: LossFn, x: torch.Tensor, target: torch.Tensor, grad_output: torch.Tensor | None,
    weight: float | None, steps: int,
) -> Callable[[], None]:
    """A callable running ``steps`` training steps of the loss, each into a fresh x.grad."""
    if weight is None:

        def step() -> None:
            x.grad = None
            loss_fn(x, target).backward(grad_output)

    else:

        def step() -> None:
            x.grad = None
            (weight * loss_fn(x, target)).backward(grad_output)

    if steps == 1:
        return step

    def batch() -> None:
        for _ in range(steps):
            step()

    return batch


def steps_per_sample(n: int) -> int:
    """Steps timed together in one sample: 16 at 64K elements (and below), 1 from 1M on."""
    return max(1, min(MAX_STEPS_PER_SAMPLE, MIN_ELEMENTS_PER_SAMPLE // n))


def make_inputs(
    n: int, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A leaf input requiring grad and a target not requiring it, both N(0, 1): their difference
    falls on both sides of beta = delta = 1 (the branches of smooth-L1 and Huber) at random."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=generator).to(device, dtype).requires_grad_()
    target = torch.randn(n, generator=generator).to(device, dtype)
    return x, target


def least_elements(n: int, reduction: str) -> int:
    """Elements a step must move: read input and target, write the gradient (and with 'none',
    write the loss and read grad_output)."""
    return (5 if reduction == "none" else 3) * n


# ----------------------------------------------------------------------------------------------
# Rows


@dataclass
class Row(ContenderResults):
    """The measurements of one (loss, N, dtype, reduction, threads, variant)."""

    loss: str
    n: int
    dtype: str
    reduction: str
    threads: int
    variant: str
    device: str
    steps_per_sample: int
    repeats: int
    stats: dict[str, Stats]
    bandwidth: Bandwidth
    bytes: int
    compile_s: float | None = None
    compile_fx_cache_hits: int | None = None
    compile_fx_cache_misses: int | None = None

    @property
    def row_id(self) -> str:
        return (f"{self.loss}|{format_size(self.n)}|{self.dtype}|{self.reduction}|"
                f"t{self.threads}|{self.variant}")


def planned_rows(config: Config) -> int:
    return (len(config.threads) * len(config.sizes) * len(config.dtypes) * len(config.losses)
            * len(config.reductions) * len(config.variants))


def run(config: Config, progress: Progress) -> list[Row]:
    """All rows: by thread count, size, dtype, loss, reduction (compiled once for the variants),
    variant."""
    import torch._inductor.config as inductor_config

    device = torch.device(config.device)
    clock = Clock(device)
    buffers = CopyBuffers(device)
    rows: list[Row] = []
    previous_force_disable_caches = inductor_config.force_disable_caches
    inductor_config.force_disable_caches = config.cold_compile or previous_force_disable_caches
    try:
        for threads in config.threads:
            with num_threads(threads):
                for n in config.sizes:
                    for dtype_name in config.dtypes:
                        x, target = make_inputs(n, DTYPES[dtype_name], device)
                        ones = torch.ones_like(target)
                        for loss in config.losses:
                            for reduction in config.reductions:
                                rows += measure_rows(
                                    config, loss, x, target, ones, dtype_name, reduction,
                                    buffers, clock, progress,
                                )
                        del x, target, ones
    finally:
        inductor_config.force_disable_caches = previous_force_disable_caches
        torch._dynamo.reset()
    return rows


def measure_rows(
    config: Config, loss: str, x: torch.Tensor, target: torch.Tensor, ones: torch.Tensor,
    dtype_name: str, reduction: str, buffers: CopyBuffers, clock: Clock, progress: Progress,
) -> list[Row]:
    """The rows of one (loss, size, dtype, reduction), one per variant, sharing one compilation."""
    grad_output = ones if reduction == "none" else None
    functions = {
        name: loss_function(loss, name, reduction)
        for name in config.contenders if name != "compile"
    }
    compiled = None
    if "compile" in config.contenders:
        compiled = compile_loss(loss_function(loss, "eager", reduction), x, target, grad_output,
                                clock)
        functions["compile"] = compiled.fn
    n = x.numel()
    steps = steps_per_sample(n)
    rows = []
    for variant in config.variants:
        progress.row(f"{loss} N={format_size(n)} {dtype_name} {reduction} "
                     f"t{torch.get_num_threads()} {variant}")
        bandwidth = measure_copy_bandwidth(buffers, clock, config.repeats)
        samples = {
            name: make_sample(fn, x, target, grad_output, VARIANTS[variant], steps)
            for name, fn in functions.items()
        }

        def drop_grad() -> None:
            x.grad = None

        stats = time_contenders(samples, clock, config.repeats, config.warmup, drop_grad, steps)
        x.grad = None
        rows.append(Row(
            loss=loss, n=n, dtype=dtype_name, reduction=reduction,
            threads=torch.get_num_threads(), variant=variant, device=str(x.device),
            steps_per_sample=steps, repeats=config.repeats, stats=stats, bandwidth=bandwidth,
            bytes=least_elements(n, reduction) * x.element_size(),
            compile_s=compiled.compile_s if compiled else None,
            compile_fx_cache_hits=compiled.fx_cache_hits if compiled else None,
            compile_fx_cache_misses=compiled.fx_cache_misses if compiled else None,
        ))
    return rows


# ----------------------------------------------------------------------------------------------
# Targets of the issue (float32, reduction 'mean', 1 thread): reported, not asserted


@dataclass(frozen=True)
class Target:
    """fused must be at least ``min_ratio`` times faster than ``against`` on the matching rows."""

    label: str
    variant: str
    against: str
    min_ratio: float
    n: int | None = None  # None: every size
    threads: int = 1
    dtype: str = "float32"
    reduction: str = "mean"


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
            if (row.variant, row.threads, row.dtype, row.reduction)
            == (target.variant, target.threads, target.dtype, target.reduction)
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
    parts = []
    for result in results:
        worst = (
            "" if result["worst_ratio"] is None
            else f" ({result['worst_ratio']:.2f}x {result['worst_row']}, "
            f"{result['rows_passed']}/{result['rows']} rows pass)"
        )
        parts.append(f"{result['label']}: {result['status']}{worst}")
    return "Loss targets (float32, mean, 1 thread; worst row, fused speed-up): " + " | ".join(parts)


# ----------------------------------------------------------------------------------------------
# Output

COLUMNS = (
    "loss", "N", "dtype", "reduction", "threads", "backward", "fused ms", "triton ms", "eager ms",
    "compile ms", "eager/fused", "compile/fused", "bound ms", "fused % of bound",
)


def table_cells(row: Row) -> list[str]:
    return [
        row.loss, format_size(row.n), row.dtype, row.reduction, str(row.threads),
        VARIANT_LABELS[row.variant],
        fmt_ms(row.median("fused")), fmt_ms(row.median("triton")), fmt_ms(row.median("eager")),
        fmt_ms(row.median("compile")), fmt_ratio(row.ratio("eager")),
        fmt_ratio(row.ratio("compile")), fmt_ms(row.bound_ms),
        fmt_percent(row.fraction_of_bound("fused")),
    ]


def report(rows: Sequence[Row]) -> None:
    """The table, then the copy bandwidth, the compile times and the targets."""
    if not rows:
        return
    columns, cells = drop_empty_columns(
        COLUMNS, [table_cells(row) for row in rows],
        ("triton ms", "eager ms", "compile ms", "eager/fused", "compile/fused"),
    )
    render_table(
        f"Losses, forward+backward on {rows[0].device}: median ms per step; ratios = "
        "contender / fused (>1: fused faster)",
        columns, cells, left_columns=6,
        ends=section_ends([(row.threads, row.n, row.dtype) for row in rows]),
    )
    note = bandwidth_note(rows)
    if note:
        print(note)
    compiles = [row for row in rows if row.compile_s is not None and row.variant == rows[0].variant]
    if compiles:
        hits = sum(bool(r.compile_fx_cache_hits and not r.compile_fx_cache_misses) for r in compiles)
        slowest = max(compiles, key=lambda r: r.compile_s)
        print(
            f"torch.compile time (first forward+backward, not in the step times): "
            f"{len(compiles)} compilations, {sum(r.compile_s for r in compiles):.1f} s in all, "
            f"{hits} from Inductor's FX graph cache; slowest {slowest.compile_s:.2f} s "
            f"({slowest.row_id})"
        )
    print(targets_line(check_targets(rows)))


def records(rows: Sequence[Row]) -> list[dict]:
    """One flat record per (row, contender)."""
    out = []
    for row in rows:
        fields = {
            "sweep": NAME, "loss": row.loss, "n": row.n, "dtype": row.dtype,
            "reduction": row.reduction, "threads": row.threads, "variant": row.variant,
            "backward": VARIANT_LABELS[row.variant], "weight": VARIANTS[row.variant],
            "device": row.device, "repeats": row.repeats, "steps_per_sample": row.steps_per_sample,
        }
        for record in row.contender_records(row.row_id, fields):
            compiled = record["contender"] == "compile"
            record |= {
                "compile_s": row.compile_s if compiled else None,
                "compile_fx_cache_hits": row.compile_fx_cache_hits if compiled else None,
                "compile_fx_cache_misses": row.compile_fx_cache_misses if compiled else None,
            }
            out.append(record)
    return out


# ----------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("losses sweep")
    add = group.add_argument
    add("--sizes", help="comma-separated element counts, e.g. 64K,1M,16M "
        f"(default {','.join(map(format_size, FULL['sizes']))}; "
        f"--quick: {','.join(map(format_size, QUICK['sizes']))})")
    add("--losses", default=",".join(LOSSES), help="comma-separated losses; default all four")
    add("--dtypes", help=f"comma-separated from {','.join(DTYPES)} "
        f"(default {','.join(FULL['dtypes'])}; --quick: {','.join(QUICK['dtypes'])})")
    add("--reductions", help=f"comma-separated from {','.join(REDUCTIONS)} "
        f"(default {','.join(FULL['reductions'])}; --quick: {','.join(QUICK['reductions'])})")
    add("--variants", help="plain: loss.backward(); weighted: (0.37 * loss).backward() "
        f"(default {','.join(FULL['variants'])}; --quick: {','.join(QUICK['variants'])})")
    add("--contenders", help="comma-separated from fused,triton,eager,compile; default "
        "fused,eager,compile on the CPU and all four on CUDA")
    add("--cold-compile", action="store_true",
        help="disable Inductor's caches, so that compile times are cold ones (slower)")


def config_from_args(args: argparse.Namespace, common: dict) -> Config:
    defaults = QUICK if args.quick else FULL

    def pick(value: str | None, key: str) -> str:
        return value if value is not None else ",".join(map(str, defaults[key]))

    device_type = torch.device(common["device"]).type
    return Config(
        losses=parse_choices(args.losses, LOSSES, "losses"),
        sizes=[parse_size(size) for size in pick(args.sizes, "sizes").split(",")],
        dtypes=parse_choices(pick(args.dtypes, "dtypes"), tuple(DTYPES), "dtypes"),
        reductions=parse_choices(pick(args.reductions, "reductions"), REDUCTIONS, "reductions"),
        variants=parse_choices(pick(args.variants, "variants"), tuple(VARIANTS), "variants"),
        contenders=parse_choices(
            args.contenders or ",".join(DEFAULT_CONTENDERS[device_type]), CONTENDERS,
            "contenders",
        ),
        cold_compile=args.cold_compile,
        **common,
    )

