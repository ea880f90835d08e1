"""MGDA (methods/mgda.py, docs/METHODS.md section 4) against float64 oracles: its update from
explicit per-task gradients through a model (float64 torch.autograd per task, ``task_grads64``),
in both grad modes and in representation mode, for every normalisation. The min-norm problem is
solved by enumeration of the active sets (``min_norm_simplex64``), cross-checked against its
K = 2 closed form and a grid.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from weighting_cases import (
    EPS,
    GRAD_MODES,
    K,
    SharedTrunkNet,
    assert_close64,
    flat_grad,
    head_grads64,
    make_batch,
    model_losses,
    task_grads64,
    transformed_losses,
    values64,
)

from fusedmtl.weighting import MGDA

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def min_norm_simplex64(M: torch.Tensor) -> torch.Tensor:
    """argmin_{a in simplex} a^T M a by enumeration of the supports: on each support S the KKT
    system M_SS a_S = mu 1, sum a_S = 1; the best feasible one wins."""
    M = M.double()
    k = M.shape[0]
    best, best_value = None, math.inf
    for r in range(1, k + 1):
        for support in itertools.combinations(range(k), r):
            s = list(support)
            A = torch.zeros(r + 1, r + 1, dtype=torch.float64)
            A[:r, :r] = M[s][:, s]
            A[:r, r] = -1.0
            A[r, :r] = 1.0
            rhs = torch.zeros(r + 1, dtype=torch.float64)
            rhs[r] = 1.0
            sol = torch.linalg.lstsq(A, rhs.unsqueeze(1), driver="gelsd").solution.squeeze(1)
            a_s = sol[:r]
            if (A @ sol - rhs).abs().max() > 1e-9 or a_s.min() < -1e-12:
                continue
            a = torch.zeros(k, dtype=torch.float64)
            a[s] = a_s.clamp_min(0)
            a = a / a.sum()
            value = float(a @ M @ a)
            if best is None or value < best_value:
                best, best_value = a, value
    return best


def mgda_oracle(G: torch.Tensor, loss_values, normalization: str) -> torch.Tensor:
    """MGDA coefficients c_i = a_i s_i from the K x N gradient matrix G (float64)."""
    norms = G.norm(dim=1)
    s = torch.ones(G.shape[0], dtype=torch.float64)
    if normalization in ("l2", "loss+"):
        s = torch.where(norms > 0, s / norms, 0.0)  # 1 / norm; a zero gradient gets 0
    if normalization in ("loss", "loss+"):
        s = s / (torch.as_tensor(loss_values, dtype=torch.float64).abs() + EPS)
    U = G * s[:, None]
    a = min_norm_simplex64(U @ U.T)
    return a * s


# -- MGDA -------------------------------------------------------------------------------------


def _random_gramian(k, n, seed, scales=None):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(k, n, generator=gen, dtype=torch.float64)
    if scales is not None:
        g = g * torch.tensor(scales, dtype=torch.float64)[:, None]
    return g @ g.T, g


def test_min_norm_oracle_agrees_with_k2_closed_form():
    for seed in range(20):
        M, _ = _random_gramian(2, 3, seed, scales=(1.0, 0.1 + seed / 5))
        a1 = min(max((M[1, 1] - M[0, 1]) / (M[0, 0] + M[1, 1] - 2 * M[0, 1]), 0.0), 1.0)
        assert_close64(min_norm_simplex64(M), [a1, 1 - a1], rtol=0, atol=1e-12)


SPECIAL_GRADIENTS = {
    "opposite": [[1.0, 0.0, 0.0], [-2.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
    "vertex": [[0.05, 0.05, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0]],  # the small one is the answer
    "edge": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [3.0, 3.0, 0.0]],
    "orthogonal": [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]],
    "aligned": [[1.0, 1.0, 0.0], [2.0, 2.0, 0.0], [3.0, 3.0, 0.0]],
}


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize(
    "case", ["random0", "random1", "random2", "scaled"] + list(SPECIAL_GRADIENTS)
)
def test_mgda_coefficients_are_the_min_norm_point(case, k):
    if case in SPECIAL_GRADIENTS:
        g = torch.tensor(SPECIAL_GRADIENTS[case], dtype=torch.float64)[:k]
        M = g @ g.T
    else:
        M, g = _random_gramian(
            k,
            5,
            seed=int(case[-1]) if case != "scaled" else 9,
            scales=(1.0, 1e-3, 30.0)[:k] if case == "scaled" else None,
        )
    dummy = torch.zeros(1, requires_grad=True)
    a = (
        MGDA([dummy], k, normalization="none")
        .coefficients(M.clone(), torch.ones(k, dtype=torch.float64))
        .double()
    )
    assert float(a.sum()) == pytest.approx(1.0, abs=1e-9) and float(a.min()) >= -1e-12
    expected = min_norm_simplex64(M)
    value, best = float(a @ M @ a), float(expected @ M @ expected)
    assert value <= best + 1e-10 * float(M.diagonal().max())
    if k == 2:
        a1 = min(max(float((M[1, 1] - M[0, 1]) / (M[0, 0] + M[1, 1] - 2 * M[0, 1])), 0.0), 1.0)
        assert_close64(a, [a1, 1 - a1], rtol=0, atol=1e-8, what="K=2 closed form")
    else:
        # a brute-force grid over the simplex finds nothing smaller
        n = 150
        grid = torch.tensor(
            [(i / n, j / n, (n - i - j) / n) for i in range(n + 1) for j in range(n + 1 - i)],
            dtype=torch.float64,
        )
        assert value <= float(((grid @ M) * grid).sum(1).min()) + 1e-12
        if torch.linalg.matrix_rank(M) == k:  # strictly convex: the minimiser is unique
            assert_close64(a, expected, rtol=0, atol=1e-7, what="minimiser")


@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_mgda_coefficients_and_update_match_float64_oracle(normalization, grad_mode, model, batch):
    losses = model_losses(model, batch)
    G = task_grads64(losses, model.shared)
    heads = head_grads64(model, losses)
    coeffs64 = mgda_oracle(G, values64(losses), normalization)
    weighting = MGDA(model.shared, K, normalization=normalization, grad_mode=grad_mode)
    coeffs = weighting.backward(losses)
    scale = float(coeffs64.abs().max())
    assert_close64(coeffs, coeffs64, rtol=1e-6, atol=1e-9 * scale, what="coefficients")
    d = coeffs64 @ G
    assert_close64(
        flat_grad(model.shared), d, rtol=1e-6, atol=1e-9 * float(d.abs().max()), what="shared .grad"
    )
    for i, head in enumerate(model.heads):
        assert_close64(
            flat_grad(head.parameters()), heads[i], rtol=1e-12, atol=1e-14, what=f"head {i}"
        )
    norms = G.norm(dim=1)
    assert_close64(weighting.last_grad_norms, norms, rtol=1e-10)
    assert_close64(
        weighting.last_cosine, (G @ G.T) / (norms[:, None] * norms[None, :]), rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mgda_direction_decreases_no_task_loss(normalization, seed):
    """<d, g_i> >= 0 for every task: d is the min-norm point of the hull of u_i = s_i g_i, so
    <d, u_i> >= |d|^2."""
    model = SharedTrunkNet(seed=10 + seed)
    losses = model_losses(model, make_batch(seed))
    G = task_grads64(losses, model.shared)
    MGDA(model.shared, K, normalization=normalization).backward(losses)
    d = flat_grad(model.shared)
    dots = G @ d
    tol = 1e-8 * float(d.norm() * G.norm(dim=1).max())
    assert bool((dots >= -tol).all()), dots


def test_mgda_l2_update_invariant_to_loss_scale(batch):
    reference, scaled = SharedTrunkNet(seed=3), SharedTrunkNet(seed=3)
    MGDA(reference.shared, K, normalization="l2", eps=1e-30).backward(
        model_losses(reference, batch)
    )
    MGDA(scaled.shared, K, normalization="l2", eps=1e-30).backward(
        transformed_losses(model_losses(scaled, batch), (100.0, 0.01, 3.0), (0.0, 0.0, 0.0))
    )
    expected = flat_grad(reference.shared)
    assert_close64(
        flat_grad(scaled.shared), expected, rtol=1e-7, atol=1e-9 * float(expected.abs().max())
    )


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_mgda_representation_mode_equals_feature_gradients_and_one_trunk_backward(
    normalization, model, batch
):
    losses, z = model_losses(model, batch, features=True)
    Z = task_grads64(losses, [z])
    heads = head_grads64(model, losses)
    coeffs64 = mgda_oracle(Z, values64(losses), normalization)
    dz = (coeffs64 @ Z).reshape(z.shape)
    trunk64 = torch.cat(
        [g.reshape(-1) for g in torch.autograd.grad(z, model.shared, dz, retain_graph=True)]
    )
    coeffs = MGDA(model.shared, K, normalization=normalization).backward(losses, features=z)
    assert_close64(
        coeffs, coeffs64, rtol=1e-6, atol=1e-9 * float(coeffs64.abs().max()), what="coefficients"
    )
    assert_close64(
        flat_grad(model.shared),
        trunk64,
        rtol=1e-6,
        atol=1e-9 * float(trunk64.abs().max()),
        what="shared .grad",
    )
    for i, head in enumerate(model.heads):
        assert_close64(
            flat_grad(head.parameters()), heads[i], rtol=1e-12, atol=1e-14, what=f"head {i}"
        )


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_mgda_zero_gradient_task_gives_finite_coefficients(normalization, model, batch):
    l0, l1, l2 = model_losses(model, batch)
    losses = [0.0 * l0, l1, l2]
    coeffs = MGDA(model.shared, K, normalization=normalization).backward(losses)
    assert bool(coeffs.isfinite().all())
    for p in model.parameters():
        assert bool(p.grad.isfinite().all())
    # the zero vector is in the hull: the min-norm update is zero (to rounding)
    assert float(flat_grad(model.shared).abs().max()) <= 1e-12
