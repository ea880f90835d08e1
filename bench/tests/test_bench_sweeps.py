"""The benchmark (bench/) end to end: every sweep at a tiny size, in-process, its JSON, tables and
figures checked for shape and sanity; no timing assertions. Runs in well under a minute."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fusedmtl.weighting as weighting
from bench import cli, peers
from bench.tables import WIDTH
from bench.training_step import REPEATS_PER_FAMILY
from bench.workload import loss_functions

SWEEPS = ("losses", "multi_tensor", "weighting_step", "training_step")


def importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


HAS_MATPLOTLIB, HAS_TORCHJD = importable("matplotlib"), importable("torchjd")
REPOSITORY = Path(__file__).resolve().parents[2]
TINY = [
    "--repeats",
    "2",
    "--warmup",
    "0",
    "--threads",
    "1",
    "--no-progress",
    "--sizes",
    "4K",
    "--losses",
    "mse_loss,smooth_l1_loss",
    "--dtypes",
    "float32",
    "--reductions",
    "mean,none",
    "--variants",
    "plain,weighted",
    "--contenders",
    "fused,eager",
    "--shape-divisor",
    "64",
    "--tasks",
    "3",
    "--batch-size",
    "4",
    "--width",
    "32",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run of every sweep: (its JSON document, the PNGs written, what it printed)."""
    directory = tmp_path_factory.mktemp("bench")
    argv = [*TINY, "--json", str(directory / "bench.json")]
    if HAS_MATPLOTLIB:
        argv += ["--plot", str(directory / "plots")]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(argv) == 0
    document = json.loads((directory / "bench.json").read_text())
    return document, sorted((directory / "plots").glob("*.png")), printed.getvalue()


def records(document: dict, sweep: str) -> list[dict]:
    return [r for r in document["records"] if r["sweep"] == sweep and "skipped" not in r]


def test_environment_and_sweeps_are_recorded(run):
    env = run[0]["environment"]
    for key in ("torch", "torchjd", "backend", "cpu_model", "loadavg", "elapsed_s"):
        assert key in env, key
    assert [entry["sweep"] for entry in run[0]["sweeps"]] == list(SWEEPS)


def test_records_have_sane_times_and_ratios(run):
    timed = [r for r in run[0]["records"] if "skipped" not in r]
    assert {r["sweep"] for r in timed} == set(SWEEPS)
    fused = {(r["sweep"], r["row_id"]): r["median_ms"] for r in timed if r["contender"] == "fused"}
    for r in timed:
        per_row = REPEATS_PER_FAMILY[r["family"]] if r["sweep"] == "training_step" else 1
        assert len(r["samples_ms"]) == 2 * per_row and all(s > 0 for s in r["samples_ms"])
        assert 0 < r["min_ms"] <= r["median_ms"] and r["iqr_ms"] >= 0
        assert math.isclose(r["ratio_to_fused"], r["median_ms"] / fused[r["sweep"], r["row_id"]])
        if r["sweep"] != "training_step":
            assert r["bound_ms"] > 0
            assert math.isclose(r["fraction_of_bound"], r["bound_ms"] / r["median_ms"])


def test_losses_rows(run):
    rows = records(run[0], "losses")
    assert {(r["loss"], r["reduction"], r["variant"]) for r in rows} == {
        (loss, red, var)
        for loss in ("mse_loss", "smooth_l1_loss")
        for red in ("mean", "none")
        for var in ("plain", "weighted")
    }
    # 'none' also writes the loss and reads grad_output: 5N elements instead of 3N
    assert {r["bytes"] for r in rows if r["reduction"] == "none"} == {5 * 4096 * 4}
    assert {r["bytes"] for r in rows if r["reduction"] == "mean"} == {3 * 4096 * 4}


def test_loss_kinds_come_from_the_library():
    import torch.nn.functional as F

    import fusedmtl

    kinds = loss_functions()
    assert {"mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss"} <= set(kinds)
    assert all(callable(getattr(fusedmtl, k)) and callable(getattr(F, k)) for k in kinds)


def test_multi_tensor_agrees_and_fused_allocates_nothing_gradient_sized(run):
    rows = records(run[0], "multi_tensor")
    assert all(r["tensors"] == 62 and r["tasks"] == 3 for r in rows)
    assert all(r["max_rel_diff_from_fused"] < 1e-3 for r in rows)
    g = rows[0]["elements"]
    for r in rows:
        if r["contender"] == "fused":  # only K-sized results: far below one gradient (G floats)
            assert r["peak_bytes"] < g
        if r["contender"] == "flatten":  # at least the K x G matrix
            assert r["peak_bytes"] >= 3 * g * 4


def test_weighting_step_covers_every_gradient_method(run):
    rows = records(run[0], "weighting_step")
    contenders = {"fused", "flatten"} | ({"torchjd"} if HAS_TORCHJD else set())
    for name in weighting.GRADIENT_BASED:
        mine = {r["contender"]: r for r in rows if r["method"] == name}
        expected = contenders if peers.has(name) else {"fused", "flatten"}
        assert set(mine) == expected, name
        assert mine["flatten"]["max_rel_diff_from_fused"] < 1e-3, name
        assert mine["flatten"]["peak_bytes"] >= 3 * mine["fused"]["elements"] * 4
        if "torchjd" in mine and name not in peers.DIFFERS:
            assert mine["torchjd"]["cosine_to_fused"] > 0.999, name


def test_training_step_covers_every_method(run):
    rows = records(run[0], "training_step")
    for name in {**weighting.GRADIENT_BASED, **weighting.LOSS_BASED}:
        mine = {r["contender"]: r for r in rows if r["method"] == name}
        assert {"fused", "plain"} <= set(mine), name
        if name in weighting.GRADIENT_BASED:
            assert mine["plain"]["max_rel_diff_from_fused"] < 1e-3, name
            # the amortized and representation variants, and the summed step, in the same row
            variants = {"r4", "r16", "sum"}
            if weighting.GRADIENT_BASED[name].representation_mode:
                variants.add("repr")
            assert variants <= set(mine), name
        else:
            assert not {"r4", "r16", "repr", "sum"} & set(mine), name
        if HAS_TORCHJD and peers.has(name):
            assert "torchjd" in mine, name
    skipped = {
        r["method"]
        for r in run[0]["records"]
        if r.get("skipped") and r["contender"] == "torchjd" and r["sweep"] == "training_step"
    }
    assert skipped == {
        m
        for m in {**weighting.GRADIENT_BASED, **weighting.LOSS_BASED}
        if not (HAS_TORCHJD and peers.has(m))
    }


def test_tables_fit_120_columns_uncut(run):
    printed = run[2]
    for title in (
        "Losses, forward+backward",
        "Multi-tensor ops",
        "Weighting step",
        "Training step",
    ):
        assert title in printed
    assert "…" not in printed  # rich cuts a cell that does not fit
    table_lines = [
        line
        for line in printed.splitlines()
        if "targets" not in line and not line.startswith("torch.compile")
    ]
    assert max(len(line) for line in table_lines) <= WIDTH
    assert not re.search(r"\d\.\dK\b", printed)  # bytes carry B/KiB/MiB, never '0.1K'
    assert re.search(r"\d+ B\b", printed)  # fused's few bytes, in bytes


@pytest.mark.skipif(not HAS_TORCHJD, reason="torchjd is not installed")
def test_tables_say_where_torchjd_is_not_expected_to_agree(run):
    notes = " ".join(run[2].split())  # the note is wrapped to the table width
    assert "cos torchjd below 1 by design: " in notes
    for method in ("pcgrad", "rlw", "stch"):
        assert f"{method} ({' '.join(peers.DIFFERS[method].split())})" in notes


def test_targets_are_read_from_the_data_file(run):
    targets = run[0]["targets"]
    assert [t["label"] for t in targets["multi_tensor/cpu"]][0].startswith("normalized_sum")
    assert all(t["status"] in ("PASS", "MISS") for t in targets["multi_tensor/cpu"])
    assert all(t["status"] == "n/a" for t in targets["losses/cpu"])  # no 64K-16M rows ran


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed")
def test_plots_are_png_files(run):
    assert {p.name for p in run[1]} == {f"{s}_cpu.png" for s in SWEEPS}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in run[1])


def test_module_entry_point_runs_from_the_checkout():
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPOSITORY,
    )
    assert result.returncode == 0, result.stderr
    assert "--sweeps" in result.stdout and "--quick" in result.stdout


def test_benchmark_is_not_in_the_package():
    pyproject = (REPOSITORY / "pyproject.toml").read_text()
    assert "fusedmtl-bench" not in pyproject
    assert not (REPOSITORY / "python" / "fusedmtl" / "bench").exists()


def test_unknown_sweep_is_an_error():
    with pytest.raises(SystemExit):
        cli.main(["--sweeps", "nope"])


def test_plain_text_tables_fit_too():
    from bench.tables import plain_table

    text = plain_table("a title " * 40, ["method", "fused ms"], [["mgda", "1.234"]])
    assert max(len(line) for line in text.splitlines()) <= WIDTH
    assert text.splitlines()[-1] == "mgda       1.234"


def test_every_registered_method_and_loss_kind_is_benchmarked():
    """The sweeps' default lists are the registries and the kinds table (a new method or kind is
    benchmarked without touching bench/)."""
    from bench import training_step, weighting_step
    from fusedmtl.losses import REGRESSION_KINDS

    def default_methods(config):
        return set(config.__dataclass_fields__["methods"].default)

    assert default_methods(weighting_step.Config) == set(weighting.GRADIENT_BASED)
    every = {**weighting.GRADIENT_BASED, **weighting.LOSS_BASED}
    assert default_methods(training_step.Config) == set(every)
    assert set(loss_functions()) == {kind.function for kind in REGRESSION_KINDS}
