"""Tests of fusedmtl.weighting.solvers (docs/METHODS.md, section 4).

The oracles never call the solvers under test: KKT conditions evaluated in float64 numpy,
brute force over the simplex (a dense grid for K = 2, 3; every face for the exact problems),
closed forms derived by hand, CAGrad's primal-dual gap, and M = J J^T built from explicit
Jacobians J (K x n) so that the directions d = c @ J can be checked in gradient space.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusedmtl.weighting import solvers
from fusedmtl.weighting.methods.cagrad import cagrad_coefficients, cagrad_weights
from fusedmtl.weighting.methods.nash_mtl import nash_bargaining

KINDS = (
    "random",
    "conflicting",
    "identical",
    "opposite",
    "zero_row",
    "all_zero",
    "low_rank",
    "duplicated",
    "spread_norms",
)
GENERIC_KINDS = ("random", "conflicting", "spread_norms")
KS = (1, 2, 3, 5, 10)
TOL = 1e-10  # relative to max_i ||g_i||^2 (or to the natural scale of each condition)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The K x K ops are far too small for intra-op threads, whose spin-waits dominate (tens of
    ms) on a loaded machine; the callers run these solvers the same way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_jacobian(kind: str, K: int, n: int = 4, seed: int = 0) -> np.ndarray:
    """Explicit task gradients, one per row."""
    rng = np.random.default_rng(seed)
    J = rng.standard_normal((K, n))
    if kind == "conflicting":  # every g_i, i >= 1, has a negative inner product with g_0 (mostly)
        J[1:] = -0.7 * J[0] + 0.5 * rng.standard_normal((K - 1, n))
    elif kind == "identical":
        J[:] = J[0]
    elif kind == "opposite":
        J[:] = J[0] * np.where(np.arange(K) % 2 == 0, 1.0, -1.0)[:, None]
    elif kind == "zero_row":
        J[K // 2] = 0.0
    elif kind == "all_zero":
        J[:] = 0.0
    elif kind == "low_rank":
        J = rng.standard_normal((K, 2)) @ rng.standard_normal((2, n))
    elif kind == "duplicated":
        J[K - 1] = J[0]
    elif kind == "spread_norms":
        J *= np.logspace(-3, 3, K)[:, None]
    return J


def gramian(J: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(J @ J.T)


def scale_of(J: np.ndarray) -> float:
    """max_i ||g_i||^2, at least 1e-300 so that it can divide."""
    return max(float((J * J).sum(1).max()), 1e-300)


def cases(kinds=KINDS, ks=KS, n=4):
    return [pytest.param(kind, K, n, id=f"{kind}-K{K}") for kind in kinds for K in ks]


# ------------------------------------------------------------------------------------------------
# Oracles


def simplex_grid(K: int, steps: int) -> np.ndarray:
    """All points of the simplex in R^K with coordinates multiple of 1 / steps (K = 2, 3)."""
    if K == 2:
        y = np.arange(steps + 1) / steps
        return np.stack([y, 1 - y], 1)
    i, j = np.meshgrid(np.arange(steps + 1), np.arange(steps + 1), indexing="ij")
    keep = i + j <= steps
    i, j = i[keep], j[keep]
    return np.stack([i, j, steps - i - j], 1) / steps


def brute_min_norm_point(J: np.ndarray) -> np.ndarray:
    """The minimum-norm point of conv(rows of J): the least-norm point of the affine hull of every
    subset of rows, kept when it lies in the hull (nonnegative affine weights); the smallest one
    is the answer (Caratheodory: an affinely independent optimal face exists)."""
    K = J.shape[0]
    best = J[int(np.argmin((J * J).sum(1)))]
    for size in range(2, K + 1):
        for subset in itertools.combinations(range(K), size):
            G = J[list(subset)]
            # c = e_0 + D z with D's columns e_k - e_0: min ||G^T c|| is a least-squares problem.
            base, directions = G[0], (G[1:] - G[0]).T
            z = np.linalg.lstsq(directions, -base, rcond=None)[0]
            weights = np.concatenate([[1 - z.sum()], z])
            if weights.min() >= -1e-12:
                point = base + directions @ z
                if point @ point < best @ best:
                    best = point
    return best


def brute_dual_cone_projection(J: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Projection of x onto {y : J y >= 0}: it is the projection onto {y : J_S y = 0} for its
    active set S, so the closest feasible projection onto such subspaces over all S."""
    K, n = J.shape
    scale = np.sqrt(scale_of(J) * max(x @ x, 1e-300))
    best, best_dist = None, np.inf
    for size in range(0, K + 1):
        for subset in itertools.combinations(range(K), size):
            G = J[list(subset)]
            y = x - G.T @ np.linalg.lstsq(G.T, x, rcond=None)[0] if size else x.copy()
            if (J @ y).min() >= -1e-12 * scale and np.sum((x - y) ** 2) < best_dist:
                best, best_dist = y, np.sum((x - y) ** 2)
    return best


def assert_dual_cone_projection(J: np.ndarray, x: np.ndarray, p: np.ndarray):
    """p is the projection of x onto {y : J y >= 0}: feasible (checked by the caller) and no
    farther from x than the brute-force projection (a feasible point at most as far as the
    projection is the projection). Pointwise agreement too when the row norms are within 1e3
    of each other; beyond that the oracle's subspace projections lose the digits."""
    norms = np.linalg.norm(J, axis=1)
    expected = brute_dual_cone_projection(J, x)
    assert np.linalg.norm(p - x) <= np.linalg.norm(expected - x) + 1e-9 * np.linalg.norm(x)
    if norms.min() >= 1e-3 * norms.max():
        assert np.linalg.norm(p - expected) <= 1e-7 * max(norms.max(), 1e-300)


def cagrad_objective(J: np.ndarray, w: np.ndarray, c: float) -> np.ndarray:
    """F(w) = <g_w, g0> + c ||g0|| ||g_w|| for a batch of weights w [..., K]."""
    g0 = J.mean(0)
    gw = w @ J
    return gw @ g0 + c * np.linalg.norm(g0) * np.linalg.norm(gw, axis=-1)


def assert_in_simplex(c: np.ndarray):
    assert np.all(np.isfinite(c))
    assert c.min() >= 0.0
    assert abs(c.sum() - 1.0) <= 1e-14 * len(c)


def assert_simplex_kkt(grad: np.ndarray, c: np.ndarray, tol: float):
    """KKT of min over the simplex with gradient grad at c: grad_i = mu on the support,
    grad_i >= mu elsewhere, i.e. with mu = min grad: grad_i - mu <= tol wherever c_i > 0."""
    mu = grad.min()
    on_support = c > 1e-12
    assert np.all(grad[on_support] - mu <= tol), (grad, c)


# ------------------------------------------------------------------------------------------------
# Common contract: shapes, dtypes, finiteness, input conversion


ALL_FUNCTIONS = {
    "min_norm_simplex": (solvers.min_norm_simplex, lambda K: (K,)),
    "dual_cone_weights": (solvers.dual_cone_weights, lambda K: (K, K)),
    "upgrad_coefficients": (solvers.upgrad_coefficients, lambda K: (K,)),
    "nash_bargaining": (nash_bargaining, lambda K: (K,)),
    "cagrad_weights": (cagrad_weights, lambda K: (K,)),
    "cagrad_coefficients": (cagrad_coefficients, lambda K: (K,)),
}


@pytest.mark.parametrize("name", list(ALL_FUNCTIONS))
@pytest.mark.parametrize("kind,K,n", cases())
def test_finite_float64_cpu(name, kind, K, n):
    fn, shape = ALL_FUNCTIONS[name]
    out = fn(gramian(make_jacobian(kind, K, n)))
    assert out.dtype == torch.float64 and out.device.type == "cpu"
    assert out.shape == shape(K)
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", list(ALL_FUNCTIONS))
@pytest.mark.parametrize("kind", ["random", "low_rank", "identical", "zero_row"])
def test_float32_input(name, kind):
    """A float32 Gramian (as a caller computes it, possibly slightly indefinite) is accepted and
    gives the float64 answer of the rounded matrix, close to that of the exact one."""
    fn, _ = ALL_FUNCTIONS[name]
    J = make_jacobian(kind, 4, 6)
    M32 = torch.from_numpy(J).float() @ torch.from_numpy(J).float().T
    out32, out64 = fn(M32), fn(gramian(J))
    assert out32.dtype == torch.float64 and bool(torch.isfinite(out32).all())
    if kind == "random":  # M positive definite: the float32 rounding moves the answer little
        torch.testing.assert_close(out32, out64, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(ALL_FUNCTIONS))
def test_rejects_bad_input(name):
    fn, _ = ALL_FUNCTIONS[name]
    with pytest.raises(ValueError):
        fn(torch.ones(2, 3))
    with pytest.raises(ValueError):
        fn(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))


@pytest.mark.parametrize("name", list(ALL_FUNCTIONS))
def test_deterministic(name):
    fn, _ = ALL_FUNCTIONS[name]
    M = gramian(make_jacobian("conflicting", 6, 4))
    assert torch.equal(fn(M), fn(M.clone()))


# ------------------------------------------------------------------------------------------------
# min_norm_simplex (MGDA)


def check_min_norm_simplex(J: np.ndarray, c: np.ndarray):
    scale = scale_of(J)
    assert_in_simplex(c)
    M = J @ J.T
    # KKT of min c^T M c over the simplex: (M c)_i >= c^T M c with equality on the support
    value = c @ M @ c
    multipliers = M @ c - value
    assert multipliers.min() >= -TOL * scale
    assert np.abs(c * multipliers).max() <= TOL * scale
    # independent exact oracle: the minimum-norm point of the hull, by enumeration of the faces
    point = brute_min_norm_point(J)
    assert np.linalg.norm(c @ J - point) <= 1e-7 * np.sqrt(scale)
    assert value <= point @ point + TOL * scale


@pytest.mark.parametrize("kind,K,n", cases())
def test_min_norm_simplex_kkt_and_faces(kind, K, n):
    J = make_jacobian(kind, K, n)
    check_min_norm_simplex(J, solvers.min_norm_simplex(gramian(J)).numpy())


@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(3))
def test_min_norm_simplex_grid(K, kind, seed):
    J = make_jacobian(kind, K, 3, seed)
    c = solvers.min_norm_simplex(gramian(J)).numpy()
    grid = simplex_grid(K, 400 if K == 3 else 20000)
    grid_values = np.sum((grid @ J) ** 2, 1)
    assert c @ J @ J.T @ c <= grid_values.min() + TOL * scale_of(J)


def test_min_norm_simplex_two_tasks_closed_form():
    """By hand: c = (y, 1 - y), f(y) = ||y g1 + (1 - y) g2||^2 = ||g2 + y (g1 - g2)||^2, so
    f'(y) = 2 <g1 - g2, g2 + y (g1 - g2)> = 0 at y = <g2 - g1, g2> / ||g1 - g2||^2
    = (M22 - M12) / (M11 - 2 M12 + M22), clipped to [0, 1] (f is a convex parabola)."""
    rng = np.random.default_rng(3)
    for _ in range(50):
        J = rng.standard_normal((2, 3)) * rng.uniform(0.01, 100, (2, 1))
        M = J @ J.T
        y = np.clip((M[1, 1] - M[0, 1]) / (M[0, 0] - 2 * M[0, 1] + M[1, 1]), 0, 1)
        c = solvers.min_norm_simplex(torch.from_numpy(M)).numpy()
        np.testing.assert_allclose(c, [y, 1 - y], rtol=1e-12, atol=1e-14)
        # the general active-set path agrees with the closed form
        c_active, _ = solvers.min_norm_simplex_with_support(torch.from_numpy(M), least_norm=True)
        np.testing.assert_allclose(c_active.numpy(), [y, 1 - y], rtol=1e-10, atol=1e-12)


def test_min_norm_simplex_degenerate_values():
    g = np.array([[1.0, 2.0, -0.5]])
    mns = lambda J: solvers.min_norm_simplex(gramian(J)).numpy()  # noqa: E731
    np.testing.assert_array_equal(mns(g), [1.0])  # K = 1
    np.testing.assert_allclose(mns(np.zeros((4, 3))), np.full(4, 0.25))  # all zero: uniform
    for K in (2, 3, 5):  # identical gradients: least-norm c, uniform
        np.testing.assert_allclose(mns(np.repeat(g, K, 0)), np.full(K, 1 / K), rtol=1e-12)
    np.testing.assert_allclose(mns(np.concatenate([g, -g])), [0.5, 0.5], rtol=1e-12)  # g, -g
    J = make_jacobian("zero_row", 5)  # a zero gradient: d = 0 at e_i
    np.testing.assert_allclose(mns(J), np.eye(5)[2], atol=1e-15)
    # duplicated optimal vertex: split equally between the copies
    J = np.array([[1.0, 0.0], [1.0, 0.0], [3.0, 1.0]])
    np.testing.assert_allclose(mns(J), [0.5, 0.5, 0.0], atol=1e-14)


# ------------------------------------------------------------------------------------------------
# dual_cone_weights / upgrad_coefficients (UPGrad)


@pytest.mark.parametrize("kind,K,n", cases())
def test_dual_cone_projection(kind, K, n):
    J = make_jacobian(kind, K, n)
    scale = scale_of(J)
    W = solvers.dual_cone_weights(gramian(J)).numpy()
    assert np.all(W - np.eye(K) >= 0)
    projections = W @ J
    # in the dual cone
    assert (projections @ J.T).min() >= -TOL * scale
    for i in range(K):
        u = W[i] - np.eye(K)[i]
        # KKT of min ||g_i + sum_j u_j g_j||^2, u >= 0: <p_i, g_j> >= 0, = 0 where u_j > 0
        assert np.abs(u * (J @ projections[i])).max() <= TOL * scale * max(1.0, u.max())
        # the closest point of the cone: exact projection by enumeration of the faces
        assert_dual_cone_projection(J, J[i], projections[i])
    np.testing.assert_allclose(
        solvers.upgrad_coefficients(gramian(J)).numpy(), W.mean(0), rtol=1e-15, atol=0
    )


@pytest.mark.parametrize("seed", range(5))
def test_dual_cone_projection_beats_random_feasible_points(seed):
    """The projection is no farther from g_i than random points of the cone (found by rejection
    sampling around g_i in n = 3)."""
    rng = np.random.default_rng(seed)
    J = make_jacobian("conflicting", 3, 3, seed)
    projections = solvers.dual_cone_weights(gramian(J)).numpy() @ J
    for i in range(3):
        samples = J[i] + rng.standard_normal((20000, 3)) * np.linalg.norm(J[i])
        feasible = samples[(samples @ J.T).min(1) >= 0]
        assert len(feasible) > 10
        distances = np.linalg.norm(feasible - J[i], axis=1)
        assert np.linalg.norm(projections[i] - J[i]) <= distances.min() + 1e-12


def test_dual_cone_degenerate_values():
    g = np.array([[1.0, 2.0, -0.5]])
    dcw = lambda J: solvers.dual_cone_weights(gramian(J)).numpy()  # noqa: E731
    np.testing.assert_array_equal(dcw(g), [[1.0]])
    np.testing.assert_array_equal(dcw(np.zeros((3, 2))), np.eye(3))
    np.testing.assert_array_equal(dcw(np.repeat(g, 3, 0)), np.eye(3))  # no conflict
    np.testing.assert_allclose(dcw(np.concatenate([g, -g])), np.ones((2, 2)), rtol=1e-14)
    J = make_jacobian("zero_row", 5)
    np.testing.assert_array_equal(dcw(J)[2], np.eye(5)[2])  # a zero gradient projects to 0
    # duplicated conflicting gradient: least-norm u splits the weight equally between copies
    J = np.array([[1.0, 0.0], [-1.0, 1.0], [-1.0, 1.0]])
    W = dcw(J)
    assert W[0, 1] == pytest.approx(W[0, 2], rel=1e-12) and W[0, 1] > 0
    # two tasks, by hand: if <g1, g2> < 0 the projection of g1 is g1 - <g1, g2> / ||g2||^2 g2
    J = np.array([[1.0, 0.2], [-1.0, 1.0]])
    np.testing.assert_allclose(dcw(J)[0], [1.0, -(J[0] @ J[1]) / (J[1] @ J[1])], rtol=1e-14)


# ------------------------------------------------------------------------------------------------
# nash_bargaining (Nash-MTL)


def ridged(M: np.ndarray, ridge: float) -> np.ndarray:
    """nash_bargaining's documented regularisation: ridge times M's diagonal (trace / K where
    that is zero)."""
    K = M.shape[0]
    diagonal = np.diag(M)
    return M + ridge * np.diag(np.where(diagonal > 0, diagonal, np.trace(M) / K))


def nash_residual(M_ridge: np.ndarray, a: np.ndarray) -> float:
    """max_i |(M_r a)_i - 1 / a_i| relative to its rounding floor, eps (|M_r| a + 1 / a)_i: when
    M is singular the ridge-dominated a are huge and (M_r a)_i cancels down to 1 / a_i."""
    return float(np.max(np.abs(M_ridge @ a - 1 / a) / (np.abs(M_ridge) @ a + 1 / a)))


@pytest.mark.parametrize("kind,K,n", cases())
def test_nash_bargaining_residual(kind, K, n):
    J = make_jacobian(kind, K, n)
    M = J @ J.T
    a = nash_bargaining(torch.from_numpy(M)).numpy()
    assert np.all(a > 0) and np.all(np.isfinite(a))
    if np.trace(M) == 0:
        np.testing.assert_array_equal(a, np.ones(K))
        return
    assert nash_residual(ridged(M, 1e-8), a) <= 1e-13
    if np.linalg.eigvalsh(M)[0] > 1e-3 * np.trace(M):  # well conditioned: a_i (M_r a)_i = 1 itself
        assert np.abs(a * (ridged(M, 1e-8) @ a) - 1).max() <= 1e-12


@pytest.mark.parametrize("K", [1, 2, 3, 5, 10])
def test_nash_bargaining_without_ridge(K):
    J = make_jacobian("conflicting", K, K + 2, seed=K)  # full rank
    M = J @ J.T
    a = nash_bargaining(torch.from_numpy(M), ridge=0.0).numpy()
    assert np.abs(a * (M @ a) - 1).max() <= 1e-12
    assert np.abs(M @ a - 1 / a).max() <= 1e-12 * np.abs(1 / a).max()
    with pytest.raises(ValueError):
        nash_bargaining(gramian(make_jacobian("zero_row", 3)), ridge=0.0)


def test_nash_bargaining_closed_forms():
    g = np.array([[1.0, 2.0, -0.5]])
    gg = float(g[0] @ g[0])
    nash = lambda J, **kw: nash_bargaining(gramian(J), **kw).numpy()  # noqa: E731
    np.testing.assert_allclose(nash(g, ridge=0.0), [1 / np.sqrt(gg)], rtol=1e-14)
    # orthogonal gradients: M diagonal, a_i = 1 / ||g_i||
    J = np.diag([0.5, 2.0, 7.0])
    np.testing.assert_allclose(nash(J, ridge=0.0), [2.0, 0.5, 1 / 7], rtol=1e-14)
    # identical: a_i = 1 / sqrt(K ||g||^2 + ridge ||g||^2) (M_r = ||g||^2 (1 1^T + ridge I))
    for K in (2, 5):
        np.testing.assert_allclose(
            nash(np.repeat(g, K, 0)), np.full(K, 1 / np.sqrt((K + 1e-8) * gg)), rtol=1e-13
        )
    # g, -g: M_r (1, 1) = ridge ||g||^2 (1, 1), a = (1, 1) / sqrt(ridge ||g||^2), d = 0
    a = nash(np.concatenate([g, -g]))
    # (rtol: M_r = M + 1e-8 ||g||^2 I rounds ||g||^2 + 1e-8 ||g||^2 to eps ||g||^2, 1e-8 of the
    # ridge, which sets a here)
    np.testing.assert_allclose(a, np.full(2, 1 / np.sqrt(1e-8 * gg)), rtol=1e-7)
    # a zero gradient decouples: a_i = 1 / sqrt(ridge trace(M) / K)
    J = make_jacobian("zero_row", 5)
    np.testing.assert_allclose(nash(J)[2], 1 / np.sqrt(1e-8 * np.trace(J @ J.T) / 5), rtol=1e-13)


# ------------------------------------------------------------------------------------------------
# cagrad_weights / cagrad_coefficients (CAGrad)


def check_cagrad(J: np.ndarray, c: float):
    K = J.shape[0]
    scale = scale_of(J)
    M = J @ J.T
    w = cagrad_weights(torch.from_numpy(M), c).numpy()
    assert_in_simplex(w)
    g0 = J.mean(0)
    r = c * np.linalg.norm(g0)
    gw_norm = np.linalg.norm(w @ J)
    # Near g_w = 0 a Gramian gives ||g_w|| only to ~sqrt(eps) sum_i w_i ||g_i||: solvers.py
    # treats ||g_w|| <= 1e-6 sum_i w_i ||g_i|| + 1e-10 max_i ||g_i|| as the optimum g_w = 0
    # (F* = 0), with d in the dual cone.
    norms = np.linalg.norm(J, axis=1)
    at_zero = r > 0 and gw_norm <= 1e-6 * (w @ norms) + 1e-10 * norms.max()
    dual_value = cagrad_objective(J, w, c)
    if r == 0:
        assert_simplex_kkt(J @ g0, w, TOL * scale)
    elif not at_zero:
        # KKT: grad F = M b + r M w / ||g_w||
        assert_simplex_kkt(J @ g0 + r * (J @ (w @ J)) / gw_norm, w, TOL * scale)
    else:
        assert abs(dual_value) <= 1e-7 * scale
    # strong duality, an optimality certificate for both w and d: d is feasible for
    # max_d min_i <g_i, d> s.t. ||d - g0|| <= r, and its value equals the dual value F(w)
    for rescale in (False, True):
        coefficients = cagrad_coefficients(torch.from_numpy(M), c, rescale=rescale).numpy()
        assert np.all(np.isfinite(coefficients))
        d = coefficients @ J * ((1 + c * c) if rescale else 1.0)
        assert np.linalg.norm(d - g0) <= r * (1 + 1e-12) + 1e-14 * np.sqrt(scale)
        primal_value = (J @ d).min()
        if at_zero:  # the primal value is exactly 0 there
            assert abs(primal_value) <= TOL * scale
        elif K > 1:
            assert abs(primal_value - dual_value) <= TOL * scale
    return w


@pytest.mark.parametrize("c", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("kind,K,n", cases())
def test_cagrad_kkt_and_duality(kind, K, n, c):
    check_cagrad(make_jacobian(kind, K, n), c)


@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(3))
def test_cagrad_grid(K, kind, seed):
    J = make_jacobian(kind, K, 3, seed)
    w = cagrad_weights(gramian(J), 0.5).numpy()
    grid = simplex_grid(K, 400 if K == 3 else 20000)
    assert cagrad_objective(J, w, 0.5) <= cagrad_objective(J, grid, 0.5).min() + TOL * scale_of(J)


def test_cagrad_two_tasks_closed_form():
    """By hand, K = 2, interior solution: w = (y, 1 - y), g_w = g2 + y e with e = g1 - g2;
    F(y) = <g_w, g0> + r ||g_w||, F'(y) = <e, g0> + r <e, g_w> / ||g_w|| = 0. Split g_w into
    the component along e, q(y) = <e, g_w> / ||e||, and the orthogonal part h (fixed, ||h||^2 =
    ||g2||^2 - <e, g2>^2 / ||e||^2): then <e, g0> / ||e|| = -r q / sqrt(q^2 + ||h||^2), so with
    s = <e, g0> / ||e||, q = -s ||h|| / sqrt(r^2 - s^2) (needs |s| < r), and
    y = (q ||e|| - <e, g2>) / ||e||^2."""
    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(200):
        J = rng.standard_normal((2, 3))
        e, g2, g0 = J[0] - J[1], J[1], J.mean(0)
        r = 0.5 * np.linalg.norm(g0)
        e_norm = np.linalg.norm(e)
        s = e @ g0 / e_norm
        if abs(s) >= r:
            continue
        h_norm = np.sqrt(max(g2 @ g2 - (e @ g2) ** 2 / e_norm**2, 0.0))
        q = -s * h_norm / np.sqrt(r * r - s * s)
        y = (q * e_norm - e @ g2) / e_norm**2
        if not 0 < y < 1:
            continue
        w = cagrad_weights(gramian(J), 0.5).numpy()
        np.testing.assert_allclose(w, [y, 1 - y], rtol=1e-10, atol=1e-12)
        checked += 1
    assert checked > 20


def test_cagrad_degenerate_values():
    g = np.array([[1.0, 2.0, -0.5]])
    cw = lambda J, c=0.5: cagrad_weights(gramian(J), c).numpy()  # noqa: E731
    cc = lambda J, c=0.5, **kw: cagrad_coefficients(gramian(J), c, **kw).numpy()  # noqa: E731
    np.testing.assert_array_equal(cw(g), [1.0])
    np.testing.assert_allclose(cc(g), [1.5], rtol=1e-15)  # d = g0 + c ||g|| g / ||g||
    np.testing.assert_allclose(cc(g, rescale=True), [1.5 / 1.25], rtol=1e-15)
    np.testing.assert_allclose(cc(np.zeros((1, 3))), [1.0])
    np.testing.assert_allclose(cw(np.zeros((3, 2))), np.full(3, 1 / 3))
    np.testing.assert_allclose(cc(np.zeros((3, 2))), np.full(3, 1 / 3))
    # g and -g: g0 = 0, r = 0, d = 0
    np.testing.assert_allclose(cw(np.concatenate([g, -g])), [0.5, 0.5])
    np.testing.assert_allclose(cc(np.concatenate([g, -g])), [0.5, 0.5])
    # identical: d = g + c ||g|| g / ||g|| = (1 + c) g
    J = np.repeat(g, 3, 0)
    np.testing.assert_allclose(cc(J) @ J, 1.5 * g[0], rtol=1e-12)
    # 0 in the hull and optimal: g_w = 0, d = projection of g0 onto the dual cone (here g0
    # itself, which has <g_i, g0> = (0, 0, 1/3) >= 0); primal value 0 = dual value
    J = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(cw(J), [0.5, 0.5, 0.0], atol=1e-14)
    np.testing.assert_allclose(cc(J), np.full(3, 1 / 3), atol=1e-14)
    # c = 0: F = <g_w, g0> is linear, uniform over its cheapest vertices
    J = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    np.testing.assert_allclose(cw(J, 0.0), [0.0, 1.0, 0.0])
    with pytest.raises(ValueError):
        cw(J, -1.0)


# ------------------------------------------------------------------------------------------------
# Invariances


@pytest.mark.parametrize("factor", [2.0**-30, 3.7e6])
@pytest.mark.parametrize("kind,K,n", cases(ks=(2, 3, 5, 10)))
def test_scale_invariance(kind, K, n, factor):
    M = gramian(make_jacobian(kind, K, n))
    for fn in (solvers.min_norm_simplex, solvers.dual_cone_weights, cagrad_weights):
        torch.testing.assert_close(fn(M * factor), fn(M), rtol=1e-9, atol=1e-10)
    # Nash: a(t M) = a(M) / sqrt(t), as well as M's conditioning allows (the ridge-dominated
    # solutions of singular M have condition numbers ~1 / ridge = 1e8)
    if kind != "all_zero":  # a = 1 there, documented
        torch.testing.assert_close(
            nash_bargaining(M * factor) * factor**0.5, nash_bargaining(M), rtol=nash_rtol(M), atol=0
        )


def nash_rtol(M: torch.Tensor) -> float:
    """The ridge-dominated solutions of a singular M have condition numbers ~1 / ridge = 1e8."""
    return 1e-9 if bool(torch.linalg.eigvalsh(M)[0] > 1e-3 * M.trace()) else 1e-6


@pytest.mark.parametrize(
    "kind,K,n", cases(kinds=KINDS[:-2] + ("duplicated", "spread_norms"), ks=(2, 3, 5, 10))
)
def test_permutation_equivariance(kind, K, n):
    """The solutions are permutation equivariant where they are unique (and for ties the
    least-norm rule resolves, such as identical gradients); the directions d always are."""
    J = make_jacobian(kind, K, n)
    permutation = np.random.default_rng(K).permutation(K)
    M, M_permuted = gramian(J), gramian(J[permutation])
    index = torch.from_numpy(permutation)
    Jt = torch.from_numpy(J)

    def close(x, y):
        return torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10 * (1 + y.abs().max()))  # noqa: E731

    unique = kind in GENERIC_KINDS and K <= n or kind == "identical"

    c, c_permuted = solvers.min_norm_simplex(M), solvers.min_norm_simplex(M_permuted)
    close(c_permuted @ Jt[index], c @ Jt)
    W, W_permuted = solvers.dual_cone_weights(M), solvers.dual_cone_weights(M_permuted)
    close(W_permuted @ Jt[index], (W @ Jt)[index])  # the projections p_i
    coefficients = cagrad_coefficients(M)
    coefficients_permuted = cagrad_coefficients(M_permuted)
    close(coefficients_permuted @ Jt[index], coefficients @ Jt)
    if unique or kind in ("zero_row", "all_zero"):
        close(c_permuted, c[index])
        close(W_permuted, W[index][:, index])
    if unique and kind != "identical":  # for identical gradients every w is optimal
        close(cagrad_weights(M_permuted), cagrad_weights(M)[index])
        close(coefficients_permuted, coefficients[index])
    a, a_permuted = nash_bargaining(M), nash_bargaining(M_permuted)
    torch.testing.assert_close(a_permuted, a[index], rtol=nash_rtol(M), atol=0)


# ------------------------------------------------------------------------------------------------
# Property tests


@settings(max_examples=40, deadline=None)
@given(
    K=st.integers(1, 8),
    n=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    kind=st.sampled_from(KINDS),
    c=st.sampled_from([0.1, 0.5, 0.9]),
)
def test_property_all_solvers(K, n, seed, kind, c):
    J = make_jacobian(kind, K, n, seed)
    scale = scale_of(J)
    M = gramian(J)
    check_min_norm_simplex(J, solvers.min_norm_simplex(M).numpy())
    W = solvers.dual_cone_weights(M).numpy()
    assert ((W @ J) @ J.T).min() >= -TOL * scale
    for i in range(K):
        assert_dual_cone_projection(J, J[i], W[i] @ J)
    a = nash_bargaining(M).numpy()
    assert np.all(a > 0)
    if np.trace(J @ J.T) > 0:
        assert nash_residual(ridged(J @ J.T, 1e-8), a) <= 1e-13
    check_cagrad(J, c)
