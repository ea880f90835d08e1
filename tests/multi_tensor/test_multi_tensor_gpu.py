"""GPU-only properties of the multi-tensor kernels: no host synchronisation, and one result on
every run. (Their values on CUDA are checked by the device-parametric tests of
test_gramian_combine.py and test_outputs.py against the float64 oracle.)

They skip on machines without a GPU; `make gpu-check` runs them (`-m cuda`).
"""

from __future__ import annotations

import pytest
import torch

import fusedmtl.multi_tensor as mt

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SHAPES = [(300_000,), (17,), (64, 64), (3, 5, 7)]


def _task_grads(k: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(k)
    return [[torch.randn(s, generator=g, dtype=dtype).cuda() for s in SHAPES] for _ in range(k)]


def _every_op(grads, coeffs, params):
    """Each multi-tensor op once, with device coefficients (a Python list would be copied)."""
    return (
        mt.norms(grads),
        mt.gramian(grads),
        mt.gramian(grads, diagonal_only=True),
        mt.combine(grads, coeffs),
        mt.normalized_sum(grads),
        mt.combine_into_grad_(params, grads, coeffs),
        mt.l1_l2_penalty_(params, l1=1e-3, l2=1e-2),
    )


@pytest.mark.parametrize("k", [1, 2, 8, 9, 64])
def test_no_host_synchronisation(gpu_backend, no_host_sync, k):
    grads = _task_grads(k)
    coeffs = torch.randn(k, device="cuda")
    params = [torch.zeros(s, device="cuda", requires_grad=True) for s in SHAPES]
    _every_op(grads, coeffs, params)  # warm-up: the first calls compile or load kernels
    with no_host_sync():
        _every_op(grads, coeffs, params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("k", [3, 9, 40])
def test_results_are_the_same_on_every_run(gpu_backend, dtype, k):
    """Partial sums in a fixed order, no float atomics: bitwise the same results each time."""
    grads = _task_grads(k, dtype)
    coeffs = torch.randn(k, device="cuda", dtype=torch.float64)
    first = [mt.gramian(grads), mt.normalized_sum(grads)[1], *mt.combine(grads, coeffs)]
    for _ in range(3):
        again = [mt.gramian(grads), mt.normalized_sum(grads)[1], *mt.combine(grads, coeffs)]
        for a, b in zip(first, again):
            assert torch.equal(a, b)
