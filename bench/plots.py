"""PNG figures of a run (``--plot DIR``, matplotlib imported here only): per sweep and device,
the median ms of every contender, a group of bars per row (threads in the label)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from bench.sweep import Row

LABEL = {
    "losses": lambda r: f"{r.loss.removesuffix('_loss')} {r.n} {r.dtype} {r.variant}",
    "multi_tensor": lambda r: r.op,
    "weighting_step": lambda r: r.method,
    "training_step": lambda r: r.method,
}


def write_plots(rows: Sequence[Row], directory: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.sweep, row.device), []).append(row)
    paths = []
    for (sweep, device), group in groups.items():
        labels = [f"{LABEL[sweep](r)} t{r.threads}" for r in group]
        contenders = list(dict.fromkeys(c for r in group for c in r.stats))
        width = 0.8 / len(contenders)
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(group) * max(1, len(contenders) / 2) + 1.5))
        for j, contender in enumerate(contenders):
            ax.barh(
                [i + (j - (len(contenders) - 1) / 2) * width for i in range(len(group))],
                [r.median(contender) or 0.0 for r in group],
                width,
                label=contender,
            )
        ax.set_yticks(range(len(group)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("median ms (log scale)")
        ax.set_title(f"{sweep}, {device}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(directory, f"{sweep}_{device}.png".replace(":", ""))
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
