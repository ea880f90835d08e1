"""Fixtures of the weighting tests (the shared pieces themselves are in weighting_cases.py and
solver_cases.py)."""

from __future__ import annotations

import pytest
import torch
from weighting_cases import SharedTrunkNet, make_batch


@pytest.fixture
def model():
    return SharedTrunkNet(seed=0)


@pytest.fixture
def batch():
    return make_batch(0)


@pytest.fixture(scope="module")
def single_thread():
    """The K x K ops are far too small for intra-op threads, whose spin-waits dominate (tens of
    ms) on a loaded machine; the callers run these solvers the same way (the solver test modules
    use it, ``pytestmark = pytest.mark.usefixtures("single_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
