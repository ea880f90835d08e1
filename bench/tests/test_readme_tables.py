"""bench/readme_tables.py on a tiny recorded run (bench/tests/data/): the README's tables are
generated from the JSON, every row and number of the run appears, nothing else."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import readme_tables

DATA = Path(__file__).with_name("data")
REPOSITORY = Path(__file__).resolve().parents[2]


def test_tables_hold_the_recorded_numbers():
    document = json.loads((DATA / "bench_tiny.json").read_text())
    demo = json.loads((DATA / "demo_tiny.json").read_text())
    text = readme_tables.generate(document, demo)
    assert [line for line in text.splitlines() if line.startswith("#### ")] == [
        "#### losses",
        "#### multi_tensor",
        "#### weighting_step",
        "#### training_step",
        "#### demo (20 steps)",
    ]
    tables = [block for block in text.split("\n\n") if block.startswith("|")]
    for table in tables:  # well-formed markdown: one cell count per table
        assert len({line.count("|") for line in table.splitlines()}) == 1
    fused = [
        r
        for r in document["records"]
        if r.get("contender") == "fused"
        and r.get("threads") == 1
        and r.get("variant", "plain") == "plain"
        and r.get("reduction", "mean") == "mean"
    ]
    for record in fused:  # every fused median of the run is in a table, formatted as the bench
        assert f"| {readme_tables.fmt_ms(record['median_ms'])} |" in text, record["row_id"]
    for method, run in demo["methods"].items():
        assert f"| {method} |" in text and f"{run['ms_per_step']:.2f}" in text
    rows = sum(len(t.splitlines()) - 2 for t in tables)
    expected = len({(r["sweep"], r["row_id"]) for r in fused}) + len(demo["methods"])
    assert rows == expected


def test_command_line_writes_the_file(tmp_path):
    out = tmp_path / "tables.md"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.readme_tables",
            str(DATA / "bench_tiny.json"),
            "--demo",
            str(DATA / "demo_tiny.json"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPOSITORY,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_text().count("#### ") == 5


def test_readme_tables_are_those_of_the_recorded_run():
    """The README's generated sections are exactly what the recorded run gives (regenerate them
    with `python -m bench.readme_tables bench/results/<run>.json --demo <demo>.json --readme
    README.md` after recording a run)."""
    results = REPOSITORY / "bench" / "results"
    runs = sorted(results.glob("*-quick.json")) + sorted(results.glob("*-full.json"))
    document = json.loads(runs[-1].read_text())
    demos = sorted(results.glob("*-demo.json"))
    demo = json.loads(demos[-1].read_text()) if demos else None
    readme = (REPOSITORY / "README.md").read_text()
    assert readme_tables.splice(readme, readme_tables.generate_sections(document, demo)) == readme
