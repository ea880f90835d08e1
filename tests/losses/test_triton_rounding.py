"""The Triton loss kernels round on a GPU as on the CPU (issue 12, defect 4): compiled for sm_90
without a driver, their PTX has no approximate division (div.full / div.approx), no approximate
exponential (ex2.approx) and no fused multiply-add (with the launch options every launch passes).
The interpreter, which runs the kernels in CI, rounds like the CPU whatever the PTX would do, so
only the PTX shows this."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import BACKENDS

pytestmark = pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")

# Compiled in a child process: under TRITON_INTERPRET=1 (set by conftest) triton.jit gives
# interpreted functions, which triton.compile does not take.
_SCRIPT = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fusedmtl.losses import triton as T

FLOAT_FMA = re.compile(r"\b(?:fma|mad)(?:\.\w+)*\.f(?:32|64)\b")
PATTERNS = {"approx_div": re.compile(r"\bdiv\.(?:full|approx)\."),
            "approx_exp": re.compile(r"\bex2\.approx\b"), "fma": FLOAT_FMA,
            "rn_div": re.compile(r"\bdiv\.rn\.f(?:32|64)\b")}

def wanted(kernel, c):
    if kernel is T._heteroscedastic_loss_kernel:
        return c["KIND"] == 2 and c["DIVIDE"] and (c["REDUCE"] or c["GRAD_INPUT"])
    return (c["KIND"] == 2 and c["DIVIDE"]) or c.get("L1_MEAN")

def counts(kernel, signature, constexprs, options):
    source = ASTSource(kernel, {**signature, **{k: "constexpr" for k in constexprs}}, constexprs)
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
    return {name: len(p.findall(ptx)) for name, p in PATTERNS.items()}

cases = [c for c in T.COMPILE_CASES if wanted(c[0], c[2]) and c[2]["FP64"] in (False, True)]
cases = [c for c in cases if not c[2]["GRAD_TENSOR"]][:12]
out = {"cases": [], "fused_without_options": None}
for kernel, signature, constexprs in cases:
    out["cases"].append([kernel.__name__, constexprs, counts(kernel, signature, constexprs,
                                                              T.LAUNCH_OPTIONS)])
hetero = next(c for c in cases if c[0] is T._heteroscedastic_loss_kernel and not c[2]["FP64"])
out["fused_without_options"] = counts(*hetero, {})
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def ptx_counts():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_no_approximate_or_fused_arithmetic(ptx_counts):
    assert ptx_counts["cases"], "no kernel was compiled"
    kernels = {name for name, _, _ in ptx_counts["cases"]}
    assert kernels == {"_regression_loss_kernel", "_heteroscedastic_loss_kernel"}
    for name, constexprs, counts in ptx_counts["cases"]:
        what = f"{name} {constexprs}"
        assert counts["approx_div"] == 0, what
        assert counts["approx_exp"] == 0, what
        assert counts["fma"] == 0, what
        assert counts["rn_div"] > 0, what  # the divisions are there, correctly rounded


def test_the_check_sees_fusion(ptx_counts):
    """Without the launch options the same heteroscedastic kernel has FMAs: the check above can
    fail."""
    assert ptx_counts["fused_without_options"]["fma"] > 0
