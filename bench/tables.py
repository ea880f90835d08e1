"""Tables and progress: cells a person reads (ms, ratios, bytes with their unit), at most
``WIDTH`` columns, with rich when it is installed and as plain text otherwise."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Sequence

from bench import peers

WIDTH = 120  # every table fits a terminal this wide


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else (f"{value:.3f}" if value < 10 else f"{value:.1f}")


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def fmt_percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def fmt_bytes(value: int | None) -> str:
    """Bytes with a binary unit: '0', '112 B', '1.5 KiB', '44.6 MiB', '1.2 GiB'."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value} B"


def fmt_size(n: int) -> str:
    """An element count: 64K, 1M, 16M (K = 1024), else the number."""
    for unit, scale in (("M", 2**20), ("K", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def fmt_agreement(cosine: float | None) -> str:
    """The cosine between a contender's update and fused's, to 4 places below 1."""
    return "-" if cosine is None else f"{cosine:.4f}"


def drop_empty_columns(columns: Sequence[str], cells: list[list[str]], keep_first: int):
    """Removes the columns after the first ``keep_first`` whose cells are all '-' (a contender
    that did not run on this device or was not installed)."""
    keep = [
        i for i in range(len(columns)) if i < keep_first or any(line[i] != "-" for line in cells)
    ]
    return [columns[i] for i in keep], [[line[i] for i in keep] for line in cells]


def plain_table(
    title: str, columns: Sequence[str], cells: Sequence[Sequence[str]], left_columns: int = 1
) -> str:
    """The table as plain text: left-aligned labels, right-aligned numbers, two spaces apart."""
    widths = [max(len(c) for c in column) for column in zip(columns, *cells)]
    lines = textwrap.wrap(title, WIDTH)
    for line in [list(columns), *cells]:
        parts = [
            c.ljust(w) if i < left_columns else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths))
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def render_table(
    title: str,
    columns: Sequence[str],
    cells: Sequence[Sequence[str]],
    left_columns: int = 1,
    file=None,
) -> None:
    """Prints a table with rich (a header rule, no side borders) or as plain text; the title wraps
    to ``WIDTH``, the rows are never cut."""
    file = file or sys.stdout
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(plain_table(title, columns, cells, left_columns), file=file)
        return
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i < left_columns else "right", no_wrap=True)
    for line in cells:
        table.add_row(*line)
    Console(file=file, width=WIDTH, soft_wrap=False).print(table)


class Progress:
    """A rich progress bar on stderr (one line per row without rich)."""

    def __init__(self, enabled: bool = True):
        self._bar, self._task, self._enabled = None, None, enabled

    def __enter__(self) -> Progress:
        if self._enabled:
            try:
                from rich.console import Console
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    TextColumn,
                    TimeElapsedColumn,
                )
                from rich.progress import Progress as RichProgress
            except ImportError:
                pass
            else:
                self._bar = RichProgress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    console=Console(stderr=True),
                    transient=True,
                )
                self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def start(self, sweep: str, total: int) -> None:
        if self._bar is not None:
            if self._task is not None:
                self._bar.remove_task(self._task)
            self._task = self._bar.add_task(sweep, total=total)
        self._sweep, self._done, self._total = sweep, 0, total

    def row(self, description: str) -> None:
        """Called before each row: shows what is being measured."""
        if self._bar is not None:
            self._bar.update(
                self._task, completed=self._done, description=f"{self._sweep}: {description}"
            )
        elif self._enabled:
            print(
                f"[{self._sweep} {self._done + 1}/{self._total}] {description}",
                file=sys.stderr,
                flush=True,
            )
        self._done += 1


def memory_and_agreement_table(sweep: str, names, rows) -> None:
    """One line per method: each contender's peak extra memory, the cosine of its update with
    fused's and the largest relative difference; then why a peer did not run, and where torchjd's
    update is not expected to agree."""
    once = list({r.method: r for r in rows}.values())
    others = [n for n in names if n != "fused"]
    columns, cells = drop_empty_columns(
        [
            "method",
            *(f"mem {n}" for n in names),
            *(f"cos {n}" for n in others),
            *(f"diff {n}" for n in others),
        ],
        [
            [
                r.method,
                *(fmt_bytes(r.peak_bytes.get(n)) for n in names),
                *(fmt_agreement(r.cosine.get(n)) for n in others),
                *(
                    "-" if r.max_rel_diff.get(n) is None else f"{r.max_rel_diff[n]:.1e}"
                    for n in others
                ),
            ]
            for r in once
        ],
        keep_first=1,
    )
    render_table(
        f"{sweep}: peak extra memory of one step; cos = cosine of a contender's .grad "
        "with fused's, diff = its largest difference / fused's largest magnitude",
        columns,
        cells,
        left_columns=1,
    )
    lacking = {
        contender: sorted(
            r.method for r in once if r.notes.get(contender, "").startswith(f"{contender} has no")
        )
        for contender in names
    }
    other = sorted({note for r in once for note in r.notes.values() if " has no " not in note})
    differs = [
        f"{m} ({peers.DIFFERS[m]})" for m in sorted({r.method for r in once} & set(peers.DIFFERS))
    ]
    notes = [f"{c} has no {', '.join(methods)}" for c, methods in lacking.items() if methods]
    notes += ["not run: " + "; ".join(other)] if other else []
    notes += (
        ["cos torchjd below 1 by design: " + "; ".join(differs)]
        if differs and "torchjd" in others
        else []
    )
    for note in notes:
        print(textwrap.fill(note, WIDTH, subsequent_indent="  "))
