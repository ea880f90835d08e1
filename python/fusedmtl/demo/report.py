"""The demo's outputs: tables on the console (rich, or plain text without it), a PNG of the
training curves and weights (matplotlib), and a JSON of everything. rich and matplotlib are
optional and imported only here, when used."""

from __future__ import annotations

import importlib
import json
import math
import re
from pathlib import Path

import torch

from fusedmtl.demo.data import Problem
from fusedmtl.demo.train import RunResult

MAX_POINTS = 200  # per curve in the JSON


def _subsample(steps: int, points: int = MAX_POINTS) -> list[int]:
    """At most ``points`` step indices spread over 0..steps-1, always including the last."""
    if steps <= points:
        return list(range(steps))
    idx = torch.linspace(0, steps - 1, points).round().long().unique().tolist()
    return idx


def _smooth(values: torch.Tensor) -> torch.Tensor:
    """Centred rolling mean along dim 0 over about 2 % of the steps (the window shrinks at the
    ends), without the lag of an exponential average: minibatch losses and per-step weights are
    noisy."""
    n = values.shape[0]
    half = max(n // 100, 0)
    if half == 0:
        return values.clone()
    zero = torch.zeros_like(values[:1])
    csum = torch.cat([zero, values.cumsum(0)])
    idx = torch.arange(n)
    lo, hi = (idx - half).clamp_min(0), (idx + half + 1).clamp_max(n)
    shape = (n,) + (1,) * (values.dim() - 1)
    return (csum[hi] - csum[lo]) / (hi - lo).to(values).reshape(shape)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def run_record(run: RunResult, names: list[str]) -> dict:
    """One run as JSON-able data (curves subsampled)."""
    steps = run.train_losses.shape[0]
    idx = _subsample(steps)
    smoothed = _smooth(run.train_losses)
    return {
        "losses": run.losses,
        "metrics": run.metrics,
        "wall_time_s": run.wall_time,
        "ms_per_step": 1e3 * run.wall_time / max(steps, 1),
        "final_weights": dict(zip(names, run.weights[-1].tolist())),
        "weights": {
            "step": [i + 1 for i in idx],
            **{n: [_finite(v) for v in run.weights[idx, k].tolist()] for k, n in enumerate(names)},
        },
        "train_loss_smoothed": {
            "step": [i + 1 for i in idx],
            **{n: [_finite(v) for v in smoothed[idx, k].tolist()] for k, n in enumerate(names)},
        },
        "test_metrics": [{"step": step, **metrics} for step, metrics in run.evals],
        **({"extra": run.extra} if run.extra else {}),
    }


def _json_safe(tree):
    """NaN and infinities (a diverged run) as null: the file stays strict JSON."""
    if isinstance(tree, dict):
        return {k: _json_safe(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_json_safe(v) for v in tree]
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree


def write_json(results: dict, path: Path) -> None:
    path.write_text(json.dumps(_json_safe(results), indent=1, allow_nan=False) + "\n")


# -- console ------------------------------------------------------------------------------------


def missing_extras(plot: bool) -> list[str]:
    """The optional packages the demo would use that are not installed."""
    missing = []
    for name in ("rich", "matplotlib") if plot else ("rich",):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


class PlainConsole:
    """What the demo needs of rich's Console, in plain text: markup dropped, tables as columns."""

    MARKUP = re.compile(r"\[(/|/?(bold|dim|italic)( [a-z]+)*)\]")  # rich's styles, not [demo]

    def print(self, item) -> None:
        print(self.MARKUP.sub("", item) if isinstance(item, str) else item)


class PlainTable:
    """The subset of rich.table.Table the demo uses, rendered as aligned plain text."""

    def __init__(self, title: str, **_) -> None:
        self.title, self.columns, self.rows = title, [], []

    def add_column(self, header: str, **_) -> None:
        self.columns.append(header.replace("\n", " "))

    def add_row(self, *cells: str) -> None:
        best = re.compile(r"\[bold green\](.*?)\[/\]")  # the best value: green in rich, * here
        self.rows.append([PlainConsole.MARKUP.sub("", best.sub(r"\1*", c)) for c in cells])

    def __str__(self) -> str:
        lines = [self.columns, *self.rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(self.columns))]
        title = self.title.replace("(best in green)", "(best marked *)")
        return "\n".join(
            [title]
            + [
                "  ".join(
                    c.ljust(w) if i == 0 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(line, widths))
                )
                for line in lines
            ]
        )


def make_console():
    """rich's Console (120 columns when the output is not a terminal), else a PlainConsole."""
    try:
        from rich.console import Console
    except ImportError:
        return PlainConsole()
    console = Console()
    return console if console.is_terminal else Console(width=120)


def _metric_columns(problem: Problem) -> list[tuple[str, str, bool]]:
    """(task, metric, higher is better) for every task's metrics, in table order."""
    cols = []
    for task in problem.tasks:
        if task.kind == "classification":
            cols.append((task.name, "accuracy", True))
        else:
            cols += [(task.name, "rmse", False), (task.name, "mae", False)]
    return cols


def _fmt(value: float, metric: str) -> str:
    if metric == "accuracy":
        return f"{100 * value:.1f}%"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"


def _metrics_table(
    title: str, rows: dict[str, RunResult], problem: Problem, label: str, weights: bool
):
    try:
        from rich.table import Table
    except ImportError:
        Table = PlainTable

    cols = _metric_columns(problem)
    table = Table(title=title, title_justify="left")
    table.add_column(label, style="bold", no_wrap=True)
    for task, metric, higher in cols:
        table.add_column(
            f"{task}\n{'acc' if metric == 'accuracy' else metric.upper()} {'↑' if higher else '↓'}",
            justify="right",
            no_wrap=True,
        )
    table.add_column("wall\ns", justify="right", no_wrap=True)
    table.add_column("ms/\nstep", justify="right", no_wrap=True)
    if weights:
        table.add_column(
            "final weights\n" + " ".join(problem.task_names), justify="right", no_wrap=True
        )
    best = {}
    for task, metric, higher in cols:
        values = [run.metrics[task][metric] for run in rows.values()]
        best[task, metric] = max(values) if higher else min(values)
    for key, run in rows.items():
        cells = []
        for task, metric, _ in cols:
            value = run.metrics[task][metric]
            text = _fmt(value, metric)
            cells.append(
                f"[bold green]{text}[/]" if value == best[task, metric] and len(rows) > 1 else text
            )
        steps = max(run.train_losses.shape[0], 1)
        cells += [f"{run.wall_time:.1f}", f"{1e3 * run.wall_time / steps:.2f}"]
        if weights:
            cells.append(" ".join(f"{w:.2g}" for w in run.weights[-1].tolist()))
        table.add_row(key, *cells)
    return table


def print_tables(
    console,
    runs: dict[str, RunResult],
    comparison: dict[str, RunResult],
    compare_method: str,
    compare_task: str,
    problem: Problem,
) -> None:
    """The method comparison and the outlier-task loss comparison."""
    console.print(
        _metrics_table(
            "Weighting methods: test metrics on clean labels (best in green)",
            runs,
            problem,
            "method",
            weights=True,
        )
    )
    if comparison:
        console.print(
            _metrics_table(
                f"The {compare_task} task's loss under {compare_method}: L2 vs robust",
                comparison,
                problem,
                f"{compare_task} loss",
                weights=False,
            )
        )
        robust = {k: r.metrics[compare_task]["mae"] for k, r in comparison.items()}
        if "mse" in robust and len(robust) > 1:
            best = min((k for k in robust if k != "mse"), key=robust.get)
            console.print(
                f"{compare_task} clean-test MAE: L2 {robust['mse']:.3g}, {best} {robust[best]:.3g} "
                f"({robust['mse'] / robust[best]:.1f}x lower): the glitches pull the L2 fit "
                "(a mean) up, the median-like robust fits barely move."
            )


# -- plot -----------------------------------------------------------------------------------------


def write_plot(
    runs: dict[str, RunResult],
    comparison: dict[str, RunResult],
    compare_method: str,
    compare_task: str,
    problem: Problem,
    path: Path,
) -> None:
    """Row 1: each task's training loss (rolling mean) per method; row 2: each task's test
    metric over training (plus the loss-comparison runs, dashed, in the outlier task's panel);
    then one panel per method with the weights it chose at every step."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = problem.task_names
    k = len(names)
    ncols = max(k, 3)
    weight_rows = math.ceil(len(runs) / ncols)
    fig, axes = plt.subplots(
        2 + weight_rows,
        ncols,
        figsize=(4.6 * ncols, 3.3 * (2 + weight_rows)),
        squeeze=False,
        layout="constrained",
    )
    palette = plt.cm.tab10 if len(runs) <= 10 else plt.cm.tab20
    colors = {m: palette(i % palette.N) for i, m in enumerate(runs)}
    task_colors = [plt.cm.Set1(i % 9) for i in range(k)]
    metric_of = {
        t.name: (
            "accuracy"
            if t.kind == "classification"
            else ("mae" if t.name == compare_task else "rmse")
        )
        for t in problem.tasks
    }

    for j, name in enumerate(names):
        ax = axes[0, j]
        for method, run in runs.items():
            steps = run.train_losses.shape[0]
            smoothed = _smooth(run.train_losses[:, j])
            ax.plot(
                range(1, steps + 1), smoothed.numpy(), color=colors[method], label=method, lw=1.2
            )
        ax.set_yscale("log")
        ax.set_title(
            f"{name}: training loss ({runs[next(iter(runs))].losses[name]}, rolling mean)",
            fontsize=9,
        )
        ax.set_xlabel("step", fontsize=8)
        ax = axes[1, j]
        metric = metric_of[name]
        for method, run in runs.items():
            ax.plot(
                [s for s, _ in run.evals],
                [m[name][metric] for _, m in run.evals],
                color=colors[method],
                lw=1.2,
            )
        if name == compare_task:
            for loss, run in comparison.items():
                if run is runs.get(compare_method):  # the same run as the solid line
                    continue
                ax.plot(
                    [s for s, _ in run.evals],
                    [m[name][metric] for _, m in run.evals],
                    ls="--",
                    lw=1.2,
                    label=f"{compare_method}, {name} trained with {loss}",
                )
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
        if metric != "accuracy":
            ax.set_yscale("log")
        ax.set_title(
            f"{name}: test {metric.upper() if metric != 'accuracy' else metric} (clean labels)",
            fontsize=9,
        )
        ax.set_xlabel("step", fontsize=8)
    axes[0, 0].legend(fontsize=6 if len(runs) <= 6 else 5, ncol=1 if len(runs) <= 6 else 2)
    for j in range(k, ncols):
        axes[0, j].axis("off")
        axes[1, j].axis("off")

    for i, (method, run) in enumerate(runs.items()):
        ax = axes[2 + i // ncols, i % ncols]
        w = run.weights.numpy()
        steps = range(1, w.shape[0] + 1)
        noisy = w.shape[0] > 50 and bool((run.weights.diff(dim=0).abs().nan_to_num() > 0).any())
        smoothed = _smooth(run.weights).numpy()
        for j, name in enumerate(names):
            if noisy:  # per-step weights, faint, under their rolling mean
                ax.plot(steps, w[:, j], color=task_colors[j], lw=0.5, alpha=0.3)
                ax.plot(steps, smoothed[:, j], color=task_colors[j], label=name, lw=1.4)
            else:
                ax.plot(steps, w[:, j], color=task_colors[j], label=name, lw=1.2)
        finite = w[~torch.isnan(run.weights).numpy()]
        if finite.size and (finite > 0).all():
            ax.set_yscale("log")
        elif finite.size:
            ax.set_yscale("symlog", linthresh=1e-3)
        same = bool((run.weights == run.weights[:, :1]).all())
        ax.set_title(
            f"{method}: weights chosen (last_weights{', equal for all tasks' if same else ''})",
            fontsize=9,
        )
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7)
    for i in range(len(runs), weight_rows * ncols):
        axes[2 + i // ncols, i % ncols].axis("off")
    for ax in axes.flat:
        ax.tick_params(labelsize=7)
    fig.suptitle(
        "fusedmtl demo: " + ", ".join(f"{t.name} ({t.description})" for t in problem.tasks),
        fontsize=9,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
