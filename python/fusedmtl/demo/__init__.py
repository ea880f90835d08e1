"""``python -m fusedmtl.demo`` (console script ``fusedmtl-demo``): multi-task weighting methods
compared on a generated problem with a known ground truth.

A shared-trunk MLP learns three tasks of very different scale and noise at once (see
:mod:`fusedmtl.demo.data`): ``energy``, a regression with labels of standard deviation ~60
(L2 loss ~4000 at the start);
``sensor``, a unit-scale regression whose training labels carry heavy-tailed one-sided glitches
(trained with fusedmtl.smooth_l1_loss); ``class``, a 4-class classification with label noise.
Every method in ``--methods`` trains the same initialisation on the same batches; the demo prints
per-task test metrics (RMSE / MAE / accuracy on clean labels) and wall times, then trains the
``sensor`` task with L2, L1 and smooth-L1 under one weighting to show what the robust losses buy.
It writes ``fusedmtl_demo.png`` (loss curves, test metrics, the weights each method chose) and
``fusedmtl_demo.json`` (metrics, wall times, config, subsampled curves and weights) to ``--out``.

Runs are deterministic for a given ``--seed``: data, initialisation and batch order are seeded,
torch runs single-threaded (``--threads``) with deterministic algorithms.

    python -m fusedmtl.demo --quick --out /tmp/demo
    python -m fusedmtl.demo --methods fixed,dwa,famo,pcgrad,nash_mtl --steps 2000
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time
from pathlib import Path

__all__ = ["main", "run"]

JSON_NAME, PNG_NAME = "fusedmtl_demo.json", "fusedmtl_demo.png"
QUICK = {"steps": 600, "n_train": 2048, "n_test": 2048, "eval_every": 50}
OUTLIER_TASK = "sensor"


def run(
    config, out: Path | str = ".", progress: bool = True, plot: bool = True, console=None
) -> dict:
    """Runs the demo for a :class:`fusedmtl.demo.train.Config`; writes the JSON (and PNG) into
    ``out`` and returns the JSON's content."""
    import torch

    import fusedmtl
    from fusedmtl.demo import report
    from fusedmtl.demo.data import make_problem
    from fusedmtl.demo.train import all_methods, deterministic, is_method, train_method

    unknown = [m for m in (*config.methods, config.compare_method) if not is_method(m)]
    if unknown:
        raise ValueError(
            f"unknown weighting method(s) {unknown}; choose from {sorted(all_methods())}"
        )
    if console is None:
        console = report.make_console()
    missing = report.missing_extras(plot)
    if missing:
        console.print(
            f"({' and '.join(missing)} not installed: plain-text tables"
            f"{', no figure' if 'matplotlib' in missing else ''}; "
            "pip install 'fusedmtl[demo]' (rich, matplotlib) for both)"
        )
        plot = plot and "matplotlib" not in missing
        progress = progress and "rich" not in missing
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    problem = make_problem(n_train=config.n_train, n_test=config.n_test, seed=config.seed)
    names = problem.task_names
    default_loss = {t.name: t.loss for t in problem.tasks}[OUTLIER_TASK]
    # The loss comparison reuses the main run of compare_method for the task's default loss.
    jobs = [(m, None) for m in config.methods]
    jobs += [
        (config.compare_method, loss)
        for loss in config.compare_losses
        if not (loss == default_loss and config.compare_method in config.methods)
    ]

    runs, comparison = {}, {}
    with deterministic(config.threads), _progress(console, progress) as bar:
        for method, loss in jobs:
            label = method if loss is None else f"{method} + {OUTLIER_TASK}:{loss}"
            task = bar.add_task(label, total=config.steps, status="") if bar is not None else None

            def on_step(step, losses, task=task):
                if bar is not None:
                    status = "  ".join(f"{n} {v:.3g}" for n, v in losses.items())
                    bar.update(task, completed=step, status=status)

            result = train_method(
                method,
                problem,
                config,
                losses={OUTLIER_TASK: loss} if loss else None,
                on_step=on_step,
            )
            if loss is None:
                runs[method] = result
            else:
                comparison[loss] = result
    if config.compare_method in runs and default_loss in config.compare_losses:
        comparison[default_loss] = runs[config.compare_method]
    comparison = {loss: comparison[loss] for loss in config.compare_losses if loss in comparison}

    report.print_tables(console, runs, comparison, config.compare_method, OUTLIER_TASK, problem)
    results = {
        "config": dataclasses.asdict(config),
        "problem": {
            **problem.info,
            "tasks": [dataclasses.asdict(t) for t in problem.tasks],
            "description": sys.modules["fusedmtl.demo.data"].__doc__,
        },
        "environment": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "fusedmtl": fusedmtl.__version__,
            "backend": fusedmtl.backend.info().get("selected"),
            "threads": config.threads,
        },
        "methods": {m: report.run_record(r, names) for m, r in runs.items()},
        "loss_comparison": {
            "task": OUTLIER_TASK,
            "method": config.compare_method,
            "runs": {loss: report.run_record(r, names) for loss, r in comparison.items()},
        },
    }
    json_path = out / JSON_NAME
    if plot:
        png_path = out / PNG_NAME
        report.write_plot(runs, comparison, config.compare_method, OUTLIER_TASK, problem, png_path)
        results["png"] = str(png_path)
    results["total_time_s"] = time.perf_counter() - started
    report.write_json(results, json_path)
    console.print(
        f"wrote {json_path}"
        + (f" and {out / PNG_NAME}" if plot else "")
        + f" in {results['total_time_s']:.1f} s"
    )
    return results


class _NoBar:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _progress(console, enabled: bool):
    if not enabled:
        return _NoBar()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold blue]{task.description:<34}"),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("[dim]{task.fields[status]}"),
        console=console,
    )


def _parser() -> argparse.ArgumentParser:
    from fusedmtl.demo.train import DEFAULT_METHODS, REGRESSION_LOSSES, Config

    d = Config()
    p = argparse.ArgumentParser(
        prog="fusedmtl-demo",
        description="Compare fusedmtl multi-task weighting methods on a generated problem with a "
        "known ground truth.",
    )
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma-separated registry names (fusedmtl.weighting.LOSS_BASED / GRADIENT_BASED), "
        "a gradient-based name with '@n' for refresh_every=n (e.g. mgda@16), or 'all' "
        f"(default: {','.join(DEFAULT_METHODS)})",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a small run (under a minute): {QUICK['steps']} steps, {QUICK['n_train']} "
        "training samples",
    )
    p.add_argument(
        "--steps",
        type=int,
        help=f"training steps per method (default {d.steps}, --quick {QUICK['steps']})",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="seed of the data, the initialisation and the batch order",
    )
    p.add_argument(
        "--out",
        default=".",
        help="directory of fusedmtl_demo.png and fusedmtl_demo.json (default: .)",
    )
    p.add_argument(
        "--n-train",
        type=int,
        help=f"training samples (default {d.n_train}, --quick {QUICK['n_train']})",
    )
    p.add_argument(
        "--n-test", type=int, help=f"test samples (default {d.n_test}, --quick {QUICK['n_test']})"
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    p.add_argument(
        "--compare-method",
        default=d.compare_method,
        help=f"the weighting of the {OUTLIER_TASK} loss comparison (default {d.compare_method})",
    )
    p.add_argument(
        "--compare-losses",
        default=",".join(d.compare_losses),
        help=f"{OUTLIER_TASK} losses to compare, from {','.join(REGRESSION_LOSSES)} ('' skips "
        "the comparison)",
    )
    p.add_argument(
        "--beta", type=float, default=d.beta, help=f"smooth-L1 beta of the {OUTLIER_TASK} task"
    )
    p.add_argument(
        "--threads", type=int, default=d.threads, help="torch threads (fixed, for reproducibility)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return p


def config_from_args(args: argparse.Namespace):
    from fusedmtl.demo.train import REGRESSION_LOSSES, Config, all_methods, is_method

    d = Config()
    quick = QUICK if args.quick else {}
    methods = (
        tuple(sorted(all_methods()))
        if args.methods.strip() == "all"
        else tuple(m.strip() for m in args.methods.split(",") if m.strip())
    )
    losses = tuple(x.strip() for x in args.compare_losses.split(",") if x.strip())
    bad = [m for m in (*methods, args.compare_method) if not is_method(m)]
    if bad or not methods:
        raise ValueError(
            f"unknown weighting method(s) {bad or '(none given)'}; choose from "
            f"{', '.join(sorted(all_methods()))}"
        )
    if any(x not in REGRESSION_LOSSES for x in losses):
        raise ValueError(f"--compare-losses must be from {REGRESSION_LOSSES}, got {losses}")
    steps = args.steps if args.steps is not None else quick.get("steps", d.steps)
    if steps < 1:
        raise ValueError("--steps must be at least 1")
    return Config(
        seed=args.seed,
        steps=steps,
        n_train=args.n_train or quick.get("n_train", d.n_train),
        n_test=args.n_test or quick.get("n_test", d.n_test),
        batch_size=args.batch_size,
        lr=args.lr,
        beta=args.beta,
        methods=methods,
        compare_losses=losses,
        compare_method=args.compare_method,
        eval_every=max(1, min(quick.get("eval_every", d.eval_every), steps // 10 or 1)),
        threads=args.threads,
        quick=args.quick,
    )


def main(argv: list[str] | None = None) -> int:
    """The console script: parses ``argv`` (default sys.argv[1:]), runs, returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    run(config, args.out, progress=not args.no_progress, plot=not args.no_plot)
    return 0
