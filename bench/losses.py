"""Sweep 'losses': forward+backward of fusedmtl's regression losses against eager PyTorch and
torch.compile (and fusedmtl's Triton kernels on a GPU).

One measurement is a training step of a loss: the forward pass and ``loss.backward()`` (variant
'plain') or ``(0.37 * loss).backward()`` ('weighted': grad_output != 1, which exercises the
in-place scaling of fusedmtl's precomputed gradient), on a leaf input requiring grad and a target
that does not; ``x.grad`` is set to None before every step, untimed, so each contender writes a
fresh gradient as in training. Reduction 'none' backpropagates a preallocated tensor of ones.

Contenders: fused (fusedmtl.<loss>), triton (the same under fusedmtl.backend.use("triton"), CUDA
only), eager (torch.nn.functional.<loss>), compile (torch.compile of eager, dynamic=False,
compiled per row; its compile time is the first forward+backward, reported apart).

Bound: a step reads input and target and writes the gradient, 3N elements (5N with 'none'), at the
row's copy bandwidth; sizes that fit in cache can exceed 100 %. Small sizes batch several steps
per sample. THP_MEM_ALLOC_ENABLE=1 (huge pages for every CPU allocation) is read once by the
process: to compare, run twice. Its value is in the environment block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fusedmtl
from bench.sweep import Common, Row, Sweep, check_targets, targets_line
from bench.tables import (
    drop_empty_columns,
    fmt_ms,
    fmt_percent,
    fmt_ratio,
    fmt_size,
    render_table,
)
from bench.timing import Clock, CopyBandwidth, num_threads, time_contenders
from bench.workload import loss_functions

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
VARIANTS = {"plain": None, "weighted": 0.37}  # the float the loss is multiplied by
REDUCTIONS = ("mean", "sum", "none")
FULL = {
    "sizes": "64K,1M,16M",
    "dtypes": "float32,bfloat16",
    "reductions": "mean",
    "variants": "plain,weighted",
}
QUICK = {"sizes": "64K,1M", "dtypes": "float32", "reductions": "mean", "variants": "plain"}
MIN_ELEMENTS_PER_SAMPLE, MAX_STEPS_PER_SAMPLE = 2**20, 16


def parse_size(text: str) -> int:
    """'64K', '1M', '2**20' or an integer, in elements (K = 1024)."""
    text = text.strip().upper()
    if "**" in text:
        base, exponent = text.split("**")
        return int(base) ** int(exponent)
    scale = {"K": 2**10, "M": 2**20}.get(text[-1:], 1)
    return int(text[:-1] if scale > 1 else text) * scale


def choices(text: str, allowed, what: str) -> list[str]:
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in allowed]
    if unknown or not chosen:
        raise ValueError(f"unknown {what} {unknown}; expected some of {list(allowed)}")
    return chosen


@dataclass
class Config(Common):
    losses: tuple[str, ...] = ()
    sizes: tuple[int, ...] = ()
    dtypes: tuple[str, ...] = ()
    reductions: tuple[str, ...] = ()
    variants: tuple[str, ...] = ()
    contenders: tuple[str, ...] = ()
    cold_compile: bool = False


def loss_call(name: str, contender: str, reduction: str):
    fn = getattr(F if contender in ("eager", "compile") else fusedmtl, name)
    if contender == "triton":

        def run(x, target):
            with fusedmtl.backend.use("triton"):  # the op chosen in forward also runs backward
                return fn(x, target, reduction=reduction)

        return run
    return lambda x, target: fn(x, target, reduction=reduction)


def compile_loss(eager, x, target, grad_output, clock: Clock):
    """torch.compile(eager) compiled for these tensors by one timed forward+backward (Dynamo reset
    first: Inductor specialises CPU kernels on the thread count). Returns (fn, seconds, whether
    Inductor's FX graph cache served it)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    fn = torch.compile(eager, dynamic=False)
    misses = counters["inductor"]["fxgraph_cache_miss"]

    def first_step() -> None:
        x.grad = None
        fn(x, target).backward(grad_output)

    seconds = clock.time_ms(first_step) / 1e3
    return fn, seconds, counters["inductor"]["fxgraph_cache_miss"] == misses


class Losses(Sweep):
    name = "losses"
    contenders = ("fused", "triton", "eager", "compile")

    def add_arguments(self, group) -> None:
        add = group.add_argument
        add("--sizes", help=f"element counts (default {FULL['sizes']}; --quick {QUICK['sizes']})")
        add("--losses", default="all", help="comma-separated loss functions; default all")
        add("--dtypes", help=f"from {','.join(DTYPES)} (default {FULL['dtypes']})")
        add("--reductions", help=f"from {','.join(REDUCTIONS)} (default {FULL['reductions']})")
        add(
            "--variants",
            help="plain: loss.backward(); weighted: (0.37 * loss).backward() "
            f"(default {FULL['variants']}; --quick {QUICK['variants']})",
        )
        add(
            "--contenders",
            help="from fused,triton,eager,compile; default all but triton on "
            "the CPU (the Triton interpreter is not a contender)",
        )
        add("--cold-compile", action="store_true", help="disable Inductor's caches")

    def config(self, args, common: Common) -> Config:
        defaults = QUICK if args.quick else FULL
        pick = {key: getattr(args, key) or defaults[key] for key in defaults}
        every = loss_functions()
        default = "fused,eager,compile" if common.device == "cpu" else ",".join(self.contenders)
        return Config(
            **vars(common),
            losses=tuple(every if args.losses == "all" else choices(args.losses, every, "losses")),
            sizes=tuple(parse_size(s) for s in pick["sizes"].split(",")),
            dtypes=tuple(choices(pick["dtypes"], DTYPES, "dtypes")),
            reductions=tuple(choices(pick["reductions"], REDUCTIONS, "reductions")),
            variants=tuple(choices(pick["variants"], VARIANTS, "variants")),
            contenders=tuple(choices(args.contenders or default, self.contenders, "contenders")),
            cold_compile=args.cold_compile,
        )

    def planned_rows(self, c: Config) -> int:
        return (
            len(c.threads)
            * len(c.sizes)
            * len(c.dtypes)
            * len(c.losses)
            * len(c.reductions)
            * len(c.variants)
        )

    def run(self, c: Config, progress) -> list[Row]:
        import torch._inductor.config as inductor_config

        device = torch.device(c.device)
        clock, copy = Clock(device), CopyBandwidth(device)
        rows: list[Row] = []
        previous = inductor_config.force_disable_caches
        inductor_config.force_disable_caches = c.cold_compile or previous
        try:
            for threads in c.threads:
                with num_threads(threads):
                    for n in c.sizes:
                        for dtype in c.dtypes:
                            generator = torch.Generator().manual_seed(0)
                            # N(0, 1) on both sides: differences fall on both sides of beta = 1
                            x = torch.randn(n, generator=generator).to(device, DTYPES[dtype])
                            x.requires_grad_()
                            target = torch.randn(n, generator=generator).to(device, DTYPES[dtype])
                            for loss in c.losses:
                                for reduction in c.reductions:
                                    rows += self.measure(
                                        c,
                                        loss,
                                        x,
                                        target,
                                        dtype,
                                        reduction,
                                        threads,
                                        clock,
                                        copy,
                                        progress,
                                    )
        finally:
            inductor_config.force_disable_caches = previous
            torch._dynamo.reset()
        return rows

    def measure(
        self, c: Config, loss, x, target, dtype, reduction, threads, clock, copy, progress
    ) -> list[Row]:
        """The rows of one (loss, size, dtype, reduction), one per variant, one compilation."""
        grad_output = torch.ones_like(target) if reduction == "none" else None
        fns = {name: loss_call(loss, name, reduction) for name in c.contenders if name != "compile"}
        compiled = {}
        if "compile" in c.contenders:
            fn, seconds, cached = compile_loss(
                loss_call(loss, "eager", reduction), x, target, grad_output, clock
            )
            fns["compile"], compiled = fn, {"compile_s": seconds, "compile_cached": cached}
        n = x.numel()
        steps = max(1, min(MAX_STEPS_PER_SAMPLE, MIN_ELEMENTS_PER_SAMPLE // n))
        rows = []
        for variant in c.variants:
            progress.row(f"{loss} N={fmt_size(n)} {dtype} {reduction} t{threads} {variant}")
            weight = VARIANTS[variant]

            def sample(fn, weight=weight):
                def run() -> None:
                    for _ in range(steps):
                        x.grad = None
                        value = fn(x, target)
                        (value if weight is None else weight * value).backward(grad_output)

                return run

            gbs = copy.measure_gbs(c.repeats)
            stats = time_contenders(
                {name: sample(fn) for name, fn in fns.items()},
                clock,
                c.repeats,
                c.warmup,
                calls_per_sample=steps,
            )
            x.grad = None
            fields = {
                "loss": loss,
                "n": n,
                "dtype": dtype,
                "reduction": reduction,
                "threads": threads,
                "variant": variant,
                "device": c.device,
            }
            rows.append(
                Row(
                    self.name,
                    fields,
                    stats,
                    bandwidth_gbs=gbs,
                    info={"steps_per_sample": steps, **compiled},
                    bytes=(5 if reduction == "none" else 3) * n * x.element_size(),
                )
            )
        return rows

    def report(self, rows) -> None:
        columns = [
            "loss",
            "N",
            "dtype",
            "red.",
            "thr",
            "backward",
            "fused ms",
            "triton ms",
            "eager ms",
            "compile ms",
            "vs eager",
            "vs compile",
            "% bound",
        ]
        cells = [
            [
                r.loss.removesuffix("_loss"),
                fmt_size(r.n),
                r.dtype,
                r.reduction,
                str(r.threads),
                "w*loss" if r.variant == "weighted" else "loss",
                *(fmt_ms(r.median(c)) for c in self.contenders),
                fmt_ratio(r.ratio("eager")),
                fmt_ratio(r.ratio("compile")),
                fmt_percent(r.fraction_of_bound()),
            ]
            for r in rows
        ]
        columns, cells = drop_empty_columns(columns, cells, keep_first=7)
        render_table(
            f"Losses, forward+backward on {rows[0].device}: median ms per step; "
            "vs = contender / fused (>1: fused faster)",
            columns,
            cells,
            left_columns=6,
        )
        compiles = [r for r in rows if "compile_s" in r.info and r.variant == rows[0].variant]
        if compiles:
            slowest = max(compiles, key=lambda r: r.compile_s)
            print(
                f"torch.compile (first forward+backward, not in the step times): "
                f"{len(compiles)} compilations, {sum(r.compile_s for r in compiles):.1f} s, "
                f"{sum(r.compile_cached for r in compiles)} from Inductor's FX graph cache; "
                f"slowest {slowest.compile_s:.2f} s ({slowest.row_id})"
            )
        line = targets_line(self.name, check_targets(self.name, rows))
        if line:
            print(line)
