"""fusedmtl.multi_tensor (python/fusedmtl/multi_tensor, csrc/multi_tensor) against float64 torch
computations of METHODS.md sections 2 (L1/L2 penalty) and 4 (the Gramian view).

The oracle is built here from plain torch: the K task gradients are flattened, concatenated and
converted to float64 (None entries as zeros) into a K x N matrix D; then norms = |D_i|,
gramian = D D^T, combine = c^T D, penalty = l1 sum|w| + l2 sum w^2.

Precision contract checked here (u = 2**-24 for float32/float16/bfloat16 inputs, which accumulate
in float32; u = 2**-53 for float64):
- norms, gramian, penalty: float32 results for float32/float16/bfloat16 inputs, float64 for float64;
  within rtol 1e-5 (1e-12 for float64) of the float64 value of the same (low-precision) inputs,
  relative to the sum of the absolute values of the products (|D| |D|^T for the gramian).
- gramian exactly symmetric; its diagonal equal to norms**2.
- combine: the grads' dtype; within 1 ulp (float16/bfloat16) or 2 ulps (float32/float64) of the
  float64 result rounded to the dtype, plus the error an accumulation of the K products in
  precision u cannot avoid under cancellation, (K + 2) u sum_i |c_i g_i|.
- normalized_sum: combine with c_i = 1 / (norm_i + eps) of the norms it returns; within rtol 1e-5
  (1e-12) of the float64 normalised sum relative to sum_i |g_i| / (norm_i + eps).
- native backend: bitwise the same results for 1 and 2 threads and for every CPU capability.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedmtl
import fusedmtl._C
import fusedmtl.multi_tensor as mt
from conftest import BACKENDS, assert_bitwise, dtype_params, smallest_subnormal

PRECISION = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}
LOW_PRECISION = (torch.float16, torch.bfloat16)
# Magnitudes of the tasks (task i is scaled by SCALES[i % 8]): the norms differ by orders of magnitude.
SCALES = (1.0, 0.01, 30.0, 1e-3, 3.0, 0.2, 7.0, 0.05)
CAPABILITIES = ("default", "avx2", "avx512")
_CAPABILITY_ORDER = {name: i for i, name in enumerate(CAPABILITIES)}


def result_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff of the accumulation: float32 for float32/float16/bfloat16, float64 for float64."""
    return 2.0**-53 if dtype == torch.float64 else 2.0**-24


def reduce_rtol(dtype: torch.dtype) -> float:
    return 1e-12 if dtype == torch.float64 else 1e-5


# --------------------------------------------------------------------------------------------
# Problems: K task gradient lists over P parameters


class Problem:
    """K x P task gradients (Tensor or None) and the P parameter shapes. Cached: tests must not
    modify the tensors (``lists()`` hands out fresh outer lists)."""

    def __init__(self, shapes, grads, dtype):
        self.shapes = [tuple(s) for s in shapes]
        self.grads = [list(row) for row in grads]
        self.dtype = dtype
        self.K = len(self.grads)
        self.P = len(self.shapes)
        self.numels = [math.prod(s) for s in self.shapes]
        self.offsets = [0]
        for n in self.numels:
            self.offsets.append(self.offsets[-1] + n)
        # a parameter some task reaches
        self.reached = [any(row[p] is not None for row in self.grads) for p in range(self.P)]

    def __repr__(self):
        rows = [" ".join("None" if t is None else
                         f"{tuple(t.shape)}{'' if t.is_contiguous() else 'nc'}{'0' if not t.any() else ''}"
                         for t in row) for row in self.grads]
        return f"Problem({self.dtype}, K={self.K}, P={self.P}, shapes={self.shapes}, tasks={rows})"

    def lists(self, kind=list):
        return kind(kind(row) for row in self.grads)

    @functools.cached_property
    def dense64(self) -> torch.Tensor:
        """[K, N] float64: each task's gradient flattened (logical order), None as zeros."""
        rows = []
        for row in self.grads:
            parts = []
            for p, t in enumerate(row):
                if t is None:
                    parts.append(torch.zeros(self.numels[p], dtype=torch.float64))
                else:
                    assert tuple(t.shape) == self.shapes[p]
                    parts.append(t.detach().double().reshape(-1))
            rows.append(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64))
        return torch.stack(rows)

    @functools.cached_property
    def gramian64(self):
        d = self.dense64
        return d @ d.T, d.abs() @ d.abs().T

    @functools.cached_property
    def norms64(self):
        d = self.dense64
        return (d * d).sum(dim=1).sqrt()

    def combine64(self, coeffs64: torch.Tensor):
        """(sum_i c_i g_i, sum_i |c_i g_i|) over the N elements, float64."""
        c = coeffs64.double().reshape(self.K, 1)
        prod = c * self.dense64
        return prod.sum(dim=0), prod.abs().sum(dim=0)

    def piece(self, flat: torch.Tensor, p: int) -> torch.Tensor:
        return flat[self.offsets[p]:self.offsets[p + 1]]


def _values(shape, dtype, gen, scale, zero_fraction=0.0):
    v = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    if zero_fraction:
        v = torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < zero_fraction, 0.0, v)
    return v.to(dtype)


def build_problem(shapes, K, dtype, seed=0, present=None, zero_tasks=(), views=None):
    """present(i, p) -> bool says whether task i reaches parameter p; zero_tasks have all-zero
    gradients; views[p], if given, maps a freshly generated base tensor to the (non-contiguous)
    view that is handed to the API (shapes[p] is the base shape then)."""
    gen = torch.Generator().manual_seed(seed)
    grads, final_shapes = [], None
    for i in range(K):
        row = []
        for p, shape in enumerate(shapes):
            if present is not None and not present(i, p):
                row.append(None)
                continue
            t = _values(shape, dtype, gen, SCALES[i % len(SCALES)])
            if i in zero_tasks:
                t = torch.zeros_like(t)
            if views is not None and views[p] is not None:
                t = views[p](t)
            row.append(t)
        grads.append(row)
    if views is None:
        final_shapes = shapes
    else:
        final_shapes = [tuple(views[p](torch.empty(s)).shape) if views[p] else s
                        for p, s in enumerate(shapes)]
    return Problem(final_shapes, grads, dtype)


def _tiny_shapes(n=300, seed=3):
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 8, (n,), generator=gen).tolist()
    forms = torch.randint(0, 3, (n,), generator=gen).tolist()
    return [((s,), (1, s), (s, 1))[f] for s, f in zip(sizes, forms)]


# pattern of the 'none' layout (K = 4, P = 6): parameter 2 is reached by no task, task 3 by none
_NONE_PATTERN = (
    (1, 0, 0, 1, 1, 1),
    (1, 1, 0, 0, 1, 1),
    (0, 1, 0, 1, 1, 0),
    (0, 0, 0, 0, 0, 0),
)

_NONCONTIG_VIEWS = (
    ((37, 45), lambda t: t.t()),                 # transposed
    ((3 * 1001,), lambda t: t[::3]),             # 1-D step
    ((24, 66), lambda t: t[:, 1::2]),            # 2-D column step, storage offset
    ((1, 5), lambda t: t.expand(4, 5)),          # stride 0
    ((6, 5, 4), lambda t: t.permute(2, 0, 1)),   # permuted 3-D
    ((10,), None),                               # contiguous
)

LAYOUTS = ("tiny", "odd", "big", "edge", "none", "noncontig", "zero_task")
TRITON_TOO_SLOW = ("big",)  # 2**20 elements under the Triton interpreter
# The Triton interpreter spends tens of ms per parameter: 'tiny' has 300 parameters, 12 for triton.
TINY_P = 300
TINY_P_TRITON = 12


def problem_for(layout: str, dtype: torch.dtype, backend: str | None = None) -> Problem:
    return layout_problem(layout, dtype, backend == "triton")


@functools.lru_cache(maxsize=None)
def layout_problem(layout: str, dtype: torch.dtype, interpreted: bool = False) -> Problem:
    if layout == "tiny":  # many tiny tensors (1..7 elements)
        return build_problem(_tiny_shapes(TINY_P_TRITON if interpreted else TINY_P), 3, dtype, seed=1)
    if layout == "odd":
        return build_problem([(1,), (3,), (1023,), (100_003,)], 4, dtype, seed=2)
    if layout == "big":  # a 2**20 + 3 tensor among tiny ones
        return build_problem([(5,), (2**20 + 3,), (1,), (3, 7), (2,)], 2, dtype, seed=3)
    if layout == "edge":  # empty tensors and a 0-dim one
        return build_problem([(0,), (4,), (), (3, 0), (17,), (0, 5), (1,)], 3, dtype, seed=4)
    if layout == "none":
        return build_problem([(5,), (31,), (2, 3), (1023,), (7,), (1,)], 4, dtype, seed=5,
                             present=lambda i, p: bool(_NONE_PATTERN[i][p]))
    if layout == "noncontig":
        shapes = [s for s, _ in _NONCONTIG_VIEWS]
        views = [v for _, v in _NONCONTIG_VIEWS]
        prob = build_problem(shapes, 3, dtype, seed=6, views=views)
        assert all(not t.is_contiguous() for t in prob.grads[0][:5])
        return prob
    if layout == "zero_task":  # task 1 has an all-zero gradient
        return build_problem([(7,), (1023,), (2, 5)], 3, dtype, seed=7, zero_tasks=(1,))
    raise ValueError(layout)


def skip_slow_for_triton(backend, layout):
    if backend == "triton" and layout in TRITON_TOO_SLOW:
        pytest.skip("2**20 elements under the Triton interpreter")


def random_coeffs(K, seed=11):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(K, generator=gen, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# Comparisons


def ulp_in(dtype: torch.dtype, x64: torch.Tensor) -> torch.Tensor:
    """The spacing of ``dtype`` at the (float64) values x64, subnormals included."""
    _, exponent = torch.frexp(x64)
    ulp = torch.ldexp(torch.ones_like(x64), exponent - PRECISION[dtype])
    tiny = smallest_subnormal(dtype)
    return torch.where(x64 == 0, torch.full_like(x64, tiny), ulp.clamp(min=tiny))


def assert_near(got, ref64, slack64, max_ulp, what):
    """Element-wise |got - ref64| <= (max_ulp + 1/2) ulp + slack64 in float64, where ulp is the
    spacing of got's dtype: got within max_ulp ulps of ref64 rounded to the dtype, plus slack64.
    NaN in got fails."""
    __tracebackhide__ = True
    got64 = got.detach().double().reshape(-1)
    ref64 = ref64.reshape(-1)
    slack64 = slack64.reshape(-1) if isinstance(slack64, torch.Tensor) else slack64
    assert got64.shape == ref64.shape, f"{what}: {got64.shape} != {ref64.shape}"
    if got64.numel() == 0:
        return
    ulp = torch.maximum(ulp_in(got.dtype, ref64), ulp_in(got.dtype, got64.nan_to_num(0.0)))
    bound = (max_ulp + 0.5) * ulp + slack64
    err = (got64 - ref64).abs()
    bad = ~(err <= bound)
    if bool(bad.any()):
        excess = torch.where(bad, (err - bound).nan_to_num(math.inf), -math.inf)
        i = int(excess.argmax())
        bound_i = float(bound[i]) if bound.dim() else float(bound)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {got64.numel()} elements off; worst at flat index {i}: "
            f"got {float(got64[i])!r}, expected {float(ref64[i])!r} (float64), "
            f"error {float(err[i]):.3e} > allowed {bound_i:.3e}"
        )


def assert_rel(got, ref64, scale64, rtol, what):
    """|got - ref64| <= rtol * scale64 element-wise (scale64 >= |ref64|, e.g. sum of |products|)."""
    __tracebackhide__ = True
    err = (got.detach().double() - ref64).abs()
    bound = rtol * scale64
    bad = ~(err <= bound)
    if bool(bad.any()):
        i = int(torch.where(bad, (err - bound).nan_to_num(math.inf), -math.inf).reshape(-1).argmax())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} entries off; worst at flat index {i}: "
            f"got {got.detach().reshape(-1)[i].item()!r}, expected {ref64.reshape(-1)[i].item()!r}, "
            f"allowed error {bound.reshape(-1)[i].item():.3e}\ngot\n{got}\nexpected\n{ref64}"
        )


def check_norms(prob: Problem, got, what="norms"):
    __tracebackhide__ = True
    assert isinstance(got, torch.Tensor), f"{what}: {type(got)}"
    assert got.dtype == expected_result_dtype(prob), f"{what}: dtype {got.dtype}"
    assert tuple(got.shape) == (prob.K,), f"{what}: shape {tuple(got.shape)}"
    ref = prob.norms64
    assert_rel(got, ref, ref, reduce_rtol(prob.dtype), what)


def expected_result_dtype(prob: Problem) -> torch.dtype:
    # With every entry None no tensor carries a dtype: the result is float32, the default.
    if all(g is None for grads in prob.lists(list) for g in grads):
        return torch.float32
    return result_dtype(prob.dtype)


def check_gramian(prob: Problem, got, what="gramian"):
    __tracebackhide__ = True
    assert isinstance(got, torch.Tensor), f"{what}: {type(got)}"
    assert got.dtype == expected_result_dtype(prob), f"{what}: dtype {got.dtype}"
    assert tuple(got.shape) == (prob.K, prob.K), f"{what}: shape {tuple(got.shape)}"
    ref, scale = prob.gramian64
    assert_rel(got, ref, scale, reduce_rtol(prob.dtype), what)
    assert_bitwise(got, got.T.contiguous(), f"{what} symmetric")


def check_outputs(prob: Problem, outs, ref64, slack64, max_ulp, what, base=None, accumulate=False):
    """outs[p] against the flat float64 reference (and base[p], the values out held before)."""
    __tracebackhide__ = True
    assert len(outs) == prob.P, f"{what}: {len(outs)} outputs for {prob.P} parameters"
    for p in range(prob.P):
        o = outs[p]
        if not prob.reached[p]:
            if base is None:
                assert o is None, f"{what}: parameter {p} is reached by no task: expected None"
            elif accumulate:
                assert_bitwise(o, base[p], f"{what}: parameter {p} (reached by no task) unchanged")
            else:
                assert_bitwise(o, torch.zeros_like(base[p]), f"{what}: parameter {p} zeroed")
            continue
        assert o is not None, f"{what}: parameter {p}: None"
        assert o.dtype == prob.dtype, f"{what}: parameter {p}: dtype {o.dtype} != {prob.dtype}"
        assert tuple(o.shape) == prob.shapes[p], f"{what}: parameter {p}: shape {tuple(o.shape)}"
        ref_p, slack_p = prob.piece(ref64, p), prob.piece(slack64, p)
        if base is not None and accumulate:
            old = base[p].double().reshape(-1)
            # the sum may be rounded to the dtype once before it is added: one more ulp of it
            slack_p = slack_p + unit_roundoff(prob.dtype) * old.abs() * 2 + ulp_in(prob.dtype, ref_p)
            ref_p = ref_p + old
        assert_near(o, ref_p, slack_p, max_ulp, f"{what}: parameter {p}")


def combine_slack(prob, abs64, extra_roundings=2):
    return (prob.K + extra_roundings) * unit_roundoff(prob.dtype) * abs64


def combine_ulps(dtype):
    return 1 if dtype in LOW_PRECISION else 2


def check_combine(prob, coeffs64, outs, what="combine", base=None, accumulate=False):
    __tracebackhide__ = True
    ref, abs_ = prob.combine64(coeffs64)
    check_outputs(prob, outs, ref, combine_slack(prob, abs_), combine_ulps(prob.dtype), what,
                  base, accumulate)


def check_normalized_sum(prob, result, eps, what="normalized_sum", base=None, accumulate=False):
    __tracebackhide__ = True
    assert isinstance(result, tuple) and len(result) == 2, f"{what}: {type(result)}"
    outs, norms = result
    check_norms(prob, norms, f"{what} norms")
    # against the float64 normalised sum
    c64 = 1.0 / (prob.norms64 + eps)
    ref, abs_ = prob.combine64(c64)
    slack = reduce_rtol(prob.dtype) * abs_ + combine_slack(prob, abs_)
    check_outputs(prob, outs, ref, slack, combine_ulps(prob.dtype), f"{what} vs float64", base,
                  accumulate)
    # and exactly combine with c = 1 / (norms + eps) of the norms it returns (up to roundings)
    c_got = 1.0 / (norms.double() + eps)
    assert bool(torch.isfinite(c_got).all())
    ref, abs_ = prob.combine64(c_got)
    check_outputs(prob, outs, ref, combine_slack(prob, abs_, extra_roundings=4),
                  combine_ulps(prob.dtype), f"{what} vs combine(1 / (norms + eps))", base, accumulate)


# --------------------------------------------------------------------------------------------
# The helpers themselves


def test_oracle_helpers():
    x = torch.tensor([1.0, 1.5, 0.0, -3.0, 2.0**-30], dtype=torch.float64)
    assert ulp_in(torch.float16, x).tolist() == [2.0**-10, 2.0**-10, 2.0**-24, 2.0**-9, 2.0**-24]
    assert ulp_in(torch.float32, x)[0].item() == 2.0**-23
    assert ulp_in(torch.bfloat16, x)[3].item() == 2.0**-6
    one = torch.tensor([1.0], dtype=torch.float16)
    assert_near(one, torch.tensor([1.0 + 2.0**-10]), 0.0, 1, "one ulp")
    with pytest.raises(AssertionError):
        assert_near(one, torch.tensor([1.0 + 2.0**-8]), 0.0, 1, "four ulps")
    with pytest.raises(AssertionError):
        assert_near(torch.tensor([math.nan]), torch.tensor([1.0]), 1.0, 1, "nan")
    prob = layout_problem("none", torch.float64)
    assert prob.dense64.shape == (4, sum(prob.numels))
    assert prob.reached == [True, True, False, True, True, True]
    assert float(prob.norms64[3]) == 0.0
    noncontig = layout_problem("noncontig", torch.float32)
    assert noncontig.shapes[0] == (45, 37) and noncontig.shapes[3] == (4, 5)


# --------------------------------------------------------------------------------------------
# norms and gramian


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_norms_and_gramian(backend, layout, dtype):
    skip_slow_for_triton(backend, layout)
    prob = problem_for(layout, dtype, backend)
    norms = mt.norms(prob.lists())
    gram = mt.gramian(prob.lists())
    check_norms(prob, norms)
    check_gramian(prob, gram)
    # the diagonal of the gramian is norms**2
    rtol = 2 * reduce_rtol(dtype) + 4 * unit_roundoff(dtype)
    diag = gram.diagonal().double()
    assert_rel(norms.double() ** 2, diag, diag, rtol, "norms**2 vs gramian diagonal")
    if layout == "zero_task":
        assert float(norms[1]) == 0.0
        assert bool((gram[1] == 0).all()) and bool((gram[:, 1] == 0).all())
    if layout == "none":  # task 3 reaches nothing
        assert float(norms[3]) == 0.0 and bool((gram[3] == 0).all())


# --------------------------------------------------------------------------------------------
# combine


@pytest.mark.parametrize("coeff_kind", ["tensor", "list"])
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_combine(backend, layout, dtype, coeff_kind):
    skip_slow_for_triton(backend, layout)
    prob = problem_for(layout, dtype, backend)
    c = random_coeffs(prob.K)
    if coeff_kind == "tensor":
        coeffs = c.to(torch.float32)
        c = coeffs.double()
    else:
        coeffs = c.tolist()
    outs = mt.combine(prob.lists(), coeffs)
    check_combine(prob, c, outs)


@pytest.mark.parametrize(
    "coeff_kind", ["f16", "bf16", "f32", "f64", "list", "tuple", "ints_as_floats"]
)
@pytest.mark.parametrize("dtype", dtype_params())
def test_combine_coeff_types(backend, dtype, coeff_kind):
    """coeffs: a Tensor[K] of any float dtype, or a sequence of K floats."""
    prob = build_problem([(1,), (3,), (1023,), (2, 5)], 3, dtype, seed=21)
    c = random_coeffs(prob.K, seed=22)
    tensor_dtypes = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32,
                     "f64": torch.float64}
    if coeff_kind in tensor_dtypes:
        coeffs = c.to(tensor_dtypes[coeff_kind])
        c = coeffs.double()
    elif coeff_kind == "list":
        coeffs = c.tolist()
    elif coeff_kind == "tuple":
        coeffs = tuple(c.tolist())
    else:
        coeffs = [1.0, -2.0, 0.5]
        c = torch.tensor(coeffs, dtype=torch.float64)
    outs = mt.combine(prob.lists(), coeffs)
    check_combine(prob, c, outs)


def test_combine_float64_keeps_float64_coefficients(backend):
    """float64 grads with Python-float coefficients: no rounding of the coefficients to float32."""
    prob = build_problem([(257,)], 2, torch.float64, seed=23)
    coeffs = [1.0 / 3.0, math.pi]
    outs = mt.combine(prob.lists(), coeffs)
    check_combine(prob, torch.tensor(coeffs, dtype=torch.float64), outs)


def test_combine_single_task_is_scaling(backend):
    """K = 1, c = 1: the task's gradient itself (bitwise), for every dtype."""
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        prob = build_problem([(3,), (129,), (2, 2)], 1, dtype, seed=24)
        outs = mt.combine(prob.lists(), [1.0])
        for p, o in enumerate(outs):
            assert_bitwise(o, prob.grads[0][p], f"{dtype}: parameter {p}")
            assert o.data_ptr() != prob.grads[0][p].data_ptr() or o.numel() == 0, "aliases the input"


# --------------------------------------------------------------------------------------------
# Nothing to sum: every entry None, or every tensor empty


DEGENERATE = {
    "all_none": lambda: [[None, None], [None, None]],
    "all_empty": lambda: [[torch.zeros(0), torch.zeros(3, 0)], [torch.zeros(0), None]],
    "empty_and_none": lambda: [[torch.zeros(0)], [None]],
}


@pytest.mark.parametrize("fn", ["norms", "gramian", "combine", "normalized_sum"])
@pytest.mark.parametrize("case", list(DEGENERATE))
def test_nothing_to_sum(backend, case, fn):
    """None entries are zeros and empty tensors are fine, also when they are all there is:
    zero norms and Gramian, None (all tasks None) or empty outputs."""
    task_grads = DEGENERATE[case]()
    K, P = len(task_grads), len(task_grads[0])
    if fn == "combine":
        result = mt.combine(task_grads, [1.0, 2.0])
    else:
        result = getattr(mt, fn)(task_grads)
    if fn in ("norms", "gramian"):
        assert result.is_floating_point() and tuple(result.shape) == ((K,) if fn == "norms" else (K, K))
        assert bool((result == 0).all()), result
        if case != "all_none":
            assert result.dtype == torch.float32
        return
    outs = result if fn == "combine" else result[0]
    if fn == "normalized_sum":
        assert bool((result[1] == 0).all()) and tuple(result[1].shape) == (K,), result[1]
    assert len(outs) == P
    for p in range(P):
        reference = next((row[p] for row in task_grads if row[p] is not None), None)
        if reference is None:
            assert outs[p] is None, f"parameter {p}"
        else:
            assert outs[p].shape == reference.shape and outs[p].dtype == reference.dtype


# --------------------------------------------------------------------------------------------
# normalized_sum


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", LAYOUTS)
def test_normalized_sum(backend, layout, dtype):
    skip_slow_for_triton(backend, layout)
    prob = problem_for(layout, dtype, backend)
    result = mt.normalized_sum(prob.lists())
    check_normalized_sum(prob, result, 1e-8)
    outs, norms = result
    for p, o in enumerate(outs):
        if o is not None:
            assert bool(torch.isfinite(o).all()), f"parameter {p}: not finite"


@pytest.mark.parametrize("eps", [0.5, 1e-3])
@pytest.mark.parametrize("dtype", dtype_params([torch.float64, torch.float32]))
def test_normalized_sum_eps(backend, dtype, eps):
    """eps is added to the norm: c_i = 1 / (norm_i + eps)."""
    prob = build_problem([(3,), (40,), (2, 2)], 3, dtype, seed=25)
    result = mt.normalized_sum(prob.lists(), eps=eps)
    check_normalized_sum(prob, result, eps)


def test_normalized_sum_all_zero(backend):
    """Every task zero: the result is zeros (no NaN), the norms 0."""
    prob = build_problem([(5,), (3, 3)], 2, torch.float32, zero_tasks=(0, 1))
    outs, norms = mt.normalized_sum(prob.lists())
    assert norms.tolist() == [0.0, 0.0]
    for p, o in enumerate(outs):
        assert_bitwise(o, torch.zeros(prob.shapes[p]), f"parameter {p}")


# --------------------------------------------------------------------------------------------
# out= and accumulate=


OUT_LAYOUTS = ("odd", "none", "noncontig", "edge", "tiny")


def _grads_like(prob: Problem, seed=31):
    """Parameters with an existing .grad (contiguous, the grads' dtype) and the .grad objects."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in prob.shapes:
        w = torch.nn.Parameter(torch.zeros(shape, dtype=prob.dtype))
        w.grad = _values(shape, prob.dtype, gen, 0.5)
        params.append(w)
    return params


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("fn", ["combine", "normalized_sum"])
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("layout", OUT_LAYOUTS)
def test_out(backend, layout, dtype, fn, accumulate):
    """out= writes into the given tensors (the parameters' .grad), returns the same objects;
    accumulate=True adds; a parameter no task reaches is zeroed (left unchanged with accumulate)."""
    prob = problem_for(layout, dtype, backend)
    inputs_before = [[None if t is None else t.clone() for t in row] for row in prob.grads]
    params = _grads_like(prob)
    out = [w.grad for w in params]
    base = [g.clone() for g in out]
    if fn == "combine":
        c = random_coeffs(prob.K)
        result = mt.combine(prob.lists(), c, out=out, accumulate=accumulate)
        outs = result
    else:
        result = mt.normalized_sum(prob.lists(), out=out, accumulate=accumulate)
        outs = result[0]
    assert len(outs) == prob.P
    for p in range(prob.P):
        assert outs[p] is out[p], f"parameter {p}: not the out tensor"
        assert params[p].grad is out[p], f"parameter {p}: .grad replaced"
    if fn == "combine":
        check_combine(prob, c, outs, "combine(out=)", base=base, accumulate=accumulate)
    else:
        check_normalized_sum(prob, result, 1e-8, "normalized_sum(out=)", base=base,
                             accumulate=accumulate)
    # the inputs are not modified
    for i, row in enumerate(inputs_before):
        for p, t in enumerate(row):
            if t is not None:  # (the inputs hold no NaN)
                assert torch.equal(prob.grads[i][p], t), f"input task {i} parameter {p} modified"


@pytest.mark.parametrize("dtype", dtype_params([torch.float32, torch.float16]))
def test_out_twice_accumulates(backend, dtype):
    """Two accumulate=True calls add twice; a following accumulate=False call overwrites."""
    prob = build_problem([(3,), (1023,), (2, 5)], 2, dtype, seed=32)
    c = torch.tensor([0.5, -2.0], dtype=torch.float64)  # exact in every dtype
    out = [torch.zeros(s, dtype=dtype) for s in prob.shapes]
    mt.combine(prob.lists(), c, out=out, accumulate=True)
    mt.combine(prob.lists(), c, out=out, accumulate=True)
    check_combine(prob, 2 * c, out, "combine accumulated twice")
    mt.combine(prob.lists(), c, out=out)
    check_combine(prob, c, out, "combine overwritten")


@pytest.mark.parametrize("dtype", dtype_params([torch.float32, torch.float64]))
@pytest.mark.parametrize("layout", OUT_LAYOUTS)
def test_combine_into_grad_accumulates_like_autograd(backend, layout, dtype):
    """Existing .grad: += the combination (as combine(out=, accumulate=True)); .grad None: set to
    it (as combine()); a parameter no task reaches keeps its .grad, even None."""
    prob = problem_for(layout, dtype, backend)
    params = _grads_like(prob)
    for p in range(0, prob.P, 2):
        params[p].grad = None
    c = random_coeffs(prob.K)
    before = [None if w.grad is None else w.grad.clone() for w in params]
    fresh = mt.combine(prob.lists(), c)
    accumulated = mt.combine(prob.lists(), c, out=[b.clone() if b is not None else torch.zeros_like(w) for b, w in zip(before, params)], accumulate=True)
    mt.combine_into_grad_(params, prob.lists(), c)
    for p, w in enumerate(params):
        if fresh[p] is None:  # no task reaches p
            assert (w.grad is None) if before[p] is None else torch.equal(w.grad, before[p]), f"parameter {p}"
        elif before[p] is None:
            assert torch.equal(w.grad, fresh[p]), f"parameter {p} (created)"
        else:
            assert torch.equal(w.grad, accumulated[p]), f"parameter {p} (accumulated)"


# --------------------------------------------------------------------------------------------
# K = 1..8, tuples as sequences


@pytest.mark.parametrize("K", range(1, 9))
def test_task_counts(backend, K):
    dtype = torch.float32
    prob = build_problem([(1,), (3,), (1023,), (5, 7), (4099,)], K, dtype, seed=40 + K)
    task_grads = prob.lists(tuple)  # any sequence
    check_norms(prob, mt.norms(task_grads))
    check_gramian(prob, mt.gramian(task_grads))
    c = random_coeffs(K, seed=K)
    check_combine(prob, c, mt.combine(task_grads, c))
    check_normalized_sum(prob, mt.normalized_sum(task_grads), 1e-8)


# --------------------------------------------------------------------------------------------
# l1_l2_penalty_


PENALTY_SHAPES = [(0,), (1,), (7,), (1023,), (3, 5), (10_007,), ()]
PENALTY_COEFFS = [(0.01, 0.0), (0.0, 0.003), (0.25, 1.5), (0.0, 0.0)]


def _penalty_params(dtype, grads: str, seed=50, shapes=PENALTY_SHAPES):
    """Parameters (20% exact zeros) whose .grad exists ('all'), is None ('none') or alternates."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for k, shape in enumerate(shapes):
        w = torch.nn.Parameter(_values(shape, dtype, gen, 1.5, zero_fraction=0.2))
        if grads == "all" or (grads == "mixed" and k % 2 == 0):
            w.grad = _values(shape, dtype, gen, 0.5)
        params.append(w)
    return params


@pytest.mark.parametrize("grads", ["all", "none", "mixed"])
@pytest.mark.parametrize("l1, l2", PENALTY_COEFFS, ids=lambda v: f"{v:g}")
@pytest.mark.parametrize("dtype", dtype_params())
def test_l1_l2_penalty(backend, dtype, l1, l2, grads):
    params = _penalty_params(dtype, grads)
    values = [w.detach().clone() for w in params]
    old = [None if w.grad is None else w.grad.clone() for w in params]
    old_objects = [w.grad for w in params]
    value = mt.l1_l2_penalty_(params, l1=l1, l2=l2)

    assert isinstance(value, torch.Tensor) and value.dim() == 0, f"value {value!r}"
    assert value.dtype == result_dtype(dtype), f"value dtype {value.dtype}"
    w64 = [v.double() for v in values]
    ref = l1 * sum(float(w.abs().sum()) for w in w64) + l2 * sum(float((w * w).sum()) for w in w64)
    ref = torch.tensor(ref, dtype=torch.float64)
    assert_rel(value, ref, ref, reduce_rtol(dtype), "penalty value")

    u = unit_roundoff(dtype)
    for k, (w, v, g0) in enumerate(zip(params, values, old)):
        what = f"param {k} {tuple(v.shape)}"
        assert_bitwise(w.detach(), v, f"{what}: weights modified")
        assert w.grad is not None, f"{what}: .grad not created"
        assert w.grad.dtype == dtype and w.grad.shape == v.shape, f"{what}: .grad {w.grad.dtype}"
        if g0 is not None:
            assert w.grad is old_objects[k], f"{what}: .grad replaced instead of added into"
        v64 = v.double()
        addend = l1 * torch.sign(v64) + 2 * l2 * v64
        slack = 4 * u * addend.abs()
        ref_g = addend
        if g0 is not None:
            ref_g = g0.double() + addend
            # the gradient may be rounded to the dtype once before it is added
            slack = slack + 4 * u * g0.double().abs() + ulp_in(dtype, addend)
        assert_near(w.grad, ref_g, slack, 1, f"{what}: .grad")
        # sign(0) == 0: where w == 0 nothing is added
        zero = v == 0
        if g0 is not None:
            assert_bitwise(w.grad[zero], g0[zero], f"{what}: .grad where w == 0")
        else:
            assert_bitwise(w.grad[zero], torch.zeros_like(w.grad[zero]), f"{what}: .grad where w == 0")
    assert sum(int((v == 0).sum()) for v in values) > 100  # the w == 0 case occurs


def test_l1_l2_penalty_l1_only_gradient_is_sign(backend):
    """float32, l1 only, .grad None: .grad is exactly l1 * sign(w)."""
    params = _penalty_params(torch.float32, "none", seed=51)
    mt.l1_l2_penalty_(params, l1=0.125)
    for w in params:
        assert_bitwise(w.grad, 0.125 * torch.sign(w.detach()), "l1 * sign(w)")


# --------------------------------------------------------------------------------------------
# Errors


def _error_problem():
    shapes = [(3,), (2, 2), (5,), (1,), (4,), (6,), (2, 3)]
    return build_problem(shapes, 4, torch.float32, seed=60)


def _bad_lists(case):
    g = _error_problem().lists()
    if case == "dtype":
        g[2][5] = g[2][5].double()
    elif case == "dtype_half":
        g[2][5] = g[2][5].half()
    elif case == "device":
        g[2][5] = g[2][5].to("meta")
    elif case == "shape":
        g[2][5] = torch.zeros(7)
    elif case == "shape_same_numel":  # (2, 3) instead of (6,)
        g[2][5] = torch.zeros(2, 3)
    elif case == "shorter":
        g[2] = g[2][:-1]
    elif case == "longer":
        g[2] = g[2] + [torch.zeros(3)]
    elif case == "no_tasks":
        g = []
    else:
        raise ValueError(case)
    return g


ERROR_CASES = {  # case -> words the message must contain
    "dtype": ("task 2", "parameter 5"),
    "dtype_half": ("task 2", "parameter 5"),
    "device": ("task 2", "parameter 5"),
    "shape": ("task 2", "parameter 5"),
    "shape_same_numel": ("task 2", "parameter 5"),
    "shorter": ("task 2",),
    "longer": ("task 2",),
    "no_tasks": (),
}


def _call(fn, task_grads, K=None):
    if fn == "combine":
        return mt.combine(task_grads, [0.5] * (len(task_grads) if K is None else K))
    return getattr(mt, fn)(task_grads)


@pytest.mark.parametrize("fn", ["norms", "gramian", "combine", "normalized_sum"])
@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors(backend, case, fn):
    with pytest.raises((ValueError, RuntimeError)) as excinfo:
        _call(fn, _bad_lists(case))
    message = str(excinfo.value)
    for word in ERROR_CASES[case]:
        assert word in message, f"{word!r} not in the message {message!r}"


def test_errors_with_none_entries(backend):
    """The reference tensor of a parameter is the first task that reaches it."""
    g = _error_problem().lists()
    g[0][5] = None
    g[1][5] = None
    g[3][5] = torch.zeros(7)  # task 2 has (6,)
    with pytest.raises((ValueError, RuntimeError)) as excinfo:
        mt.gramian(g)
    assert "task 3" in str(excinfo.value) and "parameter 5" in str(excinfo.value), str(excinfo.value)


@pytest.mark.parametrize("fn", ["combine", "normalized_sum"])
def test_valid_call_after_error(backend, fn):
    """A valid call after a failed one works (no state left behind by the error)."""
    with pytest.raises((ValueError, RuntimeError)):
        _call(fn, _bad_lists("shape"))
    prob = _error_problem()
    if fn == "combine":
        c = random_coeffs(prob.K)
        check_combine(prob, c, mt.combine(prob.lists(), c))
    else:
        check_normalized_sum(prob, mt.normalized_sum(prob.lists()), 1e-8)


@pytest.mark.parametrize("coeffs", ["short_list", "long_list", "short_tensor", "long_tensor",
                                    "matrix"])
def test_combine_coeffs_length_error(backend, coeffs):
    g = _error_problem().lists()  # K = 4
    bad = {
        "short_list": [1.0, 2.0, 3.0],
        "long_list": [1.0] * 5,
        "short_tensor": torch.ones(3),
        "long_tensor": torch.ones(5),
        "matrix": torch.ones(4, 4),
    }[coeffs]
    with pytest.raises((ValueError, RuntimeError)):
        mt.combine(g, bad)


# --------------------------------------------------------------------------------------------
# Determinism: thread count and CPU capability (native backend)


def _run_everything(prob, params_fn):
    """All results of the API on ``prob`` (and the penalty on fresh parameters), as tensors."""
    c = random_coeffs(prob.K)
    results = [mt.norms(prob.lists()), mt.gramian(prob.lists())]
    results += [o for o in mt.combine(prob.lists(), c) if o is not None]
    outs, norms = mt.normalized_sum(prob.lists())
    results += [o for o in outs if o is not None] + [norms]
    out = [torch.ones(s, dtype=prob.dtype) for s in prob.shapes]
    results += mt.combine(prob.lists(), c, out=out, accumulate=True)
    params = params_fn()
    results.append(mt.l1_l2_penalty_(params, l1=0.01, l2=0.02))
    results += [w.grad for w in params]
    return results


@functools.lru_cache(maxsize=None)
def _problem_3m():
    return build_problem([(3_000_017,), (1023,), (7,), (2, 3), (40_000,)], 3, torch.float32, seed=70)


@pytest.mark.slow
def test_thread_count_determinism(restore_num_threads):
    prob = _problem_3m()
    params_fn = lambda: _penalty_params(torch.float32, "mixed", seed=71,  # noqa: E731
                                        shapes=[(3_000_017,), (5,), (1023,)])
    with fusedmtl.backend.use("native"):
        torch.set_num_threads(1)
        one = _run_everything(prob, params_fn)
        torch.set_num_threads(2)
        two = _run_everything(prob, params_fn)
    assert len(one) == len(two)
    for k, (a, b) in enumerate(zip(one, two)):
        assert_bitwise(b, a, f"result {k}: 2 threads vs 1")
    check_gramian(prob, one[1])


@pytest.mark.parametrize("layout", ["tiny", "odd", "none", "noncontig"])
@pytest.mark.parametrize("capability", CAPABILITIES)
def test_cpu_capability_parity(capability, layout, restore_cpu_capability):
    prob = layout_problem(layout, torch.float32)
    params_fn = lambda: _penalty_params(torch.float32, "mixed", seed=72)  # noqa: E731
    with fusedmtl.backend.use("native"):
        assert fusedmtl._C.set_cpu_capability("default") == "default"
        baseline = _run_everything(prob, params_fn)
        actual = fusedmtl._C.set_cpu_capability(capability)
        assert _CAPABILITY_ORDER[actual] <= _CAPABILITY_ORDER[capability]
        results = _run_everything(prob, params_fn)
    assert len(results) == len(baseline)
    for k, (a, b) in enumerate(zip(results, baseline)):
        assert_bitwise(a, b, f"result {k}: {actual} vs default")
    check_norms(prob, results[0])
    check_gramian(prob, results[1])


# --------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.compile
def test_torch_compile():
    """gramian and combine inside a fullgraph-compiled function (gradient normalisation)."""
    torch._dynamo.reset()
    try:
        def fn(a0, a1, b0, b1):
            task_grads = [[a0, a1], [b0, b1]]
            m = mt.gramian(task_grads)
            c = 1.0 / (m.diagonal().sqrt() + 1e-8)
            return m, mt.combine(task_grads, c)

        prob = build_problem([(5, 3), (11,)], 2, torch.float32, seed=80)
        args = [t for row in prob.grads for t in row]
        compiled = torch.compile(fn, fullgraph=True)
        m_c, outs_c = compiled(*args)
        m_e, outs_e = fn(*args)
        check_gramian(prob, m_c, "compiled gramian")
        assert_bitwise(m_c, m_e, "compiled gramian vs eager")
        assert len(outs_c) == 2
        for p in range(2):
            assert outs_c[p].shape == prob.shapes[p]
            torch.testing.assert_close(outs_c[p], outs_e[p], rtol=1e-6, atol=1e-7)
    finally:
        torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# Property test


@st.composite
def _gradient_problems(draw):
    K = draw(st.integers(1, 6))
    P = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    shapes = [tuple(draw(st.lists(st.integers(0, 5), max_size=3))) for _ in range(P)]
    transposed = [len(s) >= 2 and draw(st.booleans()) for s in shapes]
    kinds = [[draw(st.sampled_from(["normal", "normal", "normal", "zero", "none"])) for _ in range(P)]
             for _ in range(K)]
    seed = draw(st.integers(0, 2**31 - 1))
    backend = draw(st.sampled_from(BACKENDS))
    as_tuples = draw(st.booleans())
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for i in range(K):
        row = []
        for p, shape in enumerate(shapes):
            if kinds[i][p] == "none":
                row.append(None)
                continue
            scale = 10.0 ** float(torch.randint(-2, 3, (), generator=gen))
            base_shape = shape[:-2] + (shape[-1], shape[-2]) if transposed[p] else shape
            t = _values(base_shape, dtype, gen, scale)
            if kinds[i][p] == "zero":
                t = torch.zeros_like(t)
            row.append(t.transpose(-1, -2) if transposed[p] else t)
        grads.append(row)
    coeffs = [float(x) for x in torch.randn(K, generator=gen, dtype=torch.float64)]
    return Problem(shapes, grads, dtype), backend, as_tuples, coeffs


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(_gradient_problems())
def test_property_gramian(problem):
    prob, backend, as_tuples, coeffs = problem
    task_grads = prob.lists(tuple if as_tuples else list)
    with fusedmtl.backend.use(backend):
        gram = mt.gramian(task_grads)
        norms = mt.norms(task_grads)
        outs = mt.combine(task_grads, coeffs)
    check_gramian(prob, gram)
    check_norms(prob, norms)
    check_combine(prob, torch.tensor(coeffs, dtype=torch.float64), outs)
    g64 = gram.double()
    trace = float(g64.diagonal().sum())
    eigenvalues = torch.linalg.eigvalsh(g64)
    assert float(eigenvalues.min()) >= -1e-5 * trace, (eigenvalues, trace)
