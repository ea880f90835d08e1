"""The oracle and the problems of the multi-tensor tests (imported by tests/multi_tensor/test_*.py).

Problems are built on the CPU; ``Problem.lists(device=...)`` hands the same gradients (and views)
out on another device, and every check compares results from any device on the CPU.


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

from tests.helpers import assert_bitwise, smallest_subnormal

PRECISION = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}
LOW_PRECISION = (torch.float16, torch.bfloat16)
# Magnitudes of the tasks (task i is scaled by SCALES[i % 8]): the norms differ by orders of
# magnitude.
SCALES = (1.0, 0.01, 30.0, 1e-3, 3.0, 0.2, 7.0, 0.05)
CAPABILITIES = ("default", "avx2", "avx512")
_CAPABILITY_ORDER = {name: i for i, name in enumerate(CAPABILITIES)}


def result_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff of the accumulation: float32's for float32/16-bit dtypes, else float64's."""
    return 2.0**-53 if dtype == torch.float64 else 2.0**-24


def reduce_rtol(dtype: torch.dtype) -> float:
    return 1e-12 if dtype == torch.float64 else 1e-5


# --------------------------------------------------------------------------------------------
# Problems: K task gradient lists over P parameters


class Problem:
    """K x P task gradients (Tensor or None) and the P parameter shapes. Cached: tests must not
    modify the tensors (``lists()`` hands out fresh outer lists)."""

    def __init__(self, shapes, grads, dtype, sources=None):
        self.shapes = [tuple(s) for s in shapes]
        self.grads = [list(row) for row in grads]
        # (base tensor, view or None) per gradient, to rebuild the same views on another device
        self._sources = sources
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
        rows = [
            " ".join(
                "None"
                if t is None
                else f"{tuple(t.shape)}{'' if t.is_contiguous() else 'nc'}"
                f"{'0' if not t.any() else ''}"
                for t in row
            )
            for row in self.grads
        ]
        return f"Problem({self.dtype}, K={self.K}, P={self.P}, shapes={self.shapes}, tasks={rows})"

    def lists(self, kind=list, device="cpu"):
        """The gradients as K sequences of P (``kind``), on ``device``: the same values, and the
        same views of a base tensor there (a stride-0 or stepped view stays one)."""
        if torch.device(device).type == "cpu":
            return kind(kind(row) for row in self.grads)
        return kind(
            kind(None if t is None else _on(t, source, device) for t, source in zip(row, sources))
            for row, sources in zip(self.grads, self._sources or [[None] * self.P] * self.K)
        )

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
        return flat[self.offsets[p] : self.offsets[p + 1]]


def _on(t, source, device):
    if source is None or source[1] is None:
        return t.to(device)
    base, view = source
    return view(base.to(device))


def _values(shape, dtype, gen, scale, zero_fraction=0.0):
    v = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    if zero_fraction:
        v = torch.where(
            torch.rand(shape, generator=gen, dtype=torch.float64) < zero_fraction, 0.0, v
        )
    return v.to(dtype)


def build_problem(shapes, K, dtype, seed=0, present=None, zero_tasks=(), views=None):
    """present(i, p) -> bool says whether task i reaches parameter p; zero_tasks have all-zero
    gradients; views[p], if given, maps a freshly generated base tensor to the (non-contiguous)
    view that is handed to the API (shapes[p] is the base shape then)."""
    gen = torch.Generator().manual_seed(seed)
    grads, sources, final_shapes = [], [], None
    for i in range(K):
        row, row_sources = [], []
        for p, shape in enumerate(shapes):
            if present is not None and not present(i, p):
                row.append(None)
                row_sources.append(None)
                continue
            t = _values(shape, dtype, gen, SCALES[i % len(SCALES)])
            if i in zero_tasks:
                t = torch.zeros_like(t)
            view = views[p] if views is not None else None
            row_sources.append((t, view))
            row.append(view(t) if view is not None else t)
        grads.append(row)
        sources.append(row_sources)
    if views is None:
        final_shapes = shapes
    else:
        final_shapes = [
            tuple(views[p](torch.empty(s)).shape) if views[p] else s for p, s in enumerate(shapes)
        ]
    return Problem(final_shapes, grads, dtype, sources)


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
    ((37, 45), lambda t: t.t()),  # transposed
    ((3 * 1001,), lambda t: t[::3]),  # 1-D step
    ((24, 66), lambda t: t[:, 1::2]),  # 2-D column step, storage offset
    ((1, 5), lambda t: t.expand(4, 5)),  # stride 0
    ((6, 5, 4), lambda t: t.permute(2, 0, 1)),  # permuted 3-D
    ((10,), None),  # contiguous
)

LAYOUTS = ("tiny", "odd", "big", "edge", "none", "noncontig", "zero_task")
TRITON_TOO_SLOW = ("big",)  # 2**20 elements under the Triton interpreter
# The Triton interpreter spends tens of ms per parameter: 'tiny' has 300 parameters, 12 for triton.
TINY_P = 300
TINY_P_TRITON = 12


def _interpreted(backend: str | None, device: str) -> bool:
    """Triton on the CPU runs under the interpreter; on CUDA it runs compiled, at full size."""
    return backend == "triton" and torch.device(device).type == "cpu"


def problem_for(
    layout: str, dtype: torch.dtype, backend: str | None = None, device: str = "cpu"
) -> Problem:
    return layout_problem(layout, dtype, _interpreted(backend, device))


@functools.lru_cache(maxsize=None)
def layout_problem(layout: str, dtype: torch.dtype, interpreted: bool = False) -> Problem:
    if layout == "tiny":  # many tiny tensors (1..7 elements)
        return build_problem(
            _tiny_shapes(TINY_P_TRITON if interpreted else TINY_P), 3, dtype, seed=1
        )
    if layout == "odd":
        return build_problem([(1,), (3,), (1023,), (100_003,)], 4, dtype, seed=2)
    if layout == "big":  # a 2**20 + 3 tensor among tiny ones
        return build_problem([(5,), (2**20 + 3,), (1,), (3, 7), (2,)], 2, dtype, seed=3)
    if layout == "edge":  # empty tensors and a 0-dim one
        return build_problem([(0,), (4,), (), (3, 0), (17,), (0, 5), (1,)], 3, dtype, seed=4)
    if layout == "none":
        return build_problem(
            [(5,), (31,), (2, 3), (1023,), (7,), (1,)],
            4,
            dtype,
            seed=5,
            present=lambda i, p: bool(_NONE_PATTERN[i][p]),
        )
    if layout == "noncontig":
        shapes = [s for s, _ in _NONCONTIG_VIEWS]
        views = [v for _, v in _NONCONTIG_VIEWS]
        prob = build_problem(shapes, 3, dtype, seed=6, views=views)
        assert all(not t.is_contiguous() for t in prob.grads[0][:5])
        return prob
    if layout == "zero_task":  # task 1 has an all-zero gradient
        return build_problem([(7,), (1023,), (2, 5)], 3, dtype, seed=7, zero_tasks=(1,))
    raise ValueError(layout)


def skip_slow_for_triton(backend, layout, device="cpu"):
    if _interpreted(backend, device) and layout in TRITON_TOO_SLOW:
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
    got = got.detach().cpu()  # results from any device, compared on the CPU
    got64 = got.double().reshape(-1)
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
    got = got.detach().cpu()
    err = (got.double() - ref64).abs()
    bound = rtol * scale64
    bad = ~(err <= bound)
    if bool(bad.any()):
        i = int(
            torch.where(bad, (err - bound).nan_to_num(math.inf), -math.inf).reshape(-1).argmax()
        )
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} entries off; worst at flat index {i}: "
            f"got {got.detach().reshape(-1)[i].item()!r}, expected "
            f"{ref64.reshape(-1)[i].item()!r}, "
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
    base = None if base is None else [b.cpu() for b in base]
    for p in range(prob.P):
        o = None if outs[p] is None else outs[p].cpu()
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
            slack_p = (
                slack_p + unit_roundoff(prob.dtype) * old.abs() * 2 + ulp_in(prob.dtype, ref_p)
            )
            ref_p = ref_p + old
        assert_near(o, ref_p, slack_p, max_ulp, f"{what}: parameter {p}")


def combine_slack(prob, abs64, extra_roundings=2):
    return (prob.K + extra_roundings) * unit_roundoff(prob.dtype) * abs64


def combine_ulps(dtype):
    return 1 if dtype in LOW_PRECISION else 2


def check_combine(prob, coeffs64, outs, what="combine", base=None, accumulate=False):
    __tracebackhide__ = True
    ref, abs_ = prob.combine64(coeffs64)
    check_outputs(
        prob, outs, ref, combine_slack(prob, abs_), combine_ulps(prob.dtype), what, base, accumulate
    )


def check_normalized_sum(prob, result, eps, what="normalized_sum", base=None, accumulate=False):
    __tracebackhide__ = True
    assert isinstance(result, tuple) and len(result) == 2, f"{what}: {type(result)}"
    outs, norms = result
    check_norms(prob, norms, f"{what} norms")
    # against the float64 normalised sum
    c64 = 1.0 / (prob.norms64 + eps)
    ref, abs_ = prob.combine64(c64)
    slack = reduce_rtol(prob.dtype) * abs_ + combine_slack(prob, abs_)
    check_outputs(
        prob, outs, ref, slack, combine_ulps(prob.dtype), f"{what} vs float64", base, accumulate
    )
    # and exactly combine with c = 1 / (norms + eps) of the norms it returns (up to roundings)
    c_got = 1.0 / (norms.double() + eps)
    assert bool(torch.isfinite(c_got).all())
    ref, abs_ = prob.combine64(c_got)
    check_outputs(
        prob,
        outs,
        ref,
        combine_slack(prob, abs_, extra_roundings=4),
        combine_ulps(prob.dtype),
        f"{what} vs combine(1 / (norms + eps))",
        base,
        accumulate,
    )


PENALTY_SHAPES = [(0,), (1,), (7,), (1023,), (3, 5), (10_007,), ()]


def penalty_params(dtype, grads: str, seed=50, shapes=PENALTY_SHAPES):
    """Parameters (20% exact zeros) whose .grad exists ('all'), is None ('none') or alternates."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for k, shape in enumerate(shapes):
        w = torch.nn.Parameter(_values(shape, dtype, gen, 1.5, zero_fraction=0.2))
        if grads == "all" or (grads == "mixed" and k % 2 == 0):
            w.grad = _values(shape, dtype, gen, 0.5)
        params.append(w)
    return params
