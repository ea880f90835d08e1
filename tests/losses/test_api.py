"""The regression losses' API against torch.nn.functional's: nn modules, errors (same exception
type, informative message), legacy size_average/reduce, weight=, dtype rules."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from loss_helpers import (
    EXACT,
    check_grad,
    check_loss,
    grad_output_for,
    leaves,
    make_layout,
)

import fusedmtl
import fusedmtl.nn
from tests.helpers import (
    CORE_CASES,
    DEFAULT_CASES,
    REDUCTIONS,
    LossCase,
    assert_bitwise,
    assert_close_to_ref,
    assert_ulp,
    case_params,
    dtype_params,
)

# --------------------------------------------------------------------------------------------
# torch.nn modules


MODULES = [
    pytest.param("SmoothL1Loss", {}, id="SmoothL1Loss"),
    pytest.param("SmoothL1Loss", {"beta": 0.5}, id="SmoothL1Loss-beta0.5"),
    pytest.param("SmoothL1Loss", {"beta": 0.0}, id="SmoothL1Loss-beta0"),
    pytest.param("HuberLoss", {}, id="HuberLoss"),
    pytest.param("HuberLoss", {"delta": 2.5}, id="HuberLoss-delta2.5"),
    pytest.param("L1Loss", {}, id="L1Loss"),
    pytest.param("MSELoss", {}, id="MSELoss"),
]


@pytest.mark.parametrize("dtype", dtype_params(EXACT + (torch.bfloat16,)))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name, kwargs", MODULES)
def test_nn_modules(backend, name, kwargs, reduction, dtype):
    ours = getattr(fusedmtl.nn, name)(reduction=reduction, **kwargs)
    theirs = getattr(torch.nn, name)(reduction=reduction, **kwargs)
    assert isinstance(ours, getattr(torch.nn, name))
    assert repr(ours) == repr(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    op = {"SmoothL1Loss": "smooth_l1", "HuberLoss": "huber", "L1Loss": "l1", "MSELoss": "mse"}[name]
    param = kwargs.get("beta", kwargs.get("delta", 1.0)) if op in ("smooth_l1", "huber") else None
    case = LossCase(op, param)

    x, y = make_layout("n1023", dtype)
    xf, yf = leaves(x, y)
    xt, yt = leaves(x, y)
    loss = ours(xf, yf)
    expected = theirs(xt, yt)
    check_loss(case, reduction, x, y, loss, expected)
    assert_bitwise(loss.detach(), case.fused(x, y, reduction), "module vs functional")
    g = grad_output_for(expected, "random")
    loss.backward(g)
    expected.backward(g)
    check_grad(case, reduction, x, y, g, xf.grad, xt.grad, False, "grad input")


@pytest.mark.parametrize("name", ["SmoothL1Loss", "L1Loss", "MSELoss"])
def test_nn_modules_legacy_arguments(backend, name):
    with pytest.warns(UserWarning):
        ours = getattr(fusedmtl.nn, name)(size_average=False)
    with pytest.warns(UserWarning):
        theirs = getattr(torch.nn, name)(size_average=False)
    assert ours.reduction == theirs.reduction == "sum"
    x, y = make_layout("n7", torch.float64)
    assert_close_to_ref(ours(x, y), theirs(x, y), rtol=1e-12, what="legacy module")


# --------------------------------------------------------------------------------------------
# Errors, same exception type as torch with an informative message


def _raises_like_torch(fused_call, torch_call, match=None):
    with pytest.raises(Exception) as torch_error:
        torch_call()
    with pytest.raises(type(torch_error.value)) as fused_error:
        fused_call()
    assert type(fused_error.value) is type(torch_error.value), (
        f"fusedmtl raised {type(fused_error.value).__name__}, torch "
        f"{type(torch_error.value).__name__}"
    )
    if match is not None:
        assert match in str(fused_error.value), str(fused_error.value)
    return fused_error.value


@pytest.mark.parametrize("beta", [-1.0, -1e-12, -math.inf])
def test_negative_beta(backend, beta):
    x, y = make_layout("n7", torch.float32)
    _raises_like_torch(
        lambda: fusedmtl.smooth_l1_loss(x, y, beta=beta),
        lambda: F.smooth_l1_loss(x, y, beta=beta),
        match="negative values for beta",
    )


@pytest.mark.parametrize("delta", [0.0, -0.0, -1.0, -math.inf])
def test_non_positive_delta(backend, delta):
    x, y = make_layout("n7", torch.float32)
    _raises_like_torch(
        lambda: fusedmtl.huber_loss(x, y, delta=delta),
        lambda: F.huber_loss(x, y, delta=delta),
        match="non-positive values for delta",
    )


@pytest.mark.parametrize("reduction", ["avg", "", "MEAN", "elementwise_mean_typo"])
@pytest.mark.parametrize("case", case_params(DEFAULT_CASES))
def test_unknown_reduction(backend, case, reduction):
    x, y = make_layout("n7", torch.float32)
    error = _raises_like_torch(
        lambda: case.fused(x, y, reduction), lambda: case.torch(x, y, reduction)
    )
    assert isinstance(error, ValueError)
    assert repr(reduction)[1:-1] in str(error) and "reduction" in str(error)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("int_dtype", [torch.int64, torch.int32, torch.int16], ids=str)
@pytest.mark.parametrize("case", case_params(DEFAULT_CASES))
def test_integer_inputs(backend, case, int_dtype, reduction):
    x = torch.tensor([1, -2, 3, 7], dtype=int_dtype)
    y = torch.tensor([3, 1, -2, 7], dtype=int_dtype)
    if case.op == "l1" and reduction != "mean":
        got, expected = case.fused(x, y, reduction), case.torch(x, y, reduction)
        assert got.dtype == expected.dtype  # int_dtype for 'none', int64 for 'sum'
        assert not got.dtype.is_floating_point
        assert torch.equal(got, expected)
        return
    error = _raises_like_torch(
        lambda: case.fused(x, y, reduction), lambda: case.torch(x, y, reduction)
    )
    if case.op == "l1":  # mean of integers
        assert isinstance(error, RuntimeError) and "mean" in str(error)
    else:
        assert isinstance(error, NotImplementedError)
        assert "not implemented" in str(error) and case.op in str(error)
        assert "Long" in str(error) or "int" in str(error)


@pytest.mark.parametrize("case", case_params(DEFAULT_CASES))
def test_integer_input_float_target(backend, case):
    """An integer input with a float target: torch promotes for l1/mse/smooth_l1; huber works in
    input's dtype and torch raises RuntimeError (float result cannot be cast to Long)."""
    x = torch.tensor([1, -2, 3, 7])
    y = torch.tensor([0.5, 1.0, -2.0, 7.25])
    if case.op == "huber":
        _raises_like_torch(lambda: case.fused(x, y), lambda: case.torch(x, y))
        return
    got, expected = case.fused(x, y), case.torch(x, y)
    assert got.dtype == expected.dtype
    assert_bitwise(got, expected, "loss of int input and float target")


@pytest.mark.parametrize("case", case_params(DEFAULT_CASES))
def test_device_mismatch(backend, case):
    x = torch.randn(3)
    y = torch.randn(3, device="meta")
    error = _raises_like_torch(lambda: case.fused(x, y), lambda: case.torch(x, y))
    assert isinstance(error, RuntimeError)
    assert "meta" in str(error) and "cpu" in str(error)


@pytest.mark.parametrize("case", case_params(DEFAULT_CASES))
def test_incompatible_shapes(backend, case):
    x, y = torch.randn(4, 2, 5), torch.randn(3, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        error = _raises_like_torch(lambda: case.fused(x, y), lambda: case.torch(x, y))
    assert isinstance(error, RuntimeError) and "size" in str(error)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", case_params(DEFAULT_CASES))
def test_meta_tensors(case, reduction):
    """Both on 'meta' (no native kernels there): the automatic choice falls back and gives torch's
    shape and dtype."""
    x = torch.empty(4, 3, device="meta")
    y = torch.empty(4, 3, device="meta")
    got, expected = case.fused(x, y, reduction), case.torch(x, y, reduction)
    assert got.device.type == "meta" and got.shape == expected.shape and got.dtype == expected.dtype


# --------------------------------------------------------------------------------------------
# Deprecated size_average / reduce


LEGACY = [
    (size_average, reduce)
    for size_average in (None, True, False)
    for reduce in (None, True, False)
    if (size_average, reduce) != (None, None)
]


@pytest.mark.parametrize("size_average, reduce", LEGACY, ids=[f"sa{a}-r{b}" for a, b in LEGACY])
@pytest.mark.parametrize(
    "case",
    case_params(
        [LossCase("smooth_l1", 1.0), LossCase("smooth_l1", 0.5), LossCase("l1"), LossCase("mse")]
    ),
)
def test_legacy_size_average_reduce(backend, case, size_average, reduce):
    x, y = make_layout("n1023", torch.float32)
    # reduction='sum' passed too: the legacy arguments take precedence, as in torch
    with pytest.warns(UserWarning, match="deprecated"):
        got = case.fused(x, y, "sum", size_average=size_average, reduce=reduce)
    with pytest.warns(UserWarning, match="deprecated"):
        expected = case.torch(x, y, "sum", size_average=size_average, reduce=reduce)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    if expected.dim():
        assert_bitwise(got, expected, "legacy reduction none")
    else:
        assert_close_to_ref(got, expected, rtol=1e-5, what="legacy reduction")


# --------------------------------------------------------------------------------------------
# weight=


@pytest.mark.parametrize("dtype", dtype_params(EXACT))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "case",
    case_params([LossCase("huber", 1.0), LossCase("huber", 0.5), LossCase("l1"), LossCase("mse")]),
)
def test_weight(backend, case, reduction, dtype):
    x, y = make_layout("n1023", dtype)
    w = torch.rand(x.shape, dtype=dtype) * 2
    xf, yf, wf = leaves(x, y, w)
    xt, yt, wt = leaves(x, y, w)
    loss = case.fused(xf, yf, reduction, weight=wf)
    expected = case.torch(xt, yt, reduction, weight=wt)
    assert loss.dtype == expected.dtype and loss.shape == expected.shape
    rtol = 1e-6 if dtype == torch.float32 else 1e-12
    if reduction == "none":
        assert_ulp(loss, expected, 1, "weighted loss")
    else:
        assert_close_to_ref(loss, expected, rtol=rtol, what="weighted loss")
    g = grad_output_for(expected, "random")
    got_grads = torch.autograd.grad(loss, (xf, yf, wf), g)
    expected_grads = torch.autograd.grad(expected, (xt, yt, wt), g)
    for a, b, name in zip(got_grads, expected_grads, ("input", "target", "weight")):
        assert_close_to_ref(a, b, rtol=rtol, atol=rtol * float(b.abs().max()), what=f"grad {name}")


@pytest.mark.parametrize("weight_shape", [(1022,), (1, 1023), (1,)], ids=str)
@pytest.mark.parametrize(
    "case", case_params([LossCase("huber", 1.0), LossCase("l1"), LossCase("mse")])
)
def test_weight_of_wrong_size(backend, case, weight_shape):
    x, y = make_layout("n1023", torch.float32)
    w = torch.ones(weight_shape)
    error = _raises_like_torch(
        lambda: case.fused(x, y, weight=w), lambda: case.torch(x, y, weight=w)
    )
    assert isinstance(error, ValueError) and "same size" in str(error)


# --------------------------------------------------------------------------------------------
# dtype rules


DTYPE_RULES = [
    pytest.param(torch.float32, (5,), torch.float64, (5,), id="f32-f64"),
    pytest.param(torch.float64, (5,), torch.float32, (5,), id="f64-f32"),
    pytest.param(torch.float16, (5,), torch.float32, (5,), id="f16-f32"),
    pytest.param(torch.bfloat16, (5,), torch.float16, (5,), id="bf16-f16"),
    pytest.param(torch.float32, (5,), torch.int64, (5,), id="f32-i64"),
    pytest.param(torch.float32, (5,), torch.float64, (), id="f32-0dim_f64"),
    pytest.param(torch.float64, (), torch.float32, (5,), id="0dim_f64-f32"),
    pytest.param(torch.float16, (5,), torch.float32, (), id="f16-0dim_f32"),
    pytest.param(torch.float32, (), torch.float64, (), id="0dim_f32-0dim_f64"),
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("in_dtype, in_shape, tg_dtype, tg_shape", DTYPE_RULES)
@pytest.mark.parametrize("case", case_params(CORE_CASES))
def test_dtype_rules(backend, case, reduction, in_dtype, in_shape, tg_dtype, tg_shape):
    """The result dtype (and value) of mixed-dtype arguments is torch's: huber computes in input's
    dtype, the others in the promoted dtype of the broadcast arguments."""
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(in_shape, generator=gen, dtype=torch.float64) * 2).to(in_dtype)
    y = (torch.randn(tg_shape, generator=gen, dtype=torch.float64) * 2).to(tg_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the broadcasting warning of the 0-dim cases
        got = case.fused(x, y, reduction)
        expected = case.torch(x, y, reduction)
    assert got.dtype == expected.dtype, f"result dtype {got.dtype}, torch gives {expected.dtype}"
    assert got.shape == expected.shape
    rtol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(expected.dtype, 4 * 2.0**-7)
    assert_close_to_ref(got, expected, rtol=rtol, atol=rtol, what="value")
