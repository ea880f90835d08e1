"""fusedmtl.heteroscedastic_loss (Kendall & Gal 2017) on every backend against an independent
float64 oracle: torch.exp composed with torch.nn.functional's mse/l1/smooth_l1 losses, gradients
by autograd in float64.

Precision contract checked here (elementwise, relative to the largest magnitude of the result,
since exp(-s) b + s may cancel):
- float64 within 1e-12, float32 within 1e-5 of the oracle; float16/bfloat16 within 4 ulps of the
  dtype (computed in float32, rounded once).
- grad w.r.t. target == -grad w.r.t. input, exactly; NaN and inf where the oracle has them.
- mean and sum are bitwise independent of the thread count and of the CPU instruction set.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import fusedmtl
import fusedmtl.nn
from tests.helpers import (
    BACKENDS,
    LOW_PRECISION_RTOL,
    REDUCTIONS,
    assert_bitwise,
    dtype_params,
    make_pair,
)

EXACT = (torch.float32, torch.float64)

# (kind, beta): the default beta, a power of two, one the kernels divide by, and beta == 0 (l1)
CASES = [
    ("l2", 1.0),
    ("l1", 1.0),
    ("smooth_l1", 1.0),
    ("smooth_l1", 0.5),
    ("smooth_l1", 2.5),
    ("smooth_l1", 0.0),
]
CASE_IDS = [f"{kind}-beta{beta:g}" for kind, beta in CASES]


def rtol_of(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype) or 4 * LOW_PRECISION_RTOL[dtype]


def make_log_var(shape, dtype, seed=2):
    """Log-variances in [-3, 3], a few exactly 0 (exp(-s) == 1)."""
    gen = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5).clamp(-3, 3)
    s = torch.where(torch.rand(shape, generator=gen) < 0.1, torch.zeros_like(s), s)
    return s.to(dtype)


def make_problem(shape, dtype, seed=0):
    x, y = make_pair(shape, dtype, seed=seed)
    return x, y, make_log_var(shape, dtype, seed=seed + 2)


def oracle(x, y, s, kind, beta, reduction, grad_output=None):
    """(loss, (grad input, grad target, grad log_var)) in float64 from torch's own losses."""
    x, y, s = (t.detach().double().requires_grad_() for t in (x, y, s))
    bx, by, bs = torch.broadcast_tensors(x, y, s)
    if kind == "l2":
        per_element = 0.5 * torch.exp(-bs) * F.mse_loss(bx, by, reduction="none") + 0.5 * bs
    elif kind == "l1":
        per_element = torch.exp(-bs) * F.l1_loss(bx, by, reduction="none") + bs
    else:
        per_element = torch.exp(-bs) * F.smooth_l1_loss(bx, by, reduction="none", beta=beta) + bs
    loss = {"none": per_element, "mean": per_element.mean(), "sum": per_element.sum()}[reduction]
    g = torch.ones_like(loss) if grad_output is None else grad_output.double()
    grads = torch.autograd.grad(loss, (x, y, s), g, allow_unused=True, materialize_grads=True)
    return loss.detach(), grads


def assert_close(got, ref64, dtype, what):
    """Same dtype, shape, NaN and inf positions; finite values within rtol_of(dtype) of the
    float64 oracle, relative to its largest magnitude."""
    __tracebackhide__ = True
    assert got.dtype == dtype, f"{what}: dtype {got.dtype} != {dtype}"
    assert got.shape == ref64.shape, f"{what}: shape {got.shape} != {ref64.shape}"
    expected = ref64.to(dtype)  # overflow to inf in a low-precision dtype is the expected result
    assert torch.equal(got.isnan(), expected.isnan()), f"{what}: NaN positions differ"
    assert torch.equal(got.isinf(), expected.isinf()), f"{what}: inf positions differ"
    assert torch.equal(got[got.isinf()], expected[expected.isinf()]), f"{what}: signs of inf differ"
    finite = expected.isfinite()
    if finite.any():
        rtol = rtol_of(dtype)
        atol = rtol * float(ref64[finite].abs().max()) + torch.finfo(dtype).tiny
        torch.testing.assert_close(
            got[finite].double(), ref64[finite], rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}"
        )


def leaves(*tensors):
    return [t.detach().requires_grad_() for t in tensors]


def fused(x, y, s, kind, beta, reduction):
    return fusedmtl.heteroscedastic_loss(x, y, s, kind=kind, beta=beta, reduction=reduction)


def check_against_oracle(x, y, s, kind, beta, reduction, grad_kind="random"):
    """Forward and the three gradients of the fused loss against the oracle."""
    __tracebackhide__ = True
    xf, yf, sf = leaves(x, y, s)
    loss = fused(xf, yf, sf, kind, beta, reduction)
    g = torch.ones_like(loss) if grad_kind == "one" else make_g(loss)
    ref, ref_grads = oracle(x, y, s, kind, beta, reduction, g)
    dtype = loss.dtype
    assert_close(loss.detach(), ref, dtype, "loss")
    grads = torch.autograd.grad(loss, (xf, yf, sf), g)
    for got, exp, name in zip(grads, ref_grads, ("input", "target", "log_var")):
        assert_close(got, exp, dtype, f"grad {name}")
    if x.shape == y.shape:
        assert_bitwise(grads[1], -grads[0], "grad target vs -grad input")
    return loss, grads


def make_g(loss):
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(loss.shape, generator=gen, dtype=torch.float64) + 0.5
    return g.to(loss.device, loss.dtype)


# --------------------------------------------------------------------------------------------
# Values and gradients against the oracle


@pytest.mark.parametrize("grad_kind", ["one", "random"])
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind, beta", CASES, ids=CASE_IDS)
def test_matches_oracle(backend, device, kind, beta, reduction, dtype, grad_kind):
    """grad_output exactly 1 takes the eager fast path (gradients computed in forward) for
    mean/sum on the native backend; a random one the one-pass backward op. On every device (the
    oracle runs on the same one)."""
    problem = (t.to(device) for t in make_problem((1023,), dtype))
    check_against_oracle(*problem, kind, beta, reduction, grad_kind)


@pytest.mark.parametrize("layout", ["nd", "transposed", "strided"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_layouts(backend, reduction, layout):
    x, y, s = make_problem((24, 66), torch.float32, seed=5)
    if layout == "nd":
        x, y, s = (t.reshape(4, 6, 66) for t in (x, y, s))
    elif layout == "transposed":
        x, s = x.t(), s.t()
        y = y.t().contiguous()
    else:
        x, y, s = x[:, ::2], y[:, 1::2], s[:, ::2]
    check_against_oracle(x, y, s, "smooth_l1", 0.5, reduction)


@pytest.mark.parametrize("which", ["input", "target", "log_var", "input+log_var", "target+log_var"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_some_arguments_need_grad(backend, reduction, which):
    """Only some operands require grad: the others get none, the rest the oracle's gradients
    (the fast path negates its input gradient in place when only target needs one)."""
    x, y, s = make_problem((1023,), torch.float64)
    wanted = which.split("+")
    operands = [
        t.detach().requires_grad_(name in wanted)
        for t, name in zip((x, y, s), ("input", "target", "log_var"))
    ]
    loss = fused(*operands, "l1", 1.0, reduction)
    loss.backward(torch.ones_like(loss))
    _, ref_grads = oracle(x, y, s, "l1", 1.0, reduction)
    for t, ref, name in zip(operands, ref_grads, ("input", "target", "log_var")):
        if name in wanted:
            assert_close(t.grad, ref, torch.float64, f"grad {name}")
        else:
            assert t.grad is None, name


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_second_backward_retain_graph(backend, reduction):
    """A second and third backward of one graph give the first one's gradients (the fast path
    hands its buffers out once, then recomputes)."""
    x, y, s = leaves(*make_problem((1023,), torch.float32))
    loss = fused(x, y, s, "smooth_l1", 1.0, reduction)
    first = torch.autograd.grad(loss, (x, y, s), retain_graph=True)
    second = torch.autograd.grad(loss, (x, y, s), retain_graph=True)
    third = torch.autograd.grad(loss, (x, y, s), torch.tensor(1.0))
    for a, b, c, name in zip(first, second, third, ("input", "target", "log_var")):
        assert_bitwise(b, a, f"second grad {name}")
        assert_bitwise(c, a, f"third grad {name}")


def test_gradients_accumulate(backend):
    x, y, s = leaves(*make_problem((1023,), torch.float64))
    for scale in (1.0, 1.0, -0.75):
        (fused(x, y, s, "l2", 1.0, "mean") * scale).backward()
    _, ref_grads = oracle(x, y, s, "l2", 1.0, "mean", torch.tensor(1.25))
    for t, ref, name in zip((x, y, s), ref_grads, ("input", "target", "log_var")):
        assert_close(t.grad, ref, torch.float64, f"accumulated grad {name}")


# --------------------------------------------------------------------------------------------
# Broadcasting, beta == 0, empty tensors, special values


BROADCAST_SHAPES = [
    pytest.param(((4, 1, 5), (3, 5), (1,)), id="in4x1x5-tg3x5-lv1"),
    pytest.param(((3, 5), (3, 5), (3, 1)), id="lv-per-row"),
    pytest.param(((6, 1), (6,), (6, 6)), id="in6x1-tg6-lv6x6"),
    pytest.param(((2, 3), (2, 3), ()), id="lv-scalar"),
]


@pytest.mark.parametrize("shapes", BROADCAST_SHAPES)
@pytest.mark.parametrize("dtype", dtype_params((torch.float64, torch.float32, torch.bfloat16)))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_broadcast(backend, reduction, dtype, shapes):
    """Operands broadcast like torch.broadcast_tensors; each gradient has its operand's shape,
    summed over the broadcast dimensions as autograd does."""
    x, _, _ = make_problem(shapes[0], dtype, seed=3)
    _, y, _ = make_problem(shapes[1], dtype, seed=4)
    s = make_log_var(shapes[2], dtype, seed=6)
    loss, grads = check_against_oracle(x, y, s, "l2", 1.0, reduction)
    assert loss.shape == (torch.broadcast_shapes(*shapes) if reduction == "none" else ())
    assert [g.shape for g in grads] == [x.shape, y.shape, s.shape]


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_smooth_l1_beta_zero_is_l1(backend, reduction, dtype):
    x, y, s = make_problem((1023,), dtype)
    results = []
    for kind, beta in (("smooth_l1", 0.0), ("l1", 1.0)):
        xf, yf, sf = leaves(x, y, s)
        loss = fused(xf, yf, sf, kind, beta, reduction)
        results.append((loss.detach(), *torch.autograd.grad(loss, (xf, yf, sf), make_g(loss))))
    for a, b, name in zip(*results, ("loss", "grad input", "grad target", "grad log_var")):
        assert_bitwise(a, b, f"smooth_l1(beta=0) vs l1: {name}")


@pytest.mark.parametrize("shape", [(0,), (3, 0)], ids=str)
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("kind, beta", CASES[:3], ids=CASE_IDS[:3])
def test_empty(backend, kind, beta, dtype, shape):
    x, y, s = leaves(*(torch.empty(shape, dtype=dtype) for _ in range(3)))
    none = fused(x, y, s, kind, beta, "none")
    assert none.shape == shape and none.dtype == dtype
    mean = fused(x, y, s, kind, beta, "mean")
    assert mean.shape == () and mean.dtype == dtype and mean.isnan()  # as torch's mean of nothing
    total = fused(x, y, s, kind, beta, "sum")
    assert total.shape == () and total.dtype == dtype and total.item() == 0.0
    for loss in (none, mean, total):
        grads = torch.autograd.grad(loss, (x, y, s), torch.ones_like(loss))
        assert all(g.shape == shape and g.dtype == dtype for g in grads)


SPECIAL_D = (0.0, -0.0, 0.5, -2.0, 1.0, math.inf, -math.inf, math.nan)
SPECIAL_S = (0.0, 1.5, -1.5, math.inf, -math.inf, math.nan)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind, beta", CASES[:4], ids=CASE_IDS[:4])
def test_nan_and_inf_propagate(backend, kind, beta, reduction, dtype):
    """Every pair of special differences (0, the kink, +-inf, NaN) and log-variances (+-inf, NaN):
    NaN and inf in the loss and the gradients exactly where the oracle has them."""
    d = torch.tensor(SPECIAL_D, dtype=torch.float64)
    s = torch.tensor(SPECIAL_S, dtype=torch.float64)
    x = d.repeat_interleave(len(s)).to(dtype)
    lv = s.repeat(len(d)).to(dtype)
    y = torch.zeros_like(x)
    check_against_oracle(x, y, lv, kind, beta, reduction)


# --------------------------------------------------------------------------------------------
# Errors


def test_errors(backend):
    x, y, s = make_problem((7,), torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        fused(x, y, s, "l2", 1.0, "avg")
    with pytest.raises(ValueError, match="huber"):
        fused(x, y, s, "huber", 1.0, "mean")
    with pytest.raises(RuntimeError, match="negative values for beta"):
        fused(x, y, s, "smooth_l1", -0.5, "mean")
    with pytest.raises(RuntimeError, match="same device"):
        fused(x, y, s.to("meta"), "l2", 1.0, "mean")
    with pytest.raises(RuntimeError, match="size"):
        fused(x, y, torch.zeros(3), "l2", 1.0, "mean")
    ints = [
        torch.tensor([1, 2, 3], dtype=dtype) for dtype in (torch.int64, torch.int32, torch.int16)
    ]
    with pytest.raises(NotImplementedError, match="not implemented for 'torch.int64'"):
        fused(*ints, "l1", 1.0, "sum")
    # an integer operand next to a floating one promotes, as torch's binary ops do
    assert fused(x[:3], ints[0], s[:3], "l1", 1.0, "sum").dtype == torch.float32


def test_op_errors():
    """The compiled ops check their own arguments (shapes and dtypes are the caller's job)."""
    x, y, s = make_problem((7,), torch.float32)
    op = torch.ops.fusedmtl.heteroscedastic_loss
    with pytest.raises(RuntimeError, match="unknown heteroscedastic loss kind 'huber'"):
        op(x, y, s, "huber", 1.0, 1)
    with pytest.raises(RuntimeError, match="log_var of the same shape"):
        op(x, y, s[:3], "l2", 1.0, 1)
    with pytest.raises(RuntimeError, match="log_var of the same dtype"):
        op(x, y, s.double(), "l2", 1.0, 1)
    with pytest.raises(RuntimeError, match="negative values for beta"):
        op(x, y, s, "smooth_l1", -1.0, 1)
    with pytest.raises(RuntimeError, match="reduction"):
        op(x, y, s, "l2", 1.0, 3)


# --------------------------------------------------------------------------------------------
# GaussianNLLLoss, the nn module


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_l2_is_gaussian_nll(backend, reduction):
    """'l2' == torch.nn.GaussianNLLLoss(full=False) with var = exp(log_var) (eps below any var)."""
    x, y, s = make_problem((64, 3), torch.float64)
    xf, yf, sf = leaves(x, y, s)
    xt, yt, st = leaves(x, y, s)
    loss = fused(xf, yf, sf, "l2", 1.0, reduction)
    expected = torch.nn.GaussianNLLLoss(full=False, eps=1e-300, reduction=reduction)(
        xt, yt, st.exp()
    )
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    g = make_g(loss)
    for got, exp in zip(
        torch.autograd.grad(loss, (xf, yf, sf), g), torch.autograd.grad(expected, (xt, yt, st), g)
    ):
        torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12)


def test_nn_module(backend):
    module = fusedmtl.nn.HeteroscedasticLoss(kind="smooth_l1", beta=0.5, reduction="sum")
    assert repr(module) == "HeteroscedasticLoss(kind='smooth_l1', beta=0.5, reduction='sum')"
    assert list(module.parameters()) == []
    x, y, s = make_problem((1023,), torch.float32)
    assert_bitwise(module(x, y, s), fused(x, y, s, "smooth_l1", 0.5, "sum"), "module vs functional")
    assert fusedmtl.nn.HeteroscedasticLoss()(x, y, s).shape == ()  # defaults: 'l2', 'mean'


# --------------------------------------------------------------------------------------------
# gradcheck, gradgradcheck (float64; double backward runs the reference gradient formula)


def away_from_kinks(shape, beta, seed=5):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(shape, generator=gen, dtype=torch.float64)
    magnitude = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 + 0.1
    magnitude = torch.where((magnitude - beta).abs() < 0.05, magnitude + 0.1, magnitude)
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    return y + sign * magnitude, y, make_log_var(shape, torch.float64, seed=seed)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind, beta", CASES[:5], ids=CASE_IDS[:5])
def test_gradcheck(backend, kind, beta, reduction):
    operands = leaves(*away_from_kinks((2, 3), beta))
    fn = functools.partial(fused, kind=kind, beta=beta, reduction=reduction)
    assert torch.autograd.gradcheck(fn, operands)
    if (
        backend != "triton"
    ):  # its double backward is the reference formula too; the interpreter is slow
        assert torch.autograd.gradgradcheck(fn, operands)


# --------------------------------------------------------------------------------------------
# The compiled ops: consistency, torch.compile (opcheck: test_opcheck.py)


OP_CASES = [("l2", 1.0), ("l1", 1.0), ("smooth_l1", 2.5)]


def _op_inputs(dtype=torch.float32):
    return make_problem((5, 7), dtype, seed=11)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("reduction", [1, 2])
@pytest.mark.parametrize("kind, beta", OP_CASES)
def test_ops_agree(kind, beta, reduction, dtype):
    """with_grad's loss and gradients == the forward op's loss and the backward op's gradients at
    grad_output 1; the reduced loss == the reduction of the element-wise one, in the compute
    type."""
    x, y, s = _op_inputs(dtype)
    ops = torch.ops.fusedmtl
    loss = ops.heteroscedastic_loss(x, y, s, kind, beta, reduction)
    loss2, gx, gs = ops.heteroscedastic_loss_with_grad(x, y, s, kind, beta, reduction, True, True)
    bx, bs = ops.heteroscedastic_loss_backward(
        torch.ones(()), x, y, s, kind, beta, reduction, True, True
    )
    assert_bitwise(loss2, loss, "with_grad loss")
    assert_bitwise(bx, gx, "backward vs with_grad: input")
    assert_bitwise(bs, gs, "backward vs with_grad: log_var")
    per_element = ops.heteroscedastic_loss(x, y, s, kind, beta, 0)
    _, gs_none = ops.heteroscedastic_loss_backward(
        torch.ones_like(per_element) / (x.numel() if reduction == 1 else 1),
        x,
        y,
        s,
        kind,
        beta,
        0,
        False,
        True,
    )
    assert_close(gs, gs_none.double(), dtype, "reduced vs element-wise grad_output")


@pytest.mark.compile
@pytest.mark.parametrize("backend_name", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("kind, beta", [("l2", 1.0), ("smooth_l1", 0.5)])
def test_torch_compile(kind, beta, backend_name):
    torch._dynamo.reset()
    try:

        def fn(a, b, c):
            return fusedmtl.heteroscedastic_loss(a * 1.5, b, c, kind=kind, beta=beta)

        compiled = torch.compile(fn, fullgraph=True)
        x, y, s = make_problem((9, 13), torch.float32, seed=13)
        xc, yc, sc = leaves(x, y, s)
        with fusedmtl.backend.use(backend_name):
            loss = compiled(xc, yc, sc)
        ref, ref_grads = oracle(x * 1.5, y, s, kind, beta, "mean")
        assert_close(loss.detach(), ref, torch.float32, "compiled loss")
        grads = torch.autograd.grad(loss, (xc, yc, sc))
        assert_close(grads[0], ref_grads[0] * 1.5, torch.float32, "compiled grad input")
        assert_close(grads[1], ref_grads[1], torch.float32, "compiled grad target")
        assert_close(grads[2], ref_grads[2], torch.float32, "compiled grad log_var")
    finally:
        torch._dynamo.reset()


def test_torch_func_grad(backend):
    x, y, s = make_problem((1023,), torch.float64)
    got = torch.func.grad(lambda a, c: fused(a, y, c, "l1", 1.0, "mean"), argnums=(0, 1))(x, s)
    _, ref_grads = oracle(x, y, s, "l1", 1.0, "mean")
    assert_close(got[0], ref_grads[0], torch.float64, "func.grad input")
    assert_close(got[1], ref_grads[2], torch.float64, "func.grad log_var")


# --------------------------------------------------------------------------------------------
# Determinism: thread count and CPU instruction set (native kernels)


def _loss_and_grads(kind, beta, reduction, x, y, s):
    xf, yf, sf = leaves(x, y, s)
    loss = fused(xf, yf, sf, kind, beta, reduction)
    fast = torch.autograd.grad(loss, (xf, sf), retain_graph=True)  # grad_output 1: the fast path
    again = torch.autograd.grad(loss, (xf, sf), torch.tensor(0.75))  # the backward op
    return loss.detach(), *fast, *again


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind, beta", [("l2", 1.0), ("smooth_l1", 2.5)])
def test_thread_count_determinism(kind, beta, reduction, restore_num_threads):
    x, y, s = make_problem((300_007,), torch.float32, seed=17)
    with fusedmtl.backend.use("native"):
        torch.set_num_threads(1)
        one = _loss_and_grads(kind, beta, reduction, x, y, s)
        torch.set_num_threads(2)
        two = _loss_and_grads(kind, beta, reduction, x, y, s)
    for a, b, name in zip(
        one, two, ("loss", "fast grad input", "fast grad log_var", "grad input", "grad log_var")
    ):
        assert_bitwise(b, a, f"{name}: 2 threads vs 1")


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("kind, beta", OP_CASES)
@pytest.mark.parametrize("capability", ["avx2", "avx512"])
def test_cpu_capability_parity(capability, kind, beta, dtype, restore_cpu_capability):
    """Every instruction set's kernel gives the default one's results bit for bit (the CPU exp is
    plain arithmetic, rounded the same everywhere)."""
    x, y, s = make_problem((4099,), dtype, seed=23)
    with fusedmtl.backend.use("native"):
        fusedmtl._C.set_cpu_capability("default")
        baseline = [_loss_and_grads(kind, beta, r, x, y, s) for r in REDUCTIONS[1:]]
        baseline.append(fused(x, y, s, kind, beta, "none"))
        fusedmtl._C.set_cpu_capability(capability)
        results = [_loss_and_grads(kind, beta, r, x, y, s) for r in REDUCTIONS[1:]]
        results.append(fused(x, y, s, kind, beta, "none"))
    for a, b in zip(
        torch.utils._pytree.tree_leaves(results), torch.utils._pytree.tree_leaves(baseline)
    ):
        assert_bitwise(a, b, f"{fusedmtl._C.cpu_capability()} vs default")
