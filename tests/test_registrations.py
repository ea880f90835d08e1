"""Every op with a CPU kernel has a CUDA one (issue 12, defect 1: the penalty had none, so on a
GPU it raised "Could not run ... 'CUDA' backend"). Checked two ways, neither needing a GPU: in the
registry of csrc/torch_bindings.cpp (any build), and in the dispatcher of a CUDA build (run by
`make cuda-check`, which sets FUSEDMTL_EXPECT_CUDA=1)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

import fusedmtl
import fusedmtl._C  # noqa: F401  (registers the ops)

# Ops that exist for the CPU only, and why.
CPU_ONLY = {
    # the eager CPU fast path of a reduced loss; CUDA runs regression_loss_with_grad instead
    "regression_loss_eager": "eager CPU fast path",
}
BINDINGS = Path(__file__).resolve().parents[1] / "csrc" / "torch_bindings.cpp"


def _fusedmtl_ops() -> list[str]:
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fusedmtl::"))


def _has(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


def _impl_blocks(source: str) -> dict[str, set[str]]:
    blocks = {}
    for key, body in re.findall(
        r"TORCH_LIBRARY_IMPL\(fusedmtl,\s*(\w+),\s*m\)\s*\{(.*?)\n\}", source, re.S
    ):
        blocks[key] = set(re.findall(r'm\.impl\("(\w+)"', body))
    return blocks


@pytest.mark.skipif(not BINDINGS.exists(), reason="needs the source checkout")
def test_bindings_register_a_cuda_kernel_for_every_cpu_kernel():
    blocks = _impl_blocks(BINDINGS.read_text())
    assert {"CPU", "CUDA"} <= blocks.keys(), blocks.keys()
    missing = blocks["CPU"] - blocks["CUDA"] - CPU_ONLY.keys()
    assert not missing, f"CPU kernels without a CUDA one in {BINDINGS.name}: {sorted(missing)}"


def test_the_cpu_build_registers_every_cpu_kernel_it_lists():
    blocks = _impl_blocks(BINDINGS.read_text()) if BINDINGS.exists() else {}
    for name in blocks.get("CPU", ()):
        assert _has(f"fusedmtl::{name}", "CPU"), name


cuda_build = pytest.mark.skipif(
    os.environ.get("FUSEDMTL_EXPECT_CUDA") != "1" and not fusedmtl.backend.native_available("cuda"),
    reason="not a CUDA build",
)


@cuda_build
def test_every_op_with_a_cpu_kernel_has_a_cuda_kernel():
    ops = _fusedmtl_ops()
    cpu = [op for op in ops if _has(op, "CPU")]
    assert cpu, ops
    missing = [op for op in cpu if not _has(op, "CUDA") and op.split("::")[1] not in CPU_ONLY]
    assert not missing, f"CPU kernel but no CUDA kernel: {missing}"
