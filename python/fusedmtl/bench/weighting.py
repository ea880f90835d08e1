"""Sweep 'weighting_step': the weighting step of every gradient-based method, fused against flatten.

What one measurement is: the step that follows the K per-task backward passes, for a method of
``fusedmtl.weighting.GRADIENT_BASED``, on K (default 4) task gradients of the ResNet-18 shapes of
the multi_tensor sweep (62 tensors, 11.7M elements), accumulating into the parameters' .grad:
  fused    ``method.step(task_grads, losses)``: the Gramian (or its diagonal) in one multi-tensor
           pass, ``method.coefficients(gramian, losses)``, sum_i c_i g_i added into .grad in a
           second pass; no K x G copy.
  flatten  the same step as it is usually written: torch.cat of each task's gradients into a
           fresh K x G matrix, the Gramian by a matmul (matrix @ matrix.T, over the last layer's
           columns for GradNorm), the same ``method.coefficients(gramian, losses)``, combined =
           coeffs @ matrix, split back and added into .grad. DB-MTL's running average of
           g_i / L_i is kept the flatten way too: a K x G matrix, scaled and lerped in place.
Each contender has its own, fresh method instance (stateful methods -- GradNorm's weights,
Nash-MTL's solution, DB-MTL's averages, PCGrad's random order -- evolve independently), built with
the same options. The parameters' .grad exist (zeros) before timing: the rows time the weighting
step, not the allocator (the training_step sweep has zero_grad(set_to_none=True) in its steps).

Agreement: once per method, before timing, both contenders run one step from fresh instances on
copies of the gradients into zeroed .grad; the table shows the largest difference over .grad
relative to its largest magnitude. The same check notices a step() that modifies the gradients
it is given (DB-MTL scales them in place): such a method's fused contender then gets its own copy
of the gradients for the timed calls, and the table marks it.

Least traffic: the Gramian pass reads the K x G gradients (GradNorm: only the last layer's
columns), the combine pass reads them again and reads and writes .grad: (K G_gram + K G + 2 G) 4
bytes. Methods that transform the gradients first (DB-MTL) move more by design.

Extra memory (estimated from the tensors each approach allocates, float32):
  fused    the K x K Gramian and a few K-vectors;
  flatten  the K x G matrix and the combined G vector (plus the K x K Gramian);
  both, DB-MTL: the K x G running averages it keeps between steps; the fused method's step()
           keeps a second K x G set that it writes the new averages into (no allocation per
           step, no page faults), so 2 K x G in all.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import fusedmtl.weighting as weighting
from fusedmtl.bench.common import (
    ALL_THREADS, DEFAULT_WARMUP, Bandwidth, Clock, ContenderResults, CopyBuffers, Progress, Stats,
    TaskGrads, add_split_into_grad, bandwidth_note, flatten_rows, fmt_mb, fmt_ms, fmt_percent,
    fmt_ratio, make_task_grads, measure_copy_bandwidth, num_threads, parse_choices, render_table,
    section_ends, time_contenders,
)
from fusedmtl.bench.multi_tensor import DEFAULT_TASKS, max_rel_diff, model_shapes

# The full run measures 1 thread only: the step is memory-bound like the
# multi_tensor ops, whose sweep shows the 2-thread scaling.
FULL_THREADS = "1"
NAME = "weighting_step"
CONTENDERS = ("fused", "flatten")
# GradNorm balances the gradient norms on the last shared layer: here the last weight and bias.
LAST_LAYER_TENSORS = 2
# Agreement beyond this (relative to the largest .grad magnitude) is flagged in the table. Not
# tighter: the flatten approach's float32 Gramian (one matmul over G = 11.7M products) is not exact,
# and MKL's sgemm on an AMD EPYC put it 2.6e-3 off the float64 value (fused: 3e-8), which moved
# the coefficients of grad_normalization, MGDA and Nash-MTL by about 1e-3.
AGREEMENT_TOLERANCE = 1e-2


@dataclass
class Config:
    methods: Sequence[str] = tuple(weighting.GRADIENT_BASED)
    threads: Sequence[int] = (1, ALL_THREADS)
    tasks: int = DEFAULT_TASKS
    shape_divisor: int = 1
    repeats: int = 15
    warmup: int = DEFAULT_WARMUP
    device: str = "cpu"


# ----------------------------------------------------------------------------------------------
# Building methods (shared with the training_step sweep)


def loss_values(k: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Detached task losses near 1 and all different: loss-dependent methods (GradNorm, DB-MTL,
    MGDA 'loss') see distinct tasks, and DB-MTL's in-place g / L does not drift far when the same
    gradients are weighted many times."""
    return torch.tensor([1.0 + 0.1 * i for i in range(k)], device=device)


def make_method(name: str, k: int, shared_params: Sequence[torch.Tensor] | None = None,
                last_shared_layer: Sequence[torch.Tensor] | None = None, seed: int = 0):
    """A fresh instance of a registered weighting with its default options, plus what a method
    cannot do without: GradNorm's last shared layer (default: the last LAST_LAYER_TENSORS shared
    parameters), PriorLoss's priors (1 per task), and a fixed seed for randomised methods (so
    that two instances draw the same order)."""
    if name in weighting.GRADIENT_BASED:
        cls = weighting.GRADIENT_BASED[name]
        args: tuple = (list(shared_params), k)
    else:
        cls = weighting.LOSS_BASED[name]
        args = (k,)
    accepted = inspect.signature(cls.__init__).parameters
    options: dict = {}
    if "last_shared_layer" in accepted:
        options["last_shared_layer"] = (
            list(last_shared_layer) if last_shared_layer is not None
            else list(shared_params)[-LAST_LAYER_TENSORS:]
        )
    if "priors" in accepted:
        options["priors"] = [1.0] * k
    if "seed" in accepted:
        options["seed"] = seed
    return cls(*args, **options)


# ----------------------------------------------------------------------------------------------
# The flatten contender


class FlattenRunningAverage:
    """DB-MTL's table the flatten way: rows g_i / (L_i + eps) of the K x G matrix, lerped in place
    towards the previous step's matrix with beta / (step + 1)^beta_sigma, and kept (a K x G state).
    Reads the method's public options; None (no transform) for methods without them."""

    def __init__(self, method):
        self.beta, self.beta_sigma, self.eps = method.beta, method.beta_sigma, method.eps
        self.average: torch.Tensor | None = None
        self.steps = 0

    @classmethod
    def for_method(cls, name: str, method) -> FlattenRunningAverage | None:
        return cls(method) if name == "db_mtl" else None

    def __call__(self, matrix: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        inverse = (1.0 / (losses.double() + self.eps)).to(matrix.dtype)
        matrix.mul_(inverse[:, None])
        if self.beta == 0:
            return matrix
        if self.average is None:
            self.average = torch.zeros_like(matrix)
        matrix.lerp_(self.average, self.beta / float(self.steps + 1) ** self.beta_sigma)
        self.average, self.steps = matrix, self.steps + 1
        return matrix


def flatten_step(
    name: str, method, params: Sequence[torch.Tensor], gramian_elements: int | None = None
) -> Callable[[TaskGrads, torch.Tensor], torch.Tensor]:
    """The weighting step written the flatten way, with ``method.coefficients``:
    ``gramian_elements`` restricts the Gramian to the last columns (GradNorm's last layer)."""
    transform = FlattenRunningAverage.for_method(name, method)

    def step(task_grads: TaskGrads, losses: torch.Tensor) -> torch.Tensor:
        matrix = flatten_rows(task_grads)
        if transform is not None:
            matrix = transform(matrix, losses)
        columns = matrix if gramian_elements is None else matrix[:, -gramian_elements:]
        gramian = columns @ columns.T
        coeffs = method.coefficients(gramian, losses).to(matrix)
        add_split_into_grad(coeffs @ matrix, params)
        return coeffs

    return step


def gramian_columns(name: str, params: Sequence[torch.Tensor]) -> int | None:
    """Elements of the last shared layer for GradNorm, whose Gramian covers only that layer."""
    if "last_shared_layer" in inspect.signature(weighting.GRADIENT_BASED[name].__init__).parameters:
        return sum(p.numel() for p in params[-LAST_LAYER_TENSORS:])
    return None


# ----------------------------------------------------------------------------------------------
# Agreement, traffic, memory


def reset_grads(params: Sequence[torch.Tensor]) -> None:
    for p in params:
        p.grad = torch.zeros_like(p)


def check_agreement(
    name: str, params: list[torch.Tensor], task_grads: TaskGrads, losses: torch.Tensor,
    gramian_elements: int | None,
) -> tuple[float, bool]:
    """One step of each contender from fresh instances, on copies of the gradients, into zeroed
    .grad: (largest relative difference of flatten's .grad from fused's, whether the fused step
    modified the gradients it was given)."""
    k = len(task_grads)
    grads_copy = [[g.clone() for g in row] for row in task_grads]
    reset_grads(params)
    make_method(name, k, params).step(grads_copy, losses)
    fused = torch.cat([p.grad.reshape(-1) for p in params])
    mutates = any(
        not torch.equal(a, b) for row_a, row_b in zip(grads_copy, task_grads)
        for a, b in zip(row_a, row_b)
    )
    reset_grads(params)
    # (flatten reads the gradients once, into its own matrix: no copy needed)
    flatten_step(name, make_method(name, k, params), params, gramian_elements)(task_grads, losses)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    return max_rel_diff(flat, fused), mutates


def step_bytes(k: int, g: int, gramian_elements: int | None) -> int:
    """Least traffic of the step (float32): see the module docstring."""
    return (k * (gramian_elements or g) + k * g + 2 * g) * 4


def estimate_extra_bytes(name: str, contender: str, k: int, g: int) -> int:
    """Peak extra memory of a contender's step plus the gradient-sized state its method keeps
    (float32): see the module docstring."""
    small = k * k + 3 * k
    elements = small if contender == "fused" else k * g + g + small
    if name == "db_mtl":
        elements += 2 * k * g if contender == "fused" else k * g
    return elements * 4


# ----------------------------------------------------------------------------------------------
# Rows


@dataclass
class Row(ContenderResults):
    method: str
    k: int
    g: int
    p: int
    threads: int
    device: str
    repeats: int
    stats: dict[str, Stats]
    bandwidth: Bandwidth
    bytes: int
    extra_bytes: dict[str, int]
    max_rel_diff: float | None = None
    mutates_input: bool = False

    @property
    def row_id(self) -> str:
        return f"{self.method}|K{self.k}|t{self.threads}"


def planned_rows(config: Config) -> int:
    return len(config.threads) * len(config.methods)


def measure_method(
    name: str, params: list[torch.Tensor], task_grads: TaskGrads, losses: torch.Tensor,
    buffers: CopyBuffers, clock: Clock, config: Config, agreement: tuple[float, bool] | None,
) -> Row:
    k, g = len(task_grads), sum(p.numel() for p in params)
    gramian_elements = gramian_columns(name, params)
    bandwidth = measure_copy_bandwidth(buffers, clock, config.repeats)
    if agreement is None:
        agreement = check_agreement(name, params, task_grads, losses, gramian_elements)
    diff, mutates = agreement
    # A step that scales its input in place would compound over the timed calls and change the
    # other contender's input: it gets a private copy (same work, same values for the first call).
    fused_grads = [[t.clone() for t in row] for row in task_grads] if mutates else task_grads
    fused_method = make_method(name, k, params)
    flatten = flatten_step(name, make_method(name, k, params), params, gramian_elements)
    reset_grads(params)
    stats = time_contenders(
        {
            "fused": lambda: fused_method.step(fused_grads, losses),
            "flatten": lambda: flatten(task_grads, losses),
        },
        clock, config.repeats, config.warmup,
    )
    del fused_grads
    return Row(
        method=name, k=k, g=g, p=len(params), threads=torch.get_num_threads(),
        device=str(params[0].device), repeats=config.repeats, stats=stats, bandwidth=bandwidth,
        bytes=step_bytes(k, g, gramian_elements),
        extra_bytes={c: estimate_extra_bytes(name, c, k, g) for c in CONTENDERS},
        max_rel_diff=diff, mutates_input=mutates,
    )


def run(config: Config, progress: Progress) -> list[Row]:
    device = torch.device(config.device)
    clock = Clock(device)
    buffers = CopyBuffers(device)
    shapes = model_shapes(config.shape_divisor)
    params = [torch.zeros(shape, device=device, requires_grad=True) for shape in shapes]
    task_grads = make_task_grads(shapes, config.tasks, device)
    losses = loss_values(config.tasks, device)
    agreements: dict[str, tuple[float, bool]] = {}
    rows: list[Row] = []
    for threads in config.threads:
        with num_threads(threads):
            for name in config.methods:
                progress.row(f"{name} K={config.tasks} t{threads}")
                row = measure_method(name, params, task_grads, losses, buffers, clock, config,
                                     agreements.get(name))
                agreements[name] = (row.max_rel_diff, row.mutates_input)
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Output

COLUMNS = (
    "method", "threads", "fused ms", "flatten ms", "flatten/fused", "bound ms",
    "fused % of bound", "MB fused", "MB flatten", "max rel diff",
)


def table_cells(row: Row) -> list[str]:
    diff = "-" if row.max_rel_diff is None else f"{row.max_rel_diff:.1e}"
    if row.max_rel_diff is not None and not row.max_rel_diff <= AGREEMENT_TOLERANCE:
        diff += " MISMATCH"
    return [
        row.method + (" *" if row.mutates_input else ""), str(row.threads),
        fmt_ms(row.median("fused")), fmt_ms(row.median("flatten")),
        fmt_ratio(row.ratio("flatten")), fmt_ms(row.bound_ms),
        fmt_percent(row.fraction_of_bound("fused")),
        fmt_mb(row.extra_bytes["fused"]), fmt_mb(row.extra_bytes["flatten"]), diff,
    ]


def report(rows: Sequence[Row]) -> None:
    if not rows:
        return
    first = rows[0]
    render_table(
        f"Weighting step (Gramian, coefficients, .grad) after the per-task backward passes, "
        f"float32, K={first.k} x {first.p} tensors (G={first.g:,}), {first.device}: median ms; "
        "MB = estimated extra memory",
        COLUMNS, [table_cells(row) for row in rows], left_columns=2,
        ends=section_ends([row.threads for row in rows]),
    )
    note = bandwidth_note(rows)
    if note:
        print(note)
    if any(row.mutates_input for row in rows):
        print("* step() modified the task gradients it was given (in place); its fused contender "
              "was timed on a private copy.")
    slower = sorted({row.method for row in rows if (row.ratio("flatten") or 2) < 1})
    if slower:
        print("Slower than flatten in some row: " + ", ".join(slower))


def records(rows: Sequence[Row]) -> list[dict]:
    out = []
    for row in rows:
        fields = {
            "sweep": NAME, "method": row.method, "tasks": row.k, "elements": row.g,
            "tensors": row.p, "threads": row.threads, "device": row.device,
            "repeats": row.repeats, "max_rel_diff": row.max_rel_diff,
            "mutates_input": row.mutates_input,
        }
        for record in row.contender_records(row.row_id, fields):
            record["extra_bytes_estimate"] = row.extra_bytes.get(record["contender"])
            out.append(record)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("weighting_step and training_step sweeps")
    group.add_argument(
        "--methods", default="all",
        help="comma-separated weighting names (fusedmtl.weighting.GRADIENT_BASED for "
        "weighting_step; LOSS_BASED too for training_step); default all",
    )


def chosen_methods(text: str, allowed: Sequence[str]) -> list[str]:
    """The --methods that ``allowed`` has ('all': every one); names of the other family are
    silently left to the sweep that has them."""
    every = (*weighting.GRADIENT_BASED, *weighting.LOSS_BASED)
    if text.strip() == "all":
        return list(allowed)
    return [name for name in parse_choices(text, every, "methods") if name in allowed]


def config_from_args(args: argparse.Namespace, common: dict) -> Config:
    return Config(
        methods=chosen_methods(args.methods, tuple(weighting.GRADIENT_BASED)), tasks=args.tasks,
        shape_divisor=args.shape_divisor, **common,
    )

