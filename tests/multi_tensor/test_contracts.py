"""Contracts of the multi-tensor ops a careful user relies on (issue 19 points 7, 8 and 10; issue
12 defects 1 and 7), every backend and device: wrong-shape gradients, duplicate parameters and
outputs, bad outputs and coefficients that require grad raise a clear ValueError; the penalty
runs on every backend; Triton's combine takes CPU coefficients; every schema passes opcheck."""

from __future__ import annotations

import os

import pytest
import torch

import fusedmtl
import fusedmtl.multi_tensor as mt
from tests.helpers import BACKENDS

TRITON = "triton" in BACKENDS


def _grads(device, dtype=torch.float32, k=2, shape=(2, 3)):
    g = torch.Generator().manual_seed(0)
    return [[torch.randn(shape, generator=g, dtype=dtype).to(device)] for _ in range(k)]


# -- issue 19 point 7: right element count, wrong shape ---------------------------------------


def test_combine_into_grad_rejects_a_wrong_shape_with_the_right_numel(backend, device):
    p = torch.zeros(2, 3, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="shape"):
        mt.combine_into_grad_([p], [[torch.arange(6.0, device=device).reshape(3, 2)]], [1.0])
    assert p.grad is None  # nothing written


def test_combine_into_grad_rejects_a_transposed_gradient(backend, device):
    p = torch.zeros(16, 8, device=device, requires_grad=True)
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="shape"):
        mt.combine_into_grad_([p], [[torch.randn(8, 16, device=device)]], [1.0])
    assert torch.equal(p.grad, torch.ones_like(p))


# -- issue 19 point 8: a tensor given twice ---------------------------------------------------


def test_combine_into_grad_rejects_a_duplicate_parameter(backend, device):
    q = torch.zeros(3, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="share memory"):
        mt.combine_into_grad_([q, q], [[torch.ones(3, device=device)] * 2], [1.0])
    q.grad = torch.ones(3, device=device)
    with pytest.raises(ValueError, match="share memory"):
        mt.combine_into_grad_([q, q], [[torch.ones(3, device=device)] * 2], [1.0])
    assert torch.equal(q.grad, torch.ones(3, device=device))  # untouched, not added twice


@pytest.mark.parametrize("fn", ["combine", "normalized_sum"])
def test_one_out_tensor_for_two_parameters_is_rejected(backend, device, fn):
    out = torch.zeros(4, device=device)
    grads = [[torch.ones(4, device=device), torch.ones(4, device=device)]]
    call = (
        (lambda: mt.combine(grads, [1.0], out=[out, out], accumulate=True))
        if fn == "combine"
        else (lambda: mt.normalized_sum(grads, out=[out, out], accumulate=True))
    )
    with pytest.raises(ValueError, match="share memory"):
        call()
    assert torch.equal(out, torch.zeros(4, device=device))


def test_overlapping_views_as_outputs_are_rejected_and_disjoint_ones_accepted(backend, device):
    flat = torch.zeros(8, device=device)
    grads = [[torch.ones(4, device=device), torch.full((4,), 2.0, device=device)]]
    with pytest.raises(ValueError, match="share memory"):
        mt.combine(grads, [1.0], out=[flat[0:4], flat[2:6]])
    mt.combine(grads, [1.0], out=[flat[0:4], flat[4:8]])  # one flat buffer, two disjoint views
    assert torch.equal(flat, torch.tensor([1.0] * 4 + [2.0] * 4, device=device))


# -- issue 19 point 10: bad outputs, coefficients that require grad ---------------------------


def test_combine_with_a_none_output_is_a_clear_error(backend, device):
    with pytest.raises(ValueError, match="output 0 is NoneType"):
        mt.combine(_grads(device), [1.0, 1.0], out=[None])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float64])
def test_an_output_of_another_dtype_is_a_clear_error(backend, device, dtype):
    out = torch.zeros(2, 3, dtype=dtype, device=device)
    with pytest.raises(ValueError, match="no silent rounding or truncation"):
        mt.combine([[torch.full((2, 3), 0.7, device=device)]], [1.0], out=[out])
    assert not out.any()  # not 0.7 truncated to 0: nothing written


@pytest.mark.parametrize("fn", ["combine", "combine_into_grad_"])
def test_coefficients_that_require_grad_raise(backend, device, fn):
    c = torch.ones(2, device=device, requires_grad=True)
    grads = _grads(device)
    with pytest.raises(ValueError, match="not differentiable"):
        if fn == "combine":
            mt.combine(grads, c)
        else:
            mt.combine_into_grad_([torch.zeros(2, 3, device=device)], grads, c)
    with torch.no_grad():  # explicitly outside autograd: allowed
        mt.combine(grads, c)
    (got,) = mt.combine(grads, c.detach())
    torch.testing.assert_close(got, grads[0][0] + grads[1][0])


# -- issue 12 defect 7: Triton combine with CPU coefficients ----------------------------------


@pytest.mark.parametrize("coeff_dtype", [torch.float32, torch.float64])
def test_combine_takes_cpu_coefficients_of_any_float_dtype(backend, device, coeff_dtype):
    grads = _grads(device, torch.float32, k=3)
    coeffs = torch.tensor([0.5, -2.0, 3.0], dtype=coeff_dtype)  # on the CPU
    (got,) = mt.combine(grads, coeffs)
    want = sum(float(c) * g[0].double() for c, g in zip(coeffs, grads))
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not TRITON, reason="Triton does not run here")
def test_triton_combine_rejects_outputs_of_another_dtype_than_the_gradients():
    from fusedmtl.multi_tensor import triton as triton_mt

    grads = [torch.ones(4, dtype=torch.float64)]
    with pytest.raises(ValueError, match="gradients are torch.float64"):
        triton_mt.combine_op(grads, 1, torch.ones(1), [torch.zeros(4)], False)


@pytest.mark.skipif(not TRITON, reason="Triton does not run here")
def test_triton_ops_reject_gradients_of_mixed_dtypes():
    """Every kernel reads all gradients as the first one's dtype: a float64 one among float32
    would be read as garbage."""
    from fusedmtl.multi_tensor import triton as triton_mt

    grads = [torch.ones(4), torch.ones(4, dtype=torch.float64)]
    with pytest.raises(ValueError, match="gradient 1 is torch.float64"):
        triton_mt.combine_op(grads, 2, torch.ones(2), [torch.zeros(4)], False)
    with pytest.raises(ValueError, match="gradient 1 is torch.float64"):
        triton_mt.gramian_op(grads, 2, False)


@pytest.mark.skipif(not TRITON, reason="Triton does not run here")
def test_triton_launches_make_the_tensors_device_current(monkeypatch):
    """Issue 12 defect 6: Triton launches on the current CUDA device, so each op enters the
    guard of its tensors' device (recorded here; on CPU tensors it is a no-op)."""
    import contextlib

    from fusedmtl.multi_tensor import triton as triton_mt

    entered = []
    monkeypatch.setattr(
        triton_mt, "device_guard", lambda d: entered.append(d) or contextlib.nullcontext()
    )
    grads = [torch.randn(5), torch.randn(5), torch.randn(5), torch.randn(5)]
    triton_mt.gramian_op(grads, 4, False)
    triton_mt.combine_op(grads, 4, torch.ones(4), [torch.zeros(5)], False)
    triton_mt.penalty_op([torch.randn(5)], [torch.zeros(5)], False, 0.1, 0.1)
    triton_mt.trim_op([g.clone() for g in grads], 4, 1)
    leak = torch.zeros(4)
    triton_mt.sign_dropout_op([g.clone() for g in grads], 4, [torch.rand(5)], leak)
    assert entered == [torch.device("cpu")] * 5


# -- issue 12 defect 1: the penalty on every backend ------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("fresh", [True, False])
def test_l1_l2_penalty_every_backend(backend, device, dtype, fresh):
    g = torch.Generator().manual_seed(1)
    params = [
        torch.randn(s, generator=g).to(device, dtype).requires_grad_()
        for s in [(70000,), (3, 5), (1,)]
    ]
    params[1].data[0, 0] = 0.0  # sign(0) = 0
    before = [torch.randn(p.shape, generator=g).to(device, dtype) for p in params]
    if not fresh:
        for p, b in zip(params, before):
            p.grad = b.clone()
    l1, l2 = 0.3, 0.05
    total = mt.l1_l2_penalty_(params, l1=l1, l2=l2)
    w = [p.detach().double() for p in params]
    want = sum(l1 * x.abs().sum() + l2 * (x * x).sum() for x in w)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5}[dtype]
    torch.testing.assert_close(total.double(), want, rtol=tol, atol=tol)
    for p, x, b in zip(params, w, before):
        update = l1 * torch.sign(x) + 2 * l2 * x + (0 if fresh else b.double())
        torch.testing.assert_close(
            p.grad.double(),
            update,
            rtol=2**-7 if dtype == torch.bfloat16 else 1e-6,
            atol=1e-2 if dtype == torch.bfloat16 else 1e-6,
        )


# -- issue 18 section 3: opcheck on every schema of every backend -----------------------------


def _op_cases():
    g = torch.Generator().manual_seed(2)

    def grads():
        return [
            torch.randn(5, 3, generator=g),
            None,
            torch.randn(7, generator=g),
            torch.randn(5, 3, generator=g),
            torch.randn(4, generator=g),
            None,
        ]

    return {
        "multi_tensor_gramian": lambda: (grads(), 2, False),
        "multi_tensor_combine": lambda: (
            grads(),
            2,
            torch.tensor([0.5, 2.0]),
            [torch.zeros(5, 3), torch.zeros(4), torch.zeros(7)],
            True,
        ),
        "multi_tensor_normalized_sum": lambda: (
            grads(),
            2,
            1e-8,
            [torch.zeros(5, 3), torch.zeros(4), torch.zeros(7)],
            False,
        ),
        "multi_tensor_add_l1_l2_penalty": lambda: (
            [torch.randn(4, generator=g), torch.randn(2, 2, generator=g)],
            [torch.zeros(4), torch.zeros(2, 2)],
            False,
            0.1,
            0.2,
        ),
        # three tasks, two parameters, the median kept
        "multi_tensor_trim_": lambda: (
            [
                torch.randn(5, 3, generator=g),
                torch.randn(4, generator=g),
                torch.randn(5, 3, generator=g),
                torch.zeros(4),
                torch.randn(5, 3, generator=g),
                torch.randn(4, generator=g),
            ],
            3,
            1,
        ),
        "multi_tensor_sign_dropout_": lambda: (
            [
                torch.randn(5, 3, generator=g),
                torch.randn(4, generator=g),
                torch.randn(5, 3, generator=g),
                torch.randn(4, generator=g),
            ],
            2,
            [torch.rand(5, 3, generator=g), torch.rand(4, generator=g)],
            torch.tensor([0.0, 0.25]),
        ),
    }


_OPCHECK = [(f"fusedmtl::{name}", make) for name, make in _op_cases().items()]
if TRITON:
    _OPCHECK += [
        (f"fusedmtl::triton_{name}", make)
        for name, make in _op_cases().items()
        if name != "multi_tensor_normalized_sum"
    ]


@pytest.mark.parametrize("op, make", _OPCHECK, ids=[name for name, _ in _OPCHECK])
def test_opcheck(op, make):
    if op.startswith("fusedmtl::triton_"):
        import fusedmtl.multi_tensor.triton  # noqa: F401  (registers the Triton ops)
    namespace, name = op.split("::")
    torch.library.opcheck(getattr(getattr(torch.ops, namespace), name).default, make())


# -- normalized_sum's cooperative and fallback paths (CUDA only) ------------------------------


@pytest.mark.skipif(
    not (torch.cuda.is_available() and fusedmtl.backend.native_available("cuda")),
    reason="needs a GPU and the CUDA build",
)
@pytest.mark.cuda  # (no device parameter: gpu-check's `-m cuda` selects it by this mark)
@pytest.mark.parametrize("k", [2, 9, 40, 64])
def test_normalized_sum_cooperative_and_fallback_agree_bitwise(k, monkeypatch):
    g = torch.Generator().manual_seed(k)
    grads = [
        [torch.randn(s, generator=g).cuda() for s in [(300000,), (17,), (64, 64)]] for _ in range(k)
    ]
    with fusedmtl.backend.use("native"):
        fused, fused_norms = mt.normalized_sum(grads)
        monkeypatch.setenv("FUSEDMTL_NO_COOPERATIVE", "1")
        fallback, fallback_norms = mt.normalized_sum(grads)
    assert torch.equal(fused_norms, fallback_norms)
    for a, b in zip(fused, fallback):
        assert torch.equal(a, b)
    want = torch.stack([torch.cat([t.double().flatten() for t in task]).norm() for task in grads])
    torch.testing.assert_close(fused_norms.double(), want, rtol=1e-5, atol=0)
    assert os.environ["FUSEDMTL_NO_COOPERATIVE"] == "1"
