"""Tests of the K x K solves of methods/nash_mtl.py (nash_bargaining) and methods/cagrad.py
(cagrad_weights, cagrad_coefficients); docs/METHODS.md, section 4. The Jacobians and the oracles
(KKT, CAGrad's primal-dual gap, brute force over the simplex) are in solver_cases.py; the contract
shared with solvers.py's functions, the invariances and the property tests are in
test_weighting_solvers.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from solver_cases import (
    KINDS,
    TOL,
    cagrad_objective,
    cases,
    check_cagrad,
    gramian,
    make_jacobian,
    nash_residual,
    ridged,
    scale_of,
    simplex_grid,
)

from fusedmtl.weighting.methods.cagrad import cagrad_coefficients, cagrad_weights
from fusedmtl.weighting.methods.nash_mtl import nash_bargaining

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------------
# nash_bargaining (Nash-MTL)


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


@pytest.mark.parametrize("c", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("kind,K,n", cases())
def test_cagrad_kkt_and_duality(kind, K, n, c):
    check_cagrad(make_jacobian(kind, K, n), c)


@pytest.mark.parametrize("c", [0.5, 0.9])
@pytest.mark.parametrize("K,n", [(4, 3), (8, 3), (8, 5)])
@pytest.mark.parametrize("seed", range(10))
def test_cagrad_kkt_with_norms_spread_1e6(seed, K, n, c):
    """Norms 1e-3 .. 1e3: w on the small gradients, ||g_w|| small, and CAGrad's KKT gradient r /
    ||g_w|| times the homotopy's multipliers. The faces' systems and the entering tests must
    resolve the small gradients (with Q = M + (trace / K) 1 1^T and multipliers tested to
    1e-12 max_i ||g_i||^2, 10 of these 60 cases left out a task that belonged in)."""
    check_cagrad(make_jacobian("spread_norms", K, n, seed), c)


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
