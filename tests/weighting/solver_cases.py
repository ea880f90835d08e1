"""The Jacobians, oracles and checks of the K x K solver tests (test_weighting_solvers.py for
solvers.py, test_cagrad_nash_mtl_solvers.py for the solves of methods/cagrad.py and
methods/nash_mtl.py); docs/METHODS.md, section 4.

The oracles never call the solvers under test: KKT conditions evaluated in float64 numpy,
brute force over the simplex (a dense grid for K = 2, 3; every face for the exact problems),
CAGrad's primal-dual gap, and M = J J^T built from explicit Jacobians J (K x n) so that the
directions d = c @ J can be checked in gradient space.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fusedmtl.weighting.methods.cagrad import cagrad_coefficients, cagrad_weights

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


def spread_jacobian(K: int, n: int, decades: float, seed: int = 0) -> np.ndarray:
    """K x n random task gradients whose norms spread over 10^-decades .. 10^decades, in a
    random order (not sorted by norm)."""
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((K, n)) * np.logspace(-decades, decades, K)[rng.permutation(K)][:, None]
    )


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


def exact_min_norm_point(J: np.ndarray, digits: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """The minimum-norm point of conv(rows of J) in mpmath arithmetic of ``digits`` digits (no
    float64 rounding: the oracle of gradients whose norms spread over decades): on every
    affinely independent subset S the KKT system M_SS c = v 1, 1^T c = 1 of M = J J^T (exact
    products of J's float64 entries), kept when c >= 0; the least v wins. Returns (c, the point
    sum_i c_i g_i), rounded to float64."""
    import mpmath

    K, n = J.shape
    with mpmath.workdps(digits):
        rows = mpmath.matrix(J.tolist())
        M = rows * rows.T
        best, best_value = None, None
        for size in range(1, min(K, n + 1) + 1):
            for subset in itertools.combinations(range(K), size):
                system = mpmath.zeros(size + 1, size + 1)
                for a, i in enumerate(subset):
                    for b, j in enumerate(subset):
                        system[a, b] = M[i, j]
                    system[a, size], system[size, a] = -1, 1
                if abs(mpmath.det(system)) <= mpmath.mpf(10) ** (-digits // 2):
                    continue  # affinely dependent
                rhs = mpmath.matrix([0] * size + [1])
                solution = mpmath.lu_solve(system, rhs)
                if min(solution[a] for a in range(size)) < 0:
                    continue
                if best_value is None or solution[size] < best_value:
                    best, best_value = dict(zip(subset, solution)), solution[size]
        c = [best.get(i, mpmath.mpf(0)) for i in range(K)]
        point = [sum(c[i] * rows[i, k] for i in range(K)) for k in range(n)]
        return np.array([float(x) for x in c]), np.array([float(x) for x in point])


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


# Nash-MTL's regularised bargaining equation


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


# CAGrad: KKT and strong duality


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
    # Off g_w = 0, d - g0 = r g_w / ||g_w|| with ||g_w|| from the Gramian, whose rounding
    # resolves ||g_w||^2 only to ~eps (sum_i w_i ||g_i||)^2
    resolved = 0.0
    if r > 0 and not at_zero:
        resolved = np.finfo(np.float64).eps * ((w @ norms) / gw_norm) ** 2
    for rescale in (False, True):
        coefficients = cagrad_coefficients(torch.from_numpy(M), c, rescale=rescale).numpy()
        assert np.all(np.isfinite(coefficients))
        d = coefficients @ J * ((1 + c * c) if rescale else 1.0)
        assert np.linalg.norm(d - g0) <= r * (1 + 1e-12 + 4 * resolved) + 1e-14 * np.sqrt(scale)
        primal_value = (J @ d).min()
        if at_zero:  # the primal value is exactly 0 there
            assert abs(primal_value) <= TOL * scale
        elif K > 1:
            assert abs(primal_value - dual_value) <= TOL * scale
    return w
