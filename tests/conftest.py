"""Fixtures and hooks of the fusedmtl test suite; the shared helpers are in tests/helpers.py."""

from __future__ import annotations

import contextlib
import os

import torch

# Without a GPU the Triton kernels run on CPU tensors under the interpreter, which must be chosen
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random

import numpy as np
import pytest

import fusedmtl
import fusedmtl._C
from tests.helpers import BACKENDS, DEVICES


def pytest_configure(config):
    config.addinivalue_line("markers", "compile: torch.compile tests (a few seconds each)")
    config.addinivalue_line("markers", "slow: tests over millions of elements")
    config.addinivalue_line("markers", "cuda: runs CUDA or Triton kernels on a GPU (`-m cuda`)")
    if os.environ.get("FUSEDMTL_REQUIRE_PEERS") == "1":
        # `make test` installs torchjd: its oracle tests must run, not skip on a failed install
        try:
            import torchjd.aggregation  # noqa: F401
            import torchjd.scalarization  # noqa: F401
        except ImportError as error:
            raise pytest.UsageError(
                f"FUSEDMTL_REQUIRE_PEERS=1 but torchjd does not import ({error}); `make test "
                "PEERS=0` runs without it (its tests skip)"
            ) from None


def pytest_collection_modifyitems(config, items):
    """Marks the cases of the ``device`` fixture (or a ``device`` parameter) on 'cuda' with
    ``cuda``; modules that need a GPU as a whole carry ``pytestmark = pytest.mark.cuda``."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if str(params.get("device", "")).startswith("cuda"):
            item.add_marker(pytest.mark.cuda)


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same seeds (torch, numpy, random)."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs the test under fusedmtl.backend.use(name) for each backend that runs on the CPU
    ('triton' under the Triton interpreter)."""
    with fusedmtl.backend.use(request.param):
        yield request.param


@pytest.fixture(params=["native", "triton"])
def gpu_backend(request):
    """Each backend with CUDA kernels, under fusedmtl.backend.use (skips where it has none)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    available = {
        "native": fusedmtl.backend.native_available("cuda"),
        "triton": fusedmtl.backend.triton_available(),
    }
    if not available[request.param]:
        pytest.skip(f"the {request.param} backend is not available for CUDA here")
    with fusedmtl.backend.use(request.param):
        yield request.param


@contextlib.contextmanager
def _cuda_sync_raises():
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.fixture
def no_host_sync():
    """``with no_host_sync():`` makes any host synchronisation on CUDA inside the block raise
    (torch.cuda.set_sync_debug_mode('error')). Warm up first: a first call may compile or load."""
    return _cuda_sync_raises


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Each device of ``DEVICES``: 'cpu', and 'cuda' when a GPU is present."""
    if request.param.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return request.param


@pytest.fixture
def restore_cpu_capability():
    original = fusedmtl._C.cpu_capability()
    yield original
    fusedmtl._C.set_cpu_capability(original)
    assert fusedmtl._C.cpu_capability() == original


@pytest.fixture
def restore_num_threads():
    original = torch.get_num_threads()
    yield original
    torch.set_num_threads(original)
