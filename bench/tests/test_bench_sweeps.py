"""Smoke test of the benchmark command line (fusedmtl.bench): every sweep at a tiny size, run
in-process, its JSON and its figures checked for shape and sanity. No timing assertions."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

import fusedmtl.weighting as weighting
from fusedmtl.bench import cli

SWEEPS = ("losses", "multi_tensor", "weighting_step", "training_step")
MEMORY_BOUND = ("losses", "multi_tensor", "weighting_step")
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None

TINY = [
    "--sweeps", ",".join(SWEEPS), "--repeats", "2", "--warmup", "0", "--threads", "1",
    "--no-progress",
    # losses: two losses, two reductions, no torch.compile (compiling takes seconds per row)
    "--sizes", "4K", "--losses", "mse_loss,smooth_l1_loss", "--dtypes", "float32",
    "--reductions", "mean,none", "--variants", "plain,weighted", "--contenders", "fused,eager",
    # multi_tensor and weighting_step: ResNet-18's 62 tensors shrunk 64 times, K = 3
    "--shape-divisor", "64", "--tasks", "3",
    # training_step: a narrow trunk, a small batch
    "--batch-size", "4", "--width", "32",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run of every sweep: (its JSON document, the PNGs written, what it printed)."""
    directory = tmp_path_factory.mktemp("bench")
    json_path = directory / "bench.json"
    plots = directory / "plots"
    argv = [*TINY, "--json", str(json_path)]
    if HAS_MATPLOTLIB:
        argv += ["--plot", str(plots)]
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(argv) == 0
    document = json.loads(json_path.read_text())
    pngs = sorted(plots.glob("*.png")) if HAS_MATPLOTLIB else []
    return document, pngs, printed.getvalue()


def by_sweep(document: dict, sweep: str) -> list[dict]:
    return [record for record in document["records"] if record["sweep"] == sweep]


def test_environment_is_recorded(run):
    env = run[0]["environment"]
    for key in ("torch", "backend", "torch_default_threads", "cpu_model", "cpu_count", "gpu",
                "loadavg", "loadavg_end", "elapsed_s", "THP_MEM_ALLOC_ENABLE"):
        assert key in env, key
    assert env["backend"]["selected"]["cpu"] in ("native", "triton", "reference")
    assert len(env["loadavg"]) == 3
    assert [entry["sweep"] for entry in run[0]["sweeps"]] == list(SWEEPS)


def test_records_have_sane_times_and_ratios(run):
    records = run[0]["records"]
    assert {record["sweep"] for record in records} == set(SWEEPS)
    fused_median = {
        (r["sweep"], r["row_id"]): r["median_ms"] for r in records if r["contender"] == "fused"
    }
    for record in records:
        for key in ("row_id", "contender", "median_ms", "min_ms", "iqr_ms", "samples_ms",
                    "ratio_to_fused", "threads", "device"):
            assert key in record, (record["sweep"], key)
        assert len(record["samples_ms"]) == 2
        assert all(sample > 0 for sample in record["samples_ms"])
        assert 0 < record["min_ms"] <= record["median_ms"]
        assert record["iqr_ms"] >= 0
        fused = fused_median[record["sweep"], record["row_id"]]
        assert math.isclose(record["ratio_to_fused"], record["median_ms"] / fused, rel_tol=1e-9)
        if record["sweep"] in MEMORY_BOUND:
            assert record["bandwidth_gbs"] > 0 and record["bound_ms"] > 0 and record["bytes"] > 0
            assert math.isclose(record["fraction_of_bound"],
                                record["bound_ms"] / record["median_ms"], rel_tol=1e-9)


def test_losses_rows(run):
    records = by_sweep(run[0], "losses")
    rows = {(r["loss"], r["reduction"], r["variant"]) for r in records}
    assert rows == {(loss, reduction, variant) for loss in ("mse_loss", "smooth_l1_loss")
                    for reduction in ("mean", "none") for variant in ("plain", "weighted")}
    assert {r["contender"] for r in records} == {"fused", "eager"}
    assert all(r["n"] == 4096 and r["dtype"] == "float32" for r in records)
    # 'none' also writes the loss and reads grad_output: 5N elements instead of 3N
    assert {r["bytes"] for r in records if r["reduction"] == "none"} == {5 * 4096 * 4}
    assert {r["bytes"] for r in records if r["reduction"] == "mean"} == {3 * 4096 * 4}
    assert "losses/cpu" in run[0]["targets"]


def test_multi_tensor_rows_agree(run):
    records = by_sweep(run[0], "multi_tensor")
    assert {(r["op"], r["contender"]) for r in records} == {
        (op, c) for op in ("normalized_sum", "gramian", "combine")
        for c in ("fused", "foreach", "flatten")
    } | {("normalized_sum", "foreach_sync"), ("combine", "foreach_sync")}
    assert all(r["tensors"] == 62 and r["tasks"] == 3 for r in records)
    assert all(r["max_rel_diff_from_fused"] < 1e-3 for r in records)


def test_weighting_step_covers_every_gradient_method(run):
    records = by_sweep(run[0], "weighting_step")
    assert {(r["method"], r["contender"]) for r in records} == {
        (name, c) for name in weighting.GRADIENT_BASED for c in ("fused", "flatten")
    }
    for record in records:
        assert record["max_rel_diff"] < 1e-3, record["method"]
    extra = {(r["method"], r["contender"]): r["extra_bytes_estimate"] for r in records}
    elements = records[0]["elements"]
    for name in weighting.GRADIENT_BASED:
        # flatten holds at least the K x G matrix and G more; DB-MTL's fused step() keeps a second
        # set of its K x G averages instead of the matrix, so there only the G vector is extra
        extra_elements = elements if name == "db_mtl" else (3 + 1) * elements
        assert extra[name, "flatten"] - extra[name, "fused"] >= extra_elements * 4


def test_training_step_covers_every_method(run):
    records = by_sweep(run[0], "training_step")
    every = {*weighting.GRADIENT_BASED, *weighting.LOSS_BASED}
    assert {r["method"] for r in records} == every
    for name in every:
        assert {"fused", "plain"} <= {r["contender"] for r in records if r["method"] == name}
    for record in records:
        if record["family"] == "gradient":
            assert record["max_rel_diff"] < 1e-3, record["method"]


def test_tables_are_printed(run):
    printed = run[2]
    for title in ("Losses, forward+backward", "Multi-tensor ops", "Weighting step",
                  "Training step"):
        assert title in printed


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed")
def test_plots_are_png_files(run):
    names = {path.name for path in run[1]}
    assert any(name.startswith("losses_speedup_cpu_") for name in names)
    assert {"multi_tensor_cpu.png", "weighting_step_cpu.png", "training_step_cpu.png"} <= names
    for path in run[1]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_module_entry_point_help():
    result = subprocess.run(
        [sys.executable, "-m", "fusedmtl.bench", "--help"], capture_output=True, text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "--sweeps" in result.stdout and "--quick" in result.stdout


def test_unknown_sweep_is_an_error():
    with pytest.raises(SystemExit):
        cli.main(["--sweeps", "nope"])
