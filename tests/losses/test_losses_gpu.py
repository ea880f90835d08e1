"""GPU tests of the loss kernels: the native CUDA kernels and the Triton ones on CUDA tensors.

They skip on machines without a GPU (all of this project's machines); the CPU suite covers the
per-element math, which the CUDA kernels share through csrc/losses/loss_math.h.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import fusedmtl
from fusedmtl.losses import REGRESSION_KINDS

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

LOSSES = {
    k.name: (getattr(fusedmtl, k.function), k.torch_function, k.param_name)
    for k in REGRESSION_KINDS
}
TOLERANCE = {
    torch.float64: dict(rtol=1e-12, atol=1e-14),
    torch.float32: dict(rtol=1e-5, atol=1e-7),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}


def call(name, args, reduction, param):
    fn, ref, param_name = LOSSES[name]
    kwargs = {"reduction": reduction}
    if param_name is not None:
        kwargs[param_name] = param
    return fn(*args, **kwargs), ref, kwargs


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 1023, 100_003])
def test_parity_with_torch(gpu_backend, name, reduction, dtype, n):
    generator = torch.Generator(device="cuda").manual_seed(n)
    x = (torch.randn(n, device="cuda", generator=generator) * 2).to(dtype).requires_grad_()
    y = torch.randn(n, device="cuda", generator=generator).to(dtype).requires_grad_()
    loss, ref_fn, kwargs = call(name, (x, y), reduction, 0.7)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = y.detach().clone().requires_grad_()
    ref = ref_fn(x_ref, y_ref, **kwargs)
    torch.testing.assert_close(loss, ref, **TOLERANCE[dtype])
    grad_output = torch.randn_like(ref)
    gx, gy = torch.autograd.grad(loss, (x, y), grad_output)
    rx, ry = torch.autograd.grad(ref, (x_ref, y_ref), grad_output)
    torch.testing.assert_close(gx, rx, **TOLERANCE[dtype])
    torch.testing.assert_close(gy, ry, **TOLERANCE[dtype])
    assert torch.equal(gy, -gx)


@pytest.mark.parametrize("name", LOSSES)
def test_reductions_are_deterministic(gpu_backend, name):
    x = torch.randn(3_000_017, device="cuda", requires_grad=True)
    y = torch.randn(3_000_017, device="cuda")
    results = []
    for _ in range(3):
        loss, _, _ = call(name, (x, y), "mean", 1.0)
        (grad,) = torch.autograd.grad(loss, x)
        results.append((loss, grad))
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0])
        assert torch.equal(grad, results[0][1])


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_no_host_synchronisation(gpu_backend, no_host_sync, name, reduction):
    x = torch.randn(4097, device="cuda", requires_grad=True)
    y = torch.randn(4097, device="cuda")
    call(name, (x, y), reduction, 0.7)  # warm-up: first calls may compile or load modules
    with no_host_sync():
        loss, _, _ = call(name, (x, y), reduction, 0.7)
        loss.backward(torch.ones_like(loss))


def test_compile_fullgraph(gpu_backend):
    x = torch.randn(1000, device="cuda", requires_grad=True)
    y = torch.randn(1000, device="cuda")
    compiled = torch.compile(lambda a, b: fusedmtl.smooth_l1_loss(a, b) * 3, fullgraph=True)
    loss = compiled(x, y)
    (grad,) = torch.autograd.grad(loss, x)
    x_ref = x.detach().clone().requires_grad_()
    ref = F.smooth_l1_loss(x_ref, y) * 3
    (ref_grad,) = torch.autograd.grad(ref, x_ref)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.skipif(
    os.environ.get("FUSEDMTL_LARGE_TESTS") != "1",
    reason="needs ~13 GB of GPU memory; FUSEDMTL_LARGE_TESTS=1",
)
def test_more_than_2_31_elements(gpu_backend):
    n = 2**31 + 17
    x = torch.full((n,), 2.0, device="cuda", dtype=torch.float16)
    y = torch.zeros(n, device="cuda", dtype=torch.float16)
    x[-1] = 4.0
    loss = fusedmtl.mse_loss(x, y, reduction="none")
    assert loss[-1].item() == 16.0 and loss[0].item() == 4.0
    # the sum, 2n + 2 = 4.3e9, overflows float16 (in torch too): the mean (accumulated in float32)
    # checks that every element past 2^31 is read
    expected_mean = (2.0 * n + 2.0) / n
    assert fusedmtl.l1_loss(x, y, reduction="mean").item() == pytest.approx(expected_mean, rel=1e-3)
    assert fusedmtl.l1_loss(x, y, reduction="sum").isinf()  # as torch.nn.functional.l1_loss
