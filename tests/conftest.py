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
from tests.helpers import BACKEND_DEVICES, BACKENDS, DEVICES, skip_without_a_gpu


def pytest_configure(config):
    config.addinivalue_line("markers", "compile: torch.compile tests (a few seconds each)")
    config.addinivalue_line("markers", "slow: tests over millions of elements")
    config.addinivalue_line("markers", "cuda: runs CUDA or Triton kernels on a GPU (`-m cuda`)")
    config.addinivalue_line(
        "markers",
        "cuda_subset(**values): on a CUDA device, only the cases whose parameter NAME is one of "
        "values[NAME] (the rest of the CPU matrix is deselected there)",
    )
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


def _parametrized_by_a_mark(metafunc, name: str) -> bool:
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs["argnames"]
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        if name in names:
            return True
    return False


def pytest_generate_tests(metafunc):
    """Parametrizes the ``backend`` and ``device`` fixtures (they have no params of their own): a
    test with both gets the pairs of BACKEND_DEVICES (a backend only on the devices it runs on:
    triton x cuda wherever Triton is installed, triton x cpu only under the interpreter), a test
    with ``backend`` alone the backends that run on the CPU, one with ``device`` alone DEVICES."""
    names = [
        n
        for n in ("backend", "device")
        if n in metafunc.fixturenames and not _parametrized_by_a_mark(metafunc, n)
    ]
    if names == ["backend", "device"]:
        metafunc.parametrize(("backend", "device"), BACKEND_DEVICES, indirect=True)
    elif names == ["backend"]:
        metafunc.parametrize("backend", BACKENDS, indirect=True)
    elif names == ["device"]:
        metafunc.parametrize("device", DEVICES, indirect=True)


def _in_cuda_subset(item, params) -> bool:
    for mark in item.iter_markers("cuda_subset"):
        for name, allowed in mark.kwargs.items():
            if name not in params:  # (a misspelt name would keep every case)
                raise pytest.UsageError(f"{item.nodeid}: cuda_subset names no parameter {name!r}")
            if params[name] not in allowed:
                return False
    return True


def pytest_collection_modifyitems(config, items):
    """Marks the cases of the ``device`` fixture (or a ``device`` parameter) on 'cuda' with
    ``cuda``; modules that need a GPU as a whole carry ``pytestmark = pytest.mark.cuda``.

    A test marked ``cuda_subset(layout=(...), ...)`` runs on CUDA only the cases with those
    values: the CPU matrix of the big parity tests, run on every backend of a GPU, would take most
    of `make gpu-check`'s 8 minutes for kernel paths the subset already launches."""
    kept, deselected = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        on_cuda = str(params.get("device", "")).startswith("cuda")
        if on_cuda:
            item.add_marker(pytest.mark.cuda)
        (kept if not on_cuda or _in_cuda_subset(item, params) else deselected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same seeds (torch, numpy, random)."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield


@pytest.fixture
def backend(request):
    """Runs the test under fusedmtl.backend.use(name) for each backend (pytest_generate_tests
    above: those that run on the test's device, or on the CPU for a test without ``device``)."""
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


@pytest.fixture
def device(request) -> str:
    """Each device of ``DEVICES`` (pytest_generate_tests above): 'cpu', and 'cuda' when a GPU is
    present (or FUSEDMTL_TEST_DEVICES names it: skipped without one)."""
    skip_without_a_gpu(request.param)
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
