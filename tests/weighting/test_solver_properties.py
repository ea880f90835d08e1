"""Aggregator properties of every gradient-based method, on torchjd's matrix families.

The properties and the matrix families are those of torchjd's aggregator unit tests (Quinton &
Rey, "Jacobian Descent for Multi-Objective Optimization", 2024, section 2; the samplers are
re-derived here from their definitions): for a Jacobian J (K x n, one task gradient per row) and
the update d = c @ J a method makes from the Gramian,

* expected structure: c and d have the right shape and are finite (no exception either);
* non-conflicting: min_i <g_i, d> >= 0;
* permutation invariance: permuting the rows of J leaves d unchanged;
* linear under scaling: d(diag(a c1 + b c2) J) = a d(diag(c1) J) + b d(diag(c2) J), c1, c2 > 0;
* strong stationarity: d = 0 only when some w > 0 has w @ J = 0 (tested on the matrices that
  are not strongly stationary: d must not vanish there);
* scale invariance of the direction (not one of torchjd's): d(s J) = s^p d(J) for s > 0, the
  invariance to scaling all losses by a positive constant (p = 1, or 0 for the methods whose
  update has a fixed size).

Each runs in float32 and float64, with the Gramian as ``J @ J.T`` in that dtype and as
``fusedmtl.multi_tensor.gramian`` returns it for the rows split over two tensors, and d is
combined in the gradients' dtype (as ``multi_tensor.combine`` does in a step), then checked in
float64. ``PROPERTIES`` says which method has which property by its definition (the methods'
docstrings say the same). Finally the directions of the methods torchjd also implements are
compared with torchjd's own aggregators, in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from fusedmtl import multi_tensor, weighting
from fusedmtl.weighting.methods.cagrad import cagrad_homotopy
from fusedmtl.weighting.solvers import as_float64_gramian, gramian_resolution

F64 = torch.float64
DTYPES = (torch.float32, torch.float64)
GRAMIAN_SOURCES = ("matmul", "multi_tensor")

# -- matrix samplers ---------------------------------------------------------------------------


def _orthonormal_complement(basis: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random [m, m - k] matrix Q' with [basis, Q'] orthonormal (basis: [m, k])."""
    m, k = basis.shape
    sample = torch.randn(m, m - k, generator=generator, dtype=F64)
    sample = sample - basis @ (basis.T @ sample)
    return torch.linalg.qr(sample).Q


def _orthonormal(m: int, generator: torch.Generator) -> torch.Tensor:
    return _orthonormal_complement(torch.zeros(m, 0, dtype=F64), generator)


def sample_jacobian(
    kind: str, m: int, n: int, rank: int, generator: torch.Generator
) -> torch.Tensor:
    """A random m x n matrix of the given rank (float64), from one of the families:

    normal: J = U[:, :r] S V^T[:r] with random orthonormal U, V and |N(0, 1)| singular values.
    strong: strongly stationary, w @ J = 0 for some w > 0 (J's column space orthogonal to w).
    strictly_weak: w @ J = 0 for some w >= 0, w != 0, but for no w > 0: J is orthogonal to a
        nonnegative v and has a left-singular vector v' >= 0 with disjoint support, v + v' > 0
        (then w > 0 with w @ J = 0 would give 0 = w @ J J^T v' = s <w, v'> > 0).
    non_weak: no w >= 0, w != 0, has w @ J = 0: J has a positive left-singular vector u.
    """
    singular = torch.randn(rank, generator=generator, dtype=F64).abs()
    right = _orthonormal(n, generator)[:rank]
    if kind == "normal":
        left = _orthonormal(m, generator)[:, :rank]
    elif kind in ("strong", "non_weak"):
        u = torch.randn(m, generator=generator, dtype=F64).abs()
        u = torch.nn.functional.normalize(u, dim=0)
        complement = _orthonormal_complement(u[:, None], generator)
        if kind == "non_weak":
            complement = torch.cat([u[:, None], complement], 1)
        left = complement[:, :rank]
    elif kind == "strictly_weak":
        u = torch.randn(m, generator=generator, dtype=F64).abs()
        split = int(torch.randint(1, m, (), generator=generator))
        order = torch.randperm(m, generator=generator)
        v, v_prime = torch.zeros(m, dtype=F64), torch.zeros(m, dtype=F64)
        v[order[:split]] = torch.nn.functional.normalize(u[order[:split]], dim=0)
        v_prime[order[split:]] = torch.nn.functional.normalize(u[order[split:]], dim=0)
        pair = torch.stack([v, v_prime], 1)
        left = torch.cat([pair, _orthonormal_complement(pair, generator)], 1)[:, 1 : rank + 1]
    else:
        raise ValueError(kind)
    return left @ torch.diag(singular) @ right


_NORMAL_DIMS = [(2, 1, 1), (4, 3, 1), (4, 3, 2), (4, 3, 3), (9, 11, 5), (9, 11, 9)]
_STATIONARITY_DIMS = [(20, 10, 10), (20, 10, 5), (20, 10, 1), (20, 100, 1), (20, 100, 19)]
# Dims sampled but not tested (none since the sync-free solvers: every property holds on all five,
# both dtypes, both Gramian sources).
_UNTESTED_DIMS: set[tuple[int, int, int]] = set()


def _matrices() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    out = {}
    for m, n, r in _NORMAL_DIMS:
        out[f"normal-{m}x{n}r{r}"] = sample_jacobian("normal", m, n, r, generator)
    for kind in ("strong", "strictly_weak", "non_weak"):
        for m, n, r in _STATIONARITY_DIMS:
            J = sample_jacobian(kind, m, n, r, generator)
            if (m, n, r) not in _UNTESTED_DIMS:
                out[f"{kind}-{m}x{n}r{r}"] = J
    for m, n in [(2, 1), (4, 3), (9, 11)]:
        out[f"zero-{m}x{n}"] = torch.zeros(m, n, dtype=F64)
    # degenerate gradients
    g = torch.randn(12, generator=generator, dtype=F64)
    h = torch.randn(12, generator=generator, dtype=F64)
    out["identical-5"] = g.expand(5, -1).clone()
    out["parallel-20"] = torch.logspace(-1, 1, 20, dtype=F64)[:, None] * g
    out["opposite-2"] = torch.stack([g, -g])
    out["opposite-4"] = torch.stack([g, -g, 2 * g, h])
    out["zero_gradient-3"] = torch.stack([g, torch.zeros_like(g), h])
    out["K>G-64x8"] = torch.randn(64, 8, generator=generator, dtype=F64)
    out["K64-64x100"] = torch.randn(64, 100, generator=generator, dtype=F64)
    return out


MATRICES = _matrices()
NON_STRONG = [name for name in MATRICES if name.startswith(("strictly_weak", "non_weak"))]
# The matrices with some d such that J d > 0 (Gordan: not weakly stationary): non_weak by
# construction (a positive left-singular vector), full row rank (d = J^+ 1), parallel gradients.
ASCENT_EXISTS = [
    name
    for name, J in MATRICES.items()
    if name.startswith("non_weak")
    or name in ("identical-5", "parallel-20")
    or (name.startswith(("normal", "K64")) and int(torch.linalg.matrix_rank(J)) == J.shape[0])
]
SCALES = (1e-10, 1e10)

# -- the methods and their properties ----------------------------------------------------------

# (name in GRADIENT_BASED, constructor kwargs): CAGrad is non-conflicting only for c >= 1.
METHODS = {
    "grad_normalization": ("grad_normalization", {}),
    "gradnorm": ("gradnorm", {}),
    "mgda": ("mgda", {}),
    "mgda_none": ("mgda", {"normalization": "none"}),
    "pcgrad": ("pcgrad", {"seed": 0}),
    "cagrad": ("cagrad", {}),
    "cagrad_c1": ("cagrad", {"c": 1.0}),
    "cagrad_c2": ("cagrad", {"c": 2.0}),
    "imtl_g": ("imtl_g", {}),
    "aligned_mtl": ("aligned_mtl", {}),
    "nash_mtl": ("nash_mtl", {"max_norm": None}),
    "upgrad": ("upgrad", {}),
    "db_mtl": ("db_mtl", {"beta": 0.0}),
    "dualproj": ("dualproj", {}),
    "config": ("config", {}),
    "krum": ("krum", {}),
    "fairgrad": ("fairgrad", {}),
    "gradvac": ("gradvac", {"seed": 0}),
    "modo": ("modo", {}),
    "sdmgrad": ("sdmgrad", {}),
    "crmogm": ("crmogm", {}),
    "pcd": ("pcd", {}),
    "imtl": ("imtl", {}),
}
# The methods whose update is not c @ J for coefficients from the Gramian: they change the
# gradients the coefficients apply to, per coordinate (TrimmedMean's and GradDrop's masks) or
# per task (ExcessMTL's and MoCo's tracked gradients); their own test_<method>_methods.py check
# them on the gradients themselves.
NOT_FROM_THE_GRAMIAN = {"trimmed_mean", "graddrop", "excess_mtl", "moco"}
_TESTED = {name for name, _ in METHODS.values()}
assert _TESTED == weighting.GRADIENT_BASED.keys() - NOT_FROM_THE_GRAMIAN

# Which method has which property by its definition (expected structure: all of them).
# non_conflicting: MGDA (the min-norm point p of the hull has <g_i, p> >= ||p||^2), UPGrad (in
#   the dual cone by construction), CAGrad with c >= 1 (Liu et al. 2021, section 3.1), Nash-MTL
#   (M a = 1 / a > 0, up to its ridge). Not PCGrad (K > 2), IMTL-G, Aligned-MTL, the
#   normalisations, DB-MTL, GradNorm: nothing in their definitions keeps <g_i, d> >= 0.
# permutation: all but PCGrad (its projection order is random by definition).
# linear: UPGrad only (the dual cone does not change when a row is scaled by a positive factor).
# stationary: UPGrad; the rest can return 0 on weakly stationary J (MGDA, CAGrad c >= 1: 0 in
#   the hull), or are invariant to row scaling (no such guarantee is part of their definition).
# scale_power p of d(s J) = s^p d(J): 0 for the normalised updates, 1 for the others; None: not
#   scale invariant (an absolute eps in the definition, or the loss normalisation).
# only: Nash-MTL's bargaining problem has a solution only where some d has J d > 0; elsewhere
#   its ridge decides (a ~ 1 / sqrt(ridge) times gradients that cancel), so its properties are
#   tested on those matrices (its expected structure on all).
_COLUMNS = ("non_conflicting", "permutation", "linear", "stationary", "scale_power")
_TABLE = {
    # method: (non-conflicting, permutation, linear, stationary, scale power)
    "grad_normalization": (False, True, False, False, None),
    "gradnorm": (False, True, False, False, 1),
    "mgda": (True, True, False, False, 0),
    "mgda_none": (True, True, False, False, 1),
    "pcgrad": (False, False, False, False, 1),
    "cagrad": (False, True, False, False, 1),
    "cagrad_c1": (True, True, False, False, 1),
    "cagrad_c2": (True, True, False, False, 1),
    "imtl_g": (False, True, False, False, 1),
    "aligned_mtl": (False, True, False, False, 1),
    "nash_mtl": (True, True, False, False, 0),
    "upgrad": (True, True, True, True, 1),
    "db_mtl": (False, True, False, False, None),
    # DualProj: the mean projected onto the dual cone (UPGrad's QP), hence non-conflicting. The
    # others (added with issue 15) are checked against torchjd in test_torchjd_gramian_methods.py;
    # here their expected structure only, until their properties are established.
    "dualproj": (True, True, False, False, 1),
    "config": (False, False, False, False, None),
    "krum": (False, False, False, False, None),
    "fairgrad": (False, False, False, False, None),
    "gradvac": (False, False, False, False, None),
    # MoDo: one projected step from 1/K with gamma times M (no scale invariance), symmetric in
    #   the tasks. SDMGrad: M normalised by mean_i ||g_i||^2 + 1e-8 (an absolute term: not scale
    #   invariant), symmetric for the uniform preference. IMTL: IMTL-G's weights on a Gramian.
    # CR-MOGM: a fresh instance's first step is its base's (UPGrad) exactly, so UPGrad's row.
    # PCD: task 0 is the primary (no permutation invariance), eps is absolute (no scale
    #   invariance), and dropped infeasible constraints give d = g_0 (conflicts).
    "modo": (False, True, False, False, None),
    "sdmgrad": (False, True, False, False, None),
    "crmogm": (True, True, True, True, 1),
    "pcd": (False, False, False, False, None),
    "imtl": (False, True, False, False, 1),
}
PROPERTIES = {method: dict(zip(_COLUMNS, row)) for method, row in _TABLE.items()}
PROPERTIES["nash_mtl"]["only"] = ASCENT_EXISTS
assert PROPERTIES.keys() == METHODS.keys()


def methods_with(prop: str) -> list[str]:
    return [name for name, props in PROPERTIES.items() if props[prop]]


# Relative tolerances (on ||d||), plus the noise the Gramian's accuracy allows (see
# conflict_excess and difference_excess).
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}


def gramian_of(J: torch.Tensor, source: str) -> torch.Tensor:
    if source == "matmul":
        return J @ J.T
    half = max(J.shape[1] // 2, 1)
    if J.shape[1] == 1:
        return multi_tensor.gramian([[row.clone()] for row in J])
    rows = [[row[:half].clone(), row[half:].clone()] for row in J]
    return multi_tensor.gramian(rows)


def update(method: str, J: torch.Tensor, source: str = "multi_tensor") -> torch.Tensor:
    """d = c @ J for a fresh instance of the method, combined in J's dtype, as float64."""
    name, kwargs = METHODS[method]
    params = [torch.zeros(J.shape[1], dtype=J.dtype, requires_grad=True)]
    if name == "gradnorm":
        kwargs = {**kwargs, "last_shared_layer": params}
    instance = weighting.GRADIENT_BASED[name](params, J.shape[0], **kwargs)
    losses = torch.ones(J.shape[0], dtype=J.dtype)
    coefficients = instance.coefficients(gramian_of(J, source), losses)
    assert coefficients.shape == (J.shape[0],)
    return (coefficients.to(J.dtype) @ J).to(F64)


def reference_scale(method: str, J: torch.Tensor) -> float:
    """The size of an ordinary update: max_i ||g_i|| (1 for the normalised updates)."""
    power = PROPERTIES[method]["scale_power"]
    return float(J.to(F64).norm(dim=1).max()) if power == 1 else 1.0


def conflict_excess(method: str, J: torch.Tensor, d: torch.Tensor) -> float:
    """-min_i <g_i, d> / max_i ||g_i|| over its budget, tol ||d|| + 4 r ||d_ordinary||
    (r the Gramian's resolution, :func:`~fusedmtl.weighting.solvers.gramian_resolution`: the
    solvers see M only to r relative, which moves <g_i, d> by about r ||g_i|| ||d_ordinary||);
    the property holds when this is <= 1."""
    J64 = J.to(F64)
    resolution = gramian_resolution(J.dtype, J.shape[0])
    budget = TOLERANCE[J.dtype] * float(d.norm()) + 4 * resolution * reference_scale(method, J)
    worst = max(0.0, -float((J64 @ d).min())) / max(float(J64.norm(dim=1).max()), 1e-300)
    return worst / budget if budget > 0 else (math.inf if worst > 0 else 0.0)


def difference_excess(method: str, a: torch.Tensor, b: torch.Tensor, J: torch.Tensor) -> float:
    """||a - b|| over its budget, tol max(||a||, ||b||) + sqrt(r) ||d_ordinary||: the Gramian
    resolves ||d||^2 = c^T M c to r relative, so ||d|| to sqrt(r) (a direction that vanishes up
    to that is undetermined); the property holds when this is <= 1."""
    resolution = gramian_resolution(J.dtype, J.shape[0])
    budget = TOLERANCE[J.dtype] * max(float(a.norm()), float(b.norm()))
    budget += math.sqrt(resolution) * reference_scale(method, J)
    difference = float((a - b).norm())
    return difference / budget if budget > 0 else (math.inf if difference > 0 else 0.0)


def _cases(methods, matrices=tuple(MATRICES), restrict=True):
    return [
        pytest.param(method, matrix, dtype, id=f"{method}-{matrix}-{str(dtype)[6:]}")
        for method in methods
        for matrix in matrices
        for dtype in DTYPES
        if not restrict or matrix in PROPERTIES[method].get("only", MATRICES)
    ]


# -- the properties ----------------------------------------------------------------------------


def check_properties(method: str, J: torch.Tensor, source: str) -> dict[str, float]:
    """Every property of PROPERTIES[method] that one matrix can show (the solves shared):
    the excess over its budget for each (<= 1 holds), after the expected structure."""
    props = PROPERTIES[method]
    d = update(method, J, source)
    assert d.shape == (J.shape[1],) and torch.isfinite(d).all(), d
    excess = {}
    if props["non_conflicting"]:
        excess["conflict"] = conflict_excess(method, J, d)
    # Permutation and scale re-solve the problem: on one Gramian source and K <= 20 (CPU time;
    # K = 64 is checked for structure and conflict).
    resolve = source == "multi_tensor" and J.shape[0] <= 20
    if props["permutation"] and resolve:
        permutation = torch.randperm(J.shape[0], generator=torch.Generator().manual_seed(1))
        permuted = update(method, J[permutation], source)
        excess["permutation"] = difference_excess(method, permuted, d, J)
    if props["scale_power"] is not None and resolve:
        J64 = J.to(F64)
        for scale in SCALES:
            scaled = update(method, (scale * J64).to(J.dtype)) / scale ** props["scale_power"]
            excess[f"scale {scale:g}"] = difference_excess(method, scaled, d, J)
    return excess


@pytest.mark.parametrize("source", GRAMIAN_SOURCES)
@pytest.mark.parametrize("method,matrix,dtype", _cases(METHODS, restrict=False))
def test_properties(method, matrix, dtype, source):
    """Expected structure on every matrix; non-conflicting, permutation invariance and scale
    invariance where PROPERTIES says the method has them (and on the matrices it names)."""
    J = MATRICES[matrix].to(dtype)
    props = PROPERTIES[method]
    if matrix not in props.get("only", MATRICES):
        d = update(method, J, source)
        assert d.shape == (J.shape[1],) and torch.isfinite(d).all(), d
        return
    excess = check_properties(method, J, source)
    failed = {name: value for name, value in excess.items() if value > 1}
    assert not failed, failed


@pytest.mark.parametrize("source", GRAMIAN_SOURCES)
@pytest.mark.parametrize("c", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("matrix", list(MATRICES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_cagrad_homotopy_reaches_the_root_within_its_bound(matrix, dtype, c, source):
    """CAGrad's homotopy runs a fixed number of face changes and falls back to MGDA's weights
    if it has not reached the root by then (a cycle on a degenerate face would): on every
    matrix here, K up to 64, it does reach it."""
    J = MATRICES[matrix].to(dtype)
    M, resolution = as_float64_gramian(gramian_of(J, source))
    _, found = cagrad_homotopy(M, c, resolution)
    assert bool(found)


@pytest.mark.parametrize("method,matrix,dtype", _cases(methods_with("linear")))
def test_linear_under_scaling(method, matrix, dtype):
    J = MATRICES[matrix].to(dtype)
    generator = torch.Generator().manual_seed(2)
    for _ in range(2):
        c1, c2 = (torch.rand(J.shape[0], generator=generator, dtype=F64) + 0.1 for _ in range(2))
        alpha, beta = torch.rand(2, generator=generator, dtype=F64) + 0.1
        J64 = J.to(F64)
        expected = alpha * update(method, (c1[:, None] * J64).to(dtype))
        expected = expected + beta * update(method, (c2[:, None] * J64).to(dtype))
        combined = update(method, ((alpha * c1 + beta * c2)[:, None] * J64).to(dtype))
        # the rows are scaled by up to 1.1 + 1.1 * 2.2: the budget's ordinary update with them
        assert difference_excess(method, combined, expected, 4 * J) <= 1


@pytest.mark.parametrize("method,matrix,dtype", _cases(methods_with("stationary"), NON_STRONG))
def test_strongly_stationary(method, matrix, dtype):
    J = MATRICES[matrix].to(dtype)
    # torchjd's threshold (5e-3) on matrices whose gradient norms are O(1)
    assert float(update(method, J).norm()) > 5e-3


# -- against torchjd's own aggregators (float64) -----------------------------------------------

torchjd_aggregation = pytest.importorskip("torchjd.aggregation")

# method -> (torchjd aggregator factory, rtol, atol, the matrices). ||d - d_torchjd|| <=
# rtol ||d_torchjd|| + atol max_i ||g_i||. torchjd solves MGDA by Frank-Wolfe (1e-2 after its
# 10^4 iterations here; fusedmtl's active set is exact, so its ||d|| is never larger), UPGrad's
# QPs by quadprog on the Gramian normalised and regularised by reg_eps (1e-10 here, the least it
# accepts on singular Gramians), CAGrad by cvxpy (~1e-4). IMTL-G is compared where J has full
# row rank (both are the paper's closed form there; on rank-deficient J torchjd takes
# M^+ norm(g), fusedmtl C^+ 1 on the unit gradients, see IMTLG's docstring).
PEERS = {
    # Frank-Wolfe converges sublinearly: where 0 is in the hull (d = 0 exactly) torchjd's d is
    # still ~2e-6 of the rows' norm after 10000 iterations; the norm check below keeps ours exact.
    "mgda_none": (
        lambda: torchjd_aggregation.MGDA(epsilon=1e-12, max_iters=10000),
        2e-2,
        1e-5,
        None,
    ),
    "upgrad": (lambda: torchjd_aggregation.UPGrad(projector=_quadprog(1e-10)), 1e-6, 1e-6, None),
    "cagrad": (lambda: torchjd_aggregation.CAGrad(c=0.5, norm_eps=0.0), 1e-3, 1e-6, None),
    "imtl_g": (lambda: torchjd_aggregation.IMTLG(), 1e-9, 0.0, "full_row_rank"),
    "aligned_mtl": (lambda: torchjd_aggregation.AlignedMTL(), 1e-9, 0.0, None),
}


def _quadprog(reg_eps: float):
    from torchjd.linalg import QuadprogProjector

    return QuadprogProjector(norm_eps=0.0, reg_eps=reg_eps)


# The comparison runs on the matrices where both answers are unique.
PEER_MATRICES = [name for name in MATRICES if name.startswith(("normal", "non_weak"))]
PEER_MATRICES.append("K64-64x100")


@pytest.mark.parametrize("matrix", PEER_MATRICES)
@pytest.mark.parametrize("method", PEERS)
def test_matches_torchjd(method, matrix):
    J = MATRICES[matrix]
    factory, rtol, atol, only = PEERS[method]
    if only == "full_row_rank" and int(torch.linalg.matrix_rank(J)) < J.shape[0]:
        pytest.skip("the generalisations differ on rank-deficient J")
    expected = factory()(J)
    d = update(method, J)
    bound = rtol * float(expected.norm()) + atol * float(J.norm(dim=1).max())
    assert float((d - expected).norm()) <= bound
    if method == "mgda_none":  # the exact min-norm point is never longer than Frank-Wolfe's
        assert float(d.norm()) <= float(expected.norm()) * (1 + 1e-12) + 1e-15


def test_nash_mtl_matches_torchjd_direction():
    """torchjd's NashMTL solves the bargaining problem by a few cvxpy iterations (optim_niter)
    and normalises by the norm; the directions agree to its accuracy."""
    J = MATRICES["normal-9x11r9"]
    peer = torchjd_aggregation.NashMTL(n_tasks=J.shape[0], max_norm=0.0, optim_niter=200)
    expected = peer(J.to(torch.float32)).to(F64)
    d = update("nash_mtl", J)
    cosine = float(d @ expected / (d.norm() * expected.norm()))
    assert cosine > 1 - 1e-3
