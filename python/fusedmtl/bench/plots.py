"""PNG figures of a run (``--plot DIR``), with matplotlib (imported here only).

  losses_speedup_<device>_<dtype>_<reduction>_<variant>.png  speed-up of fused over each other
      contender against N, one panel per loss, a line per (contender, threads)
  multi_tensor_<device>.png        ms per call of each op and contender, per thread count
  weighting_step_<device>.png      ms per weighting step, fused and flatten, per method
  training_step_<device>.png       ms per training step of every contender, per method
"""

from __future__ import annotations

import os
from collections.abc import Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig, directory: str, name: str) -> str:
    path = os.path.join(directory, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_losses(rows: Sequence, directory: str) -> list[str]:
    plt = _pyplot()
    paths = []
    groups: dict[tuple, list] = {}
    for row in rows:
        groups.setdefault((row.device, row.dtype, row.reduction, row.variant), []).append(row)
    for (device, dtype, reduction, variant), group in groups.items():
        losses = list(dict.fromkeys(row.loss for row in group))
        fig, axes = plt.subplots(1, len(losses), figsize=(4 * len(losses), 3.6), squeeze=False)
        for ax, loss in zip(axes[0], losses):
            mine = [row for row in group if row.loss == loss]
            others = list(dict.fromkeys(c for row in mine for c in row.stats if c != "fused"))
            for contender in others:
                for threads in sorted({row.threads for row in mine}):
                    points = sorted(
                        (row.n, row.ratio(contender)) for row in mine
                        if row.threads == threads and row.ratio(contender) is not None
                    )
                    if points:
                        ax.plot(*zip(*points), marker="o", label=f"vs {contender}, {threads}t")
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
            ax.set_xscale("log", base=2)
            ax.set_title(loss)
            ax.set_xlabel("elements N")
            ax.set_ylabel("speed-up of fused (x)")
            ax.legend(fontsize=7)
        fig.suptitle(f"forward+backward, {dtype}, reduction={reduction}, {variant}, {device}")
        paths.append(_save(fig, directory, f"losses_speedup_{device}_{dtype}_{reduction}_"
                                           f"{variant}.png".replace(":", "")))
        plt.close(fig)
    return paths


def _bars(rows: Sequence, label_of, contenders: Sequence[str], title: str, directory: str,
          name: str, horizontal: bool) -> str:
    """Grouped bars: one group per row label, one bar per contender; a panel per thread count."""
    plt = _pyplot()
    thread_counts = sorted({row.threads for row in rows})
    labels = list(dict.fromkeys(label_of(row) for row in rows))
    size = (7, 0.45 * len(labels) + 1.5) if horizontal else (1.2 * len(labels) + 3, 4)
    fig, axes = plt.subplots(1, len(thread_counts), figsize=(size[0] * len(thread_counts), size[1]),
                             squeeze=False)
    present = [c for c in contenders if any(row.median(c) is not None for row in rows)]
    width = 0.8 / max(1, len(present))
    for ax, threads in zip(axes[0], thread_counts):
        by_label = {label_of(row): row for row in rows if row.threads == threads}
        for j, contender in enumerate(present):
            positions = [i + (j - (len(present) - 1) / 2) * width for i in range(len(labels))]
            values = [
                (by_label[label].median(contender) or 0.0) if label in by_label else 0.0
                for label in labels
            ]
            (ax.barh if horizontal else ax.bar)(positions, values, width, label=contender)
        if horizontal:
            ax.set_yticks(range(len(labels)), labels)
            ax.invert_yaxis()
            ax.set_xlabel("median ms")
        else:
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
            ax.set_ylabel("median ms")
        ax.set_title(f"{threads} thread(s)")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    path = _save(fig, directory, name)
    plt.close(fig)
    return path


def plot_multi_tensor(rows: Sequence, directory: str) -> list[str]:
    if not rows:
        return []
    first = rows[0]
    return [_bars(rows, lambda row: row.op, ("fused", "foreach", "foreach_sync", "flatten"),
                  f"multi-tensor ops, K={first.k}, G={first.g:,}, {first.device}", directory,
                  f"multi_tensor_{first.device}.png".replace(":", ""), horizontal=False)]


def plot_weighting_step(rows: Sequence, directory: str) -> list[str]:
    if not rows:
        return []
    first = rows[0]
    return [_bars(rows, lambda row: row.method, ("fused", "flatten"),
                  f"weighting step, K={first.k}, G={first.g:,}, {first.device}", directory,
                  f"weighting_step_{first.device}.png".replace(":", ""), horizontal=True)]


def plot_training_step(rows: Sequence, directory: str) -> list[str]:
    if not rows:
        return []
    first = rows[0]
    return [_bars(rows, lambda row: row.method, ("fused", "plain", "torchjd", "libmtl"),
                  f"training step, K={first.k}, batch {first.batch_size}, {first.device}",
                  directory, f"training_step_{first.device}.png".replace(":", ""),
                  horizontal=True)]


PLOTTERS = {
    "losses": plot_losses, "multi_tensor": plot_multi_tensor,
    "weighting_step": plot_weighting_step, "training_step": plot_training_step,
}


def write_plots(rows_by_sweep: dict[str, list], directory: str) -> list[str]:
    """Every figure for the sweeps that ran; returns the paths written."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for sweep, rows in rows_by_sweep.items():
        if rows:
            paths += PLOTTERS[sweep](rows, directory)
    return paths
