"""Tests of fusedmtl.weighting.solvers (docs/METHODS.md, section 4), and the contract, the
invariances and the property tests every K x K solve shares (CAGrad's and Nash-MTL's too; their
own tests are in test_cagrad_nash_mtl_solvers.py).

The oracles never call the solvers under test (solver_cases.py): KKT conditions evaluated in
float64 numpy, brute force over the simplex (a dense grid for K = 2, 3; every face for the exact
problems), closed forms derived by hand, CAGrad's primal-dual gap, and M = J J^T built from
explicit Jacobians J (K x n) so that the directions d = c @ J can be checked in gradient space.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from solver_cases import (
    GENERIC_KINDS,
    KINDS,
    TOL,
    assert_dual_cone_projection,
    assert_in_simplex,
    brute_min_norm_point,
    cases,
    check_cagrad,
    exact_min_norm_point,
    gramian,
    make_jacobian,
    nash_residual,
    ridged,
    scale_of,
    simplex_grid,
    spread_jacobian,
)

from fusedmtl.weighting import solvers
from fusedmtl.weighting.methods.cagrad import cagrad_coefficients, cagrad_weights
from fusedmtl.weighting.methods.nash_mtl import nash_bargaining

pytestmark = pytest.mark.usefixtures("single_thread")


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


SPREAD_SHAPES = [(2, 3), (3, 2), (3, 5), (4, 3), (5, 5), (6, 3), (6, 8), (8, 5), (8, 9)]


@pytest.mark.parametrize("path", ["cpu", "device"])
@pytest.mark.parametrize(
    "K,n,decades",
    [(K, n, d) for K, n in SPREAD_SHAPES + [(10, 4), (10, 8), (12, 6), (12, 14)] for d in (3, 6)],
)
@pytest.mark.parametrize("seed", range(3))
def test_min_norm_point_with_norms_spread_over_decades(K, n, decades, seed, path, monkeypatch):
    """Gradients whose norms spread over 10^-3 .. 10^3 or 10^-6 .. 10^6 (K > n included, where
    0 is often in the hull): MGDA's point sum_i c_i g_i is the exact one (mpmath) to 1e-10 of
    sum_i c_i ||g_i||, the scale its rounding has, on the CPU path (every support, K <= 8) and
    the device path (the NNLS, then its support's neighbours; K > 8 on both paths). (The solve
    on M + s 1 1^T alone, s = trace / K, was off by up to 1e-2 at 3 decades, 1 at 6: it rounds
    the small gradients' entries to ulp(s); with that s the NNLS's support was off by more than
    one index for K > 8 at 6 decades: errors of 0.4 .. 1.)"""
    monkeypatch.setattr(solvers, "CPU_SHORTCUTS", path == "cpu")
    J = spread_jacobian(K, n, decades, seed)
    exact_weights, exact_point = exact_min_norm_point(J)
    c = solvers.min_norm_simplex(gramian(J)).numpy()
    assert_in_simplex(c)
    norms = np.linalg.norm(J, axis=1)
    scale = max(c @ norms, exact_weights @ norms)
    assert np.linalg.norm(c @ J - exact_point) <= 1e-10 * scale


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
# The NNLS's two paths: every support at once (CPU, K <= ENUMERATED_MAX_K) and the active-set loop


def _nnls_problems(kind, K, n, dtype):
    """The NNLS problems of MGDA (one row) and of UPGrad's K projections (with the ridge of a
    ``dtype`` Gramian), as solvers.py poses them."""
    M, resolution = solvers.as_float64_gramian(gramian(make_jacobian(kind, K, n)).to(dtype))
    s = M.diagonal().sum() / K
    mgda = (M + s, s.expand(1, K), s.reshape(1))
    ridge = solvers.dual_cone_ridge(resolution)
    lower = torch.eye(K, dtype=torch.float64)
    Ml = lower @ M
    dual_cone = (M + ridge * torch.diag(M.diagonal().clamp_min(0)), -Ml, (Ml * lower).sum(-1))
    return {"mgda": mgda, "dual_cone": dual_cone}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind,K,n", cases(ks=(2, 3, 4, 6, 8)))
def test_nnls_on_every_support_is_the_active_set_loop(kind, K, n, dtype, monkeypatch):
    """On every kind of Gramian (identical, opposite, zero, duplicated, low-rank, K > n...), the
    enumeration certifies a support for every row (the loop is not needed) and finds the loop's
    minimum: the same Q x (= A^T A x, one for all minimisers) to 1e-12 of the problem's scale,
    nonnegative. (Where the minimiser is not unique and its least-norm one not certified, x
    itself may be another minimiser than the loop's: both are the active set's answer.)"""
    if kind == "all_zero":
        pytest.skip("MGDA and UPGrad answer a zero Gramian before any NNLS")
    for name, (Q, P, b_sq) in _nnls_problems(kind, K, n, dtype).items():
        column_norm = Q.diagonal().clamp_min(0).sqrt()
        b_norm = b_sq.clamp_min(0).sqrt().unsqueeze(-1)
        certified = solvers._nnls_on_every_support(Q, P, column_norm, b_norm)[2]
        assert bool(certified.all()), name
        for least_norm in (False, True):
            enumerated, _ = solvers._nnls_gram(Q, P, b_sq, least_norm)
            with monkeypatch.context() as patch:
                patch.setattr(solvers, "ENUMERATED_MAX_K", 0)
                looped, _ = solvers._nnls_gram(Q, P, b_sq, least_norm)
            scale = float(Q.diagonal().max()) * max(float(looped.abs().max()), 1.0)
            assert float(enumerated.min()) >= 0
            torch.testing.assert_close(enumerated @ Q, looped @ Q, rtol=0, atol=1e-12 * scale)


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
