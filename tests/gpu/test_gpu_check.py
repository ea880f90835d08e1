"""What `make gpu-check` runs, checked on a machine without a GPU: its kernel-launch script runs
(on the CPU kernels), its shell script parses, stops early with the names of the missing tools,
stops a stage at the deadline and says so, and on a fake GPU (a fake toolchain recording its calls)
builds and compiles for that one architecture; and the CUDA part of the suite (`-m cuda`) collects
from every layer, with the Triton backend on CUDA where Triton does not run on the CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest
import torch

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent.parent


def test_launch_kernels_runs_on_the_cpu_kernels():
    sys.path.insert(0, str(HERE))
    try:
        import launch_kernels
    finally:
        sys.path.remove(str(HERE))
    assert launch_kernels.main(["--device", "cpu", "--skip-triton", "--elements", "1031"]) == 0


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(HERE / "gpu_check.sh")], check=True)


def _collected(env: dict, *args: str) -> list[str]:
    """The test ids ``pytest --collect-only`` lists with ``env`` added to the environment."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return [line for line in run.stdout.splitlines() if "::" in line]


def test_cuda_part_of_the_suite_collects_from_every_layer():
    collected = _collected({"FUSEDMTL_TEST_DEVICES": "cpu,cuda"}, "-m", "cuda", str(ROOT / "tests"))
    for layer in ("tests/losses/", "tests/multi_tensor/", "tests/weighting/"):
        if not any(line.startswith(layer) for line in collected):
            pytest.fail(f"no CUDA test collected under {layer}")


def test_where_triton_is_compiled_the_matrix_has_triton_on_cuda_and_not_on_the_cpu():
    """As on a GPU machine, where Triton is not interpreted (TRITON_INTERPRET unset: here "0"),
    the (backend, device) pairs hold triton x cuda (skipped here) and no triton x cpu."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    ids = _collected(
        {"FUSEDMTL_TEST_DEVICES": "cpu,cuda", "TRITON_INTERPRET": "0"},
        str(ROOT / "tests" / "multi_tensor" / "test_trim.py"),
    )
    for pair in ("native-cpu", "reference-cpu", "native-cuda", "reference-cuda", "triton-cuda"):
        assert any(f"[{pair}" in i for i in ids), pair
    assert not [i for i in ids if "triton-cpu" in i]


# -- gpu_check.sh itself, without a GPU ---------------------------------------------------------

SCRIPT = HERE / "gpu_check.sh"
# What the script runs besides the tools it checks for (linked into the fake PATHs below).
SHELL_TOOLS = (
    "bash env dirname mkdir cat tee sed grep tail head tr cut sort nproc timeout find cp touch "
    "sleep rm ls"
).split()


def _fake_path(tmp_path, stubs: dict[str, str]) -> str:
    """A PATH of one directory: the shell tools above, linked, and ``stubs`` (name -> bash body)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in SHELL_TOOLS:
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return str(bin_dir)


def _gpu_check(tmp_path, path: str, script=SCRIPT, **env):
    run_env = {
        **os.environ,
        "PATH": path,
        "PYTHON": sys.executable,
        "GPU_CHECK_OUT": str(tmp_path / "out"),
        "GPU_CHECK_PREREQUISITES_ONLY": "1",  # (never a build here, even on a GPU machine)
        **env,
    }
    start = time.monotonic()
    run = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, env=run_env, timeout=120
    )
    return run, time.monotonic() - start


def test_missing_tools_stop_the_script_before_the_build_with_their_names(tmp_path):
    run, seconds = _gpu_check(tmp_path, _fake_path(tmp_path, {}))
    assert run.returncode == 2, run.stdout + run.stderr
    for line in (
        "nvcc: nvcc is not on PATH",
        "compute-sanitizer: compute-sanitizer is not on PATH",
        "cmake: cmake is not on PATH",
    ):
        assert line in run.stderr, run.stderr
    assert "nothing was built or run" in run.stderr
    out = tmp_path / "out"
    assert (out / "prerequisites.log").read_text() == run.stderr
    assert not (out / "build.log").exists()
    assert seconds < 60  # fails fast: one python probe, no build


def test_the_prerequisite_probe_names_only_what_is_missing(tmp_path):
    """With nvcc, compute-sanitizer and cmake on PATH, what is left is this python's torch: not a
    CUDA build, or no GPU (the report says which), or nothing on a GPU machine."""
    tools = {name: "exit 0" for name in ("nvcc", "compute-sanitizer", "cmake")}
    run, _ = _gpu_check(tmp_path, _fake_path(tmp_path, tools))
    assert "PATH" not in run.stderr, run.stderr
    if torch.version.cuda is None:
        expected = "not a CUDA build of torch"
    elif not torch.cuda.is_available():
        expected = "no GPU is visible to torch"
    else:
        expected = None
    if expected is None:
        assert run.returncode == 0 and "prerequisites met" in run.stdout, run.stdout + run.stderr
    else:
        assert run.returncode == 2 and expected in run.stderr, run.stdout + run.stderr
        assert len(run.stderr.strip().splitlines()) == 2, run.stderr  # the title and that line


def _source_and_run(tmp_path, commands: str) -> subprocess.CompletedProcess:
    """``commands`` in a bash that sourced gpu_check.sh (its functions, main not run)."""
    out = tmp_path / "out"
    out.mkdir()
    script = f'source "{SCRIPT}"; OUT="{out}"; BUDGET_S=8; : >"$OUT/summary.tsv"; {commands}'
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)


def _summary(tmp_path) -> dict[str, list[str]]:
    rows = (tmp_path / "out" / "summary.tsv").read_text().splitlines()
    return {row.split("\t")[0]: row.split("\t")[1:] for row in rows}


def test_a_stage_that_runs_out_of_time_says_which_limit_stopped_it(tmp_path):
    start = time.monotonic()
    run = _source_and_run(
        tmp_path,
        "DEADLINE=$((SECONDS + 8)); step slow 60 sleep 30; step late 60 true; "
        "step_until $((SECONDS + 100)) own 2 sleep 30; step_until $((SECONDS + 100)) quick 10 true",
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert time.monotonic() - start < 25  # neither sleep ran to its end
    rows = _summary(tmp_path)
    assert (
        rows["slow"][0] == "124"
        and "by the time left in the 8-second budget of gpu-check" in rows["slow"][3]
    )
    assert "ran out of time" in (tmp_path / "out" / "slow.log").read_text()
    assert rows["late"][0] == "125" and "not started" in rows["late"][3]
    assert rows["own"][0] == "124" and "its own limit of 2 s" in rows["own"][3]
    assert rows["quick"] == ["0", rows["quick"][1], "10", ""]
    assert "slow ran out of time" in run.stdout and "late: not started" in run.stdout


# A GPU as the script sees it through torch (the fake python's sitecustomize): sm_90, 140 GiB.
_FAKE_GPU = """
import types, torch
torch.version.cuda = torch.version.cuda or "13.0"
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda.get_device_capability = lambda *a: (9, 0)
torch.cuda.get_device_name = lambda *a: "fake H200"
torch.cuda.get_device_properties = lambda *a: types.SimpleNamespace(total_memory=140 << 30)
"""


def test_a_whole_run_on_a_fake_gpu_builds_and_compiles_for_its_architecture_only(tmp_path):
    """The script in a copy of its directories, with a fake toolchain that records each call: one
    architecture for nvcc (CMake's) and for the Triton resource check, the large tests on, every
    stage in the summary, the build copied in place."""
    tree = tmp_path / "tree"
    (tree / "tests" / "gpu").mkdir(parents=True)
    (tree / "python" / "fusedmtl").mkdir(parents=True)
    script = tree / "tests" / "gpu" / "gpu_check.sh"
    shutil.copy(SCRIPT, script)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_FAKE_GPU)
    calls = tmp_path / "calls.txt"
    # one line per call: the tool|FUSEDMTL_LARGE_TESTS|FUSEDMTL_CUDA_ARCHS|its arguments
    env = "${FUSEDMTL_LARGE_TESTS:-}|${FUSEDMTL_CUDA_ARCHS:-}"
    record = f'echo "${{0##*/}}|{env}|$*" >>"{calls}"'
    stubs = {
        # the real python (with the fake GPU) for the script's probes, a record for the rest
        "python": f"""{record}
case "$1 $2" in "-m pytest"|"-m bench") exit 0;; esac
[ "$1" = tests/gpu/launch_kernels.py ] && exit 0
PYTHONPATH="{site}" exec "{sys.executable}" "$@" """,
        "cmake": f"""{record}
[ "$1" = --build ] && touch build/gpu/_C.fake.so
mkdir -p build/gpu""",
        "nvcc": "echo 'Cuda compilation tools, release 13.0'",
        "compute-sanitizer": f"""{record}
shift 4; exec "$@" """,
    }
    path = _fake_path(tmp_path, stubs)
    run, _ = _gpu_check(
        tmp_path, path, script, PYTHON="python", GPU_CHECK_PREREQUISITES_ONLY="0", JOBS="3"
    )
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["passed"] and summary["arch"] == "sm_90", summary
    sanitizers = {f"sanitizer-{t}" for t in ("memcheck", "racecheck", "synccheck", "initcheck")}
    assert set(summary["steps"]) == {"build", "tests", "resources", "bench"} | sanitizers
    assert (tree / "python" / "fusedmtl" / "_C.fake.so").exists()
    calls = [line.split("|", 3) for line in calls.read_text().splitlines()]
    cmake = [args for tool, _, _, args in calls if tool == "cmake"]
    (configure,) = [args for args in cmake if args.startswith("-S")]
    assert "-DCMAKE_CUDA_ARCHITECTURES=90 " in configure, configure
    assert "-DFUSEDMTL_PTXAS_REPORT=ON" in configure, configure
    assert any(args.startswith("--build build/gpu -j 3") for args in cmake), cmake
    pytest_runs = [
        (large, archs, a) for tool, large, archs, a in calls if a.startswith("-m pytest")
    ]
    (tests,) = [run for run in pytest_runs if "-m cuda" in run[2]]
    assert tests[0] == "1", tests  # FUSEDMTL_LARGE_TESTS=1 (140 GiB)
    (resources,) = [run for run in pytest_runs if "test_gpu_resources.py" in run[2]]
    assert resources[1] == "90" and "or sm_90 " in resources[2], resources
    sanitizers = [args for tool, _, _, args in calls if tool == "compute-sanitizer"]
    assert {args.split()[1] for args in sanitizers} == {
        "memcheck",
        "racecheck",
        "synccheck",
        "initcheck",
    }
