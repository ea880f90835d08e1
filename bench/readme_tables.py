"""The README's measured tables, generated from a recorded run, so that a table cannot drift from
the run it reports.

    python -m bench --json bench.json && python -m fusedmtl.demo --out demo/
    python -m bench.readme_tables bench.json --demo demo/fusedmtl_demo.json > tables.md

One markdown table per sweep (1 thread where a sweep ran several; the losses at float32,
reduction 'mean', ``loss.backward()``), and the demo's method comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from bench.tables import fmt_bytes, fmt_ms, fmt_percent, fmt_ratio, fmt_size


def markdown(columns: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    return "\n".join(
        [
            "| " + " | ".join(columns) + " |",
            "|" + "---|" * len(columns),
            *("| " + " | ".join(line) + " |" for line in lines),
        ]
    )


def rows_of(document: dict, sweep: str, **where) -> list[dict[str, dict]]:
    """The rows of a sweep matching ``where``, in run order: contender -> its record."""
    rows: dict[str, dict[str, dict]] = {}
    for record in document["records"]:
        if (
            record["sweep"] == sweep
            and "skipped" not in record
            and all(record.get(k) == v for k, v in where.items())
        ):
            rows.setdefault(record["row_id"], {})[record["contender"]] = record
    return list(rows.values())


def ms(row: dict, contender: str) -> str:
    return fmt_ms(row[contender]["median_ms"]) if contender in row else "-"


def ratio(row: dict, contender: str) -> str:
    return fmt_ratio(row[contender]["ratio_to_fused"]) if contender in row else "-"


def peak(row: dict, contender: str) -> str:
    return fmt_bytes(row[contender]["peak_bytes"]) if contender in row else "-"


def cosine(row: dict, contender: str) -> str:
    value = row.get(contender, {}).get("cosine_to_fused")
    return "-" if value is None else f"{value:.4f}"


# A table is a list of columns, each its header and the function that gives its cell of a row
# (contender -> record): the pieces below are the columns the sweeps' tables share.
Column = tuple[str, Callable[[dict], str]]


def table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    return markdown([name for name, _ in columns], [[cell(r) for _, cell in columns] for r in rows])


def field(name: str, header: str | None = None) -> Column:
    """The fused record's ``name``, as it is."""
    return (header or name, lambda r: str(r["fused"][name]))


def times(names: Sequence[str]) -> list[Column]:
    return [(f"{n} ms", lambda r, n=n: ms(r, n)) for n in names]


def ratios(names: Sequence[str]) -> list[Column]:
    return [(f"vs {n}", lambda r, n=n: ratio(r, n)) for n in names]


def peaks(names: Sequence[str]) -> Column:
    return (
        f"peak extra memory ({' / '.join(names)})",
        lambda r: " / ".join(peak(r, n) for n in names),
    )


BOUND: Column = ("% of bound", lambda r: fmt_percent(r["fused"]["fraction_of_bound"]))
COSINE_TORCHJD: Column = ("cosine torchjd", lambda r: cosine(r, "torchjd"))


def losses_table(document: dict) -> str:
    rows = rows_of(
        document, "losses", threads=1, dtype="float32", reduction="mean", variant="plain"
    )
    return table(
        rows,
        [
            ("loss", lambda r: r["fused"]["loss"].removesuffix("_loss")),
            ("N", lambda r: fmt_size(r["fused"]["n"])),
            *times(("fused", "eager", "compile")),
            *ratios(("eager", "compile")),
            BOUND,
        ],
    )


def multi_tensor_table(document: dict) -> str:
    names = ("fused", "foreach", "foreach_sync", "flatten")
    return table(
        rows_of(document, "multi_tensor"),
        [
            field("op"),
            field("threads"),
            *times(names),
            *ratios(names[1:]),
            BOUND,
            peaks(("fused", "foreach", "flatten")),
        ],
    )


def weighting_step_table(document: dict) -> str:
    names = ("fused", "flatten", "torchjd")
    return table(
        rows_of(document, "weighting_step", threads=1),
        [field("method"), *times(names), *ratios(names[1:]), BOUND, peaks(names), COSINE_TORCHJD],
    )


def r16_over_sum(row: dict) -> str:
    """What refresh_every=16 costs over a plain summed step (bench/targets.json: 1.25x at most)."""
    if "r16" not in row or "sum" not in row:
        return "-"
    return fmt_ratio(row["r16"]["median_ms"] / row["sum"]["median_ms"])


def training_step_table(document: dict) -> str:
    return table(
        rows_of(document, "training_step", threads=1),
        [
            field("method"),
            field("family", "kind"),
            *times(("fused", "r16", "repr", "sum", "plain", "torchjd")),
            *ratios(("plain", "torchjd")),
            ("r16 / sum", r16_over_sum),
            peaks(("fused", "torchjd")),
            COSINE_TORCHJD,
        ],
    )


def demo_table(demo: dict) -> str:
    """The demo's method comparison: each task's test metric and the time per step."""
    tasks = demo["problem"]["tasks"]
    columns = ["method"]
    for task in tasks:
        metric = (
            "accuracy"
            if task["kind"] == "classification"
            else ("mae" if task["name"] == demo["loss_comparison"]["task"] else "rmse")
        )
        columns.append(f"{task['name']} {metric if metric == 'accuracy' else metric.upper()}")
    lines = []
    for method, run in demo["methods"].items():
        cells = [method]
        for task, column in zip(tasks, columns[1:]):
            metric = column.split()[-1].lower()
            value = run["metrics"][task["name"]][metric]
            cells.append(f"{100 * value:.1f}%" if metric == "accuracy" else f"{value:.3g}")
        lines.append([*cells, f"{run['ms_per_step']:.2f}"])
    return markdown([*columns, "ms/step"], lines)


SECTIONS = {
    "losses": losses_table,
    "multi_tensor": multi_tensor_table,
    "weighting_step": weighting_step_table,
    "training_step": training_step_table,
}


def generate(document: dict, demo: dict | None = None) -> str:
    """Every table the run has (and the demo's, if given) under a line naming the date and the
    machine."""
    env = document["environment"]
    parts = [
        f"Measured {env['date']} at commit {env.get('commit') or 'unknown'} "
        f"(`{' '.join(env['argv'][1:]) or 'python -m bench'}`), "
        f"{env['cpu_model']} x{env['cpu_count']}, torch {env['torch']}, torchjd "
        f"{env.get('torchjd') or 'not installed'}, load {env['loadavg'][0]:.2f}."
    ]
    ran = {record["sweep"] for record in document["records"]}
    for sweep, table in SECTIONS.items():
        if sweep in ran:
            parts.append(f"#### {sweep}\n\n{table(document)}")
    if demo is not None:
        parts.append(f"#### demo ({demo['config']['steps']} steps)\n\n{demo_table(demo)}")
    return "\n\n".join(parts) + "\n"


def generate_sections(document: dict, demo: dict | None = None) -> dict[str, str]:
    """The README's generated sections: 'bench' (every sweep's table) and 'demo'."""
    sections = {"bench": generate(document)}
    if demo is not None:
        sections["demo"] = (
            f"{demo['config']['steps']} steps, measured "
            f"{demo['environment'].get('date', 'on an undated run')[:10]}:\n\n{demo_table(demo)}\n"
        )
    return sections


def splice(readme: str, sections: dict[str, str]) -> str:
    """``readme`` with the text between ``<!-- generated:NAME ... -->`` and
    ``<!-- end generated:NAME -->`` replaced by ``sections[NAME]``, for each name given."""
    for name, text in sections.items():
        begin = readme.index(f"<!-- generated:{name}")
        begin = readme.index("-->", begin) + len("-->\n")
        end = readme.index(f"<!-- end generated:{name} -->", begin)
        readme = readme[:begin] + text + readme[end:]
    return readme


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.readme_tables", description=__doc__)
    p.add_argument("bench_json", help="a run's --json output")
    p.add_argument("--demo", metavar="JSON", help="the demo's fusedmtl_demo.json")
    p.add_argument("--out", help="write here instead of stdout")
    p.add_argument(
        "--readme",
        metavar="MD",
        help="rewrite the generated sections of this file (README.md) in place",
    )
    args = p.parse_args(argv)
    with open(args.bench_json) as file:
        document = json.load(file)
    demo = None
    if args.demo:
        with open(args.demo) as file:
            demo = json.load(file)
    if args.readme:
        with open(args.readme) as file:
            readme = file.read()
        with open(args.readme, "w") as file:
            file.write(splice(readme, generate_sections(document, demo)))
        return 0
    text = generate(document, demo)
    if args.out:
        with open(args.out, "w") as out:
            out.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
