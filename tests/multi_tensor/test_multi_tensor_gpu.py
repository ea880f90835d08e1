"""GPU-only properties of the multi-tensor kernels: no host synchronisation, one result on every
run, and the precision of the Gramian and the norms over thousands of work items. (Their values
on CUDA are checked by the device-parametric tests of test_gramian_combine.py and test_outputs.py
against the float64 oracle.)

The GPU tests skip on machines without a GPU; `make gpu-check` runs them (`-m cuda`). The CPU test
at the end proves that the data of the work-item test catch what it is there for.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from multi_tensor_oracle import assert_rel

import fusedmtl.multi_tensor as mt

_NEEDS_A_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def on_gpu(test):
    """Marked ``cuda`` (what `make gpu-check` selects) and skipped without a GPU."""
    return pytest.mark.cuda(_NEEDS_A_GPU(test))


LARGE = pytest.mark.skipif(
    os.environ.get("FUSEDMTL_LARGE_TESTS") != "1",
    reason="needs ~4 GB of GPU memory; FUSEDMTL_LARGE_TESTS=1",
)

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
@on_gpu
def test_no_host_synchronisation(gpu_backend, no_host_sync, k):
    grads = _task_grads(k)
    coeffs = torch.randn(k, device="cuda")
    params = [torch.zeros(s, device="cuda", requires_grad=True) for s in SHAPES]
    _every_op(grads, coeffs, params)  # warm-up: the first calls compile or load kernels
    with no_host_sync():
        _every_op(grads, coeffs, params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("k", [3, 9, 40])
@on_gpu
def test_results_are_the_same_on_every_run(gpu_backend, dtype, k):
    """Partial sums in a fixed order, no float atomics: bitwise the same results each time."""
    grads = _task_grads(k, dtype)
    coeffs = torch.randn(k, device="cuda", dtype=torch.float64)
    first = [mt.gramian(grads), mt.normalized_sum(grads)[1], *mt.combine(grads, coeffs)]
    for _ in range(3):
        again = [mt.gramian(grads), mt.normalized_sum(grads)[1], *mt.combine(grads, coeffs)]
        for a, b in zip(first, again):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# Thousands of work items (issue 12, defect 8): the CUDA Gramian and norms added the per-item
# partials in float32, where the CPU adds them in double. With the same partial in every item the
# rounding of a float32 running sum goes the same way item after item: over these 5000 items its
# error is 1.6e-5 to 4.5e-5 of the Gramian's entries and 1.3e-5 to 2.3e-5 of the norms
# (test_the_work_item_data_catch_a_float32_sum_of_the_items below computes it), past the rtol 1e-5
# the oracle tests promise; a sum in double keeps them to the last float32 rounding. (Random items
# would not show it: their rounding errors cancel, to about 2e-6 over 5000 items.)

ITEMS = 5000
RTOL = 1e-5  # multi_tensor_oracle.reduce_rtol(float32)
PATTERN_SCALES = (1.0, 0.01, 30.0)  # the tasks' magnitudes differ by orders of magnitude


def _patterns(numel: int = 1024) -> torch.Tensor:
    """K x numel float32 patterns, correlated (each task pulls along a common direction, so the
    off-diagonal entries are as large as the diagonal and have no cancellation to hide behind)."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(numel, generator=g, dtype=torch.float64)
    rows = [
        (base + 0.3 * torch.randn(numel, generator=g, dtype=torch.float64)) * s
        for s in PATTERN_SCALES
    ]
    return torch.stack(rows).float()


def _oracle(patterns: torch.Tensor, repeats: int):
    """(Gramian, sum of |products|) in float64 of K gradients that are ``repeats`` copies of the
    patterns: repeats times the patterns' own."""
    p = patterns.double()
    return repeats * (p @ p.T), repeats * (p.abs() @ p.abs().T)


def _check(gram, norms, patterns, repeats, what):
    ref, scale = _oracle(patterns, repeats)
    assert gram.dtype == norms.dtype == torch.float32
    assert_rel(gram, ref, scale, RTOL, f"{what}: gramian")
    ref_norms = ref.diagonal().sqrt()
    assert_rel(norms, ref_norms, ref_norms, RTOL, f"{what}: norms")


@on_gpu
def test_gramian_and_norms_over_thousands_of_tensors(gpu_backend):
    """5000 parameters of 1024 elements: one work item each, every item the same."""
    patterns = _patterns().cuda()
    # (repeat: 5000 separate rows of memory, each its own tensor)
    grads = [list(p.repeat(ITEMS, 1).unbind(0)) for p in patterns]
    _check(mt.gramian(grads), mt.norms(grads), patterns, ITEMS, f"{ITEMS} tensors")


@LARGE
@on_gpu
def test_gramian_and_norms_over_thousands_of_items_of_one_tensor(gpu_backend):
    """One parameter of 5000 CUDA work items (65536 elements each; the Triton kernels' items are
    smaller, so there are more), the pattern repeating 64 times in every item."""
    patterns = _patterns().cuda()
    repeats = ITEMS * 65536 // patterns.shape[1]
    grads = [[p.repeat(repeats)] for p in patterns]
    _check(mt.gramian(grads), mt.norms(grads), patterns, repeats, "one tensor")


def test_the_work_item_data_catch_a_float32_sum_of_the_items():
    """The data of the two tests above, summed as the defect did (each item's partial rounded to
    float32, the items added one after the other in float32), miss the float64 value by more
    than the tests allow: they fail on that kernel. (64 copies of the pattern per item scale the
    partials by a power of two, which rounds the same way.)"""
    patterns = _patterns()
    ref, scale = _oracle(patterns, ITEMS)
    partials = (patterns.double() @ patterns.double().T).float().numpy()
    k = partials.shape[0]
    running = np.zeros((k, k), dtype=np.float32)
    for _ in range(ITEMS):
        running = running + partials  # float32 + float32: rounded to float32 each time
    gram_error = np.abs(running.astype(np.float64) - ref.numpy()) / scale.numpy()
    assert gram_error.max() > 2 * RTOL, gram_error
    norms32 = np.sqrt(np.diagonal(running).astype(np.float64))
    ref_norms = ref.diagonal().sqrt().numpy()
    assert (np.abs(norms32 - ref_norms) / ref_norms).max() > RTOL
    # and the same data summed in double pass (what the test asks of the kernels)
    exact = torch.from_numpy(partials).double() * ITEMS
    assert_rel(exact.float(), ref, scale, RTOL, "float32 partials summed in double")
