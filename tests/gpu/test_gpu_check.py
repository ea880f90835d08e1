"""What `make gpu-check` runs, checked on a machine without a GPU: its kernel-launch script runs
(on the CPU kernels), its shell script parses, and the CUDA part of the suite (`-m cuda`) collects
from every layer."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

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


def test_cuda_part_of_the_suite_collects_from_every_layer():
    env = {**os.environ, "FUSEDMTL_TEST_DEVICES": "cpu,cuda"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-m",
            "cuda",
            "-p",
            "no:cacheprovider",
            str(ROOT / "tests"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    collected = [line for line in run.stdout.splitlines() if "::" in line]
    for layer in ("tests/losses/", "tests/multi_tensor/", "tests/weighting/"):
        if not any(line.startswith(layer) for line in collected):
            pytest.fail(f"no CUDA test collected under {layer}")
