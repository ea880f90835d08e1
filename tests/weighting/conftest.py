"""Fixtures of the weighting tests (the shared pieces themselves are in weighting_cases.py)."""

from __future__ import annotations

import pytest
from weighting_cases import SharedTrunkNet, make_batch


@pytest.fixture
def model():
    return SharedTrunkNet(seed=0)


@pytest.fixture
def batch():
    return make_batch(0)
