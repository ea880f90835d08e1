"""The gradient-based weightings (fusedmtl/weighting/methods/, docs/METHODS.md section 4) against
float64 oracles: each method's update from explicit per-task gradients, either through a model
(float64 torch.autograd per task, ``task_grads64``) or through ``step(task_grads, losses)`` on an
explicit K x n Jacobian J split over a few parameter tensors, with d computed from J directly.
MGDA's are in test_mgda_methods.py.

The Jacobian tests of PCGrad, CAGrad, IMTL-G, Aligned-MTL, Nash-MTL, UPGrad and DB-MTL run on every
device of the ``device`` fixture, the oracle in float64 on the CPU: on CUDA the Gramian and combine
kernels and the solvers' device paths (no CPU shortcuts), over one seed of each shape
(``cuda_subset``).
"""

from __future__ import annotations

import math

import pytest
import torch
from weighting_cases import (
    EPS,
    GRAD_MODES,
    K,
    N,
    SharedTrunkNet,
    assert_close64,
    flat_grad,
    head_grads64,
    jacobian_params,
    make_batch,
    make_jacobian,
    model_losses,
    split_rows,
    step_update,
    task_grads64,
    transformed_losses,
    values64,
)

from fusedmtl import weighting
from fusedmtl.weighting import GradNorm, GradNormalization

JACOBIANS = [
    (k, seed, conflicting) for k in (2, 3, 5) for seed in (0, 1) for conflicting in (False, True)
]


def _update(method_cls, jacobian, losses=None, device="cpu", **kwargs):
    """(d written into .grad as a flat vector, the coefficients, the method), from a step on
    ``device`` (d and the coefficients returned on the CPU, for the float64 oracles)."""
    method = method_cls(jacobian_params(device=device), jacobian.shape[0], **kwargs)
    losses = None if losses is None else losses.to(device)
    d, coeffs = step_update(method, jacobian.to(device), losses)
    return d.cpu(), coeffs.cpu(), method


# On CUDA one seed of each (k, conflicting): the kernels and the device paths, not more samples.
ONE_SEED_ON_CUDA = pytest.mark.cuda_subset(seed=(0,))


# ============================================================================================
# 2. Gradient-based methods


@pytest.mark.parametrize("grad_mode", GRAD_MODES)
@pytest.mark.parametrize("rescale", [False, True])
def test_grad_normalization_update_matches_float64_oracle(rescale, grad_mode, model, batch):
    losses = model_losses(model, batch)
    G = task_grads64(losses, model.shared)
    heads = head_grads64(model, losses)
    norms = G.norm(dim=1)
    coeffs64 = 1 / (norms + EPS)
    if rescale:
        coeffs64 = coeffs64 * norms.mean()
    weighting = GradNormalization(model.shared, K, rescale=rescale, grad_mode=grad_mode)
    coeffs = weighting.backward(losses)
    assert_close64(coeffs, coeffs64, rtol=1e-10, what="coefficients")
    assert_close64(weighting.last_weights, coeffs64, rtol=1e-10, what="last_weights")
    assert_close64(weighting.last_grad_norms, norms, rtol=1e-10, what="last_grad_norms")
    assert_close64(
        flat_grad(model.shared), coeffs64 @ G, rtol=1e-10, atol=1e-13, what="shared .grad"
    )
    for i, head in enumerate(model.heads):
        assert_close64(
            flat_grad(head.parameters()), heads[i], rtol=1e-12, atol=1e-14, what=f"head {i} .grad"
        )


@pytest.mark.parametrize(
    "scales, shifts",
    [
        ((7.0, 1.0, 0.01), (0.0, 0.0, 0.0)),
        ((1.0, 1.0, 1.0), (5.0, -3.0, 100.0)),
        ((0.2, 30.0, 1.0), (1.0, 2.0, -0.5)),
    ],
)
def test_grad_normalization_shared_update_invariant_to_loss_scale_and_shift(scales, shifts, batch):
    reference, transformed = SharedTrunkNet(seed=1), SharedTrunkNet(seed=1)
    # eps (1e-8 by default) is the only thing that breaks the invariance: make it negligible
    GradNormalization(reference.shared, K, eps=1e-30).backward(model_losses(reference, batch))
    GradNormalization(transformed.shared, K, eps=1e-30).backward(
        transformed_losses(model_losses(transformed, batch), scales, shifts)
    )
    expected = flat_grad(reference.shared)
    assert_close64(
        flat_grad(transformed.shared), expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max())
    )


def gradnorm_oracle_step(weights, initial, layer_norms, loss_values, alpha, lr, k):
    """(weights used for d, weights after the SGD step and renormalisation, initial losses)."""
    if initial is None:
        initial = loss_values.clone()
    G = weights * layer_norms
    r = loss_values / initial
    r = r / r.mean()
    target = G.mean() * r**alpha
    grad = torch.sign(G - target) * layer_norms
    new = (weights - lr * grad).clamp_min(EPS)
    return weights, new * k / new.sum(), initial


@pytest.mark.parametrize("alpha", [0.5, 1.5])
@pytest.mark.parametrize("grad_mode", GRAD_MODES)
def test_gradnorm_weights_and_update_match_float64_reimplementation(alpha, grad_mode):
    lr, steps = 0.002, 6
    model = SharedTrunkNet(seed=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    layer = list(model.last_shared_layer.parameters())
    weighting = GradNorm(
        model.shared,
        K,
        last_shared_layer=model.last_shared_layer,
        alpha=alpha,
        weight_optimizer=lambda p: torch.optim.SGD(p, lr=lr),
        grad_mode=grad_mode,
    )
    weights64, initial64 = torch.ones(K, dtype=torch.float64), None
    changed = False
    for t in range(steps):
        losses = model_losses(model, make_batch(t))
        G = task_grads64(losses, model.shared)
        layer_norms = task_grads64(losses, layer).norm(dim=1)
        used, weights64, initial64 = gradnorm_oracle_step(
            weights64, initial64, layer_norms, values64(losses), alpha, lr, K
        )
        coeffs = weighting.backward(losses)
        assert_close64(coeffs, used, rtol=1e-5, what=f"step {t}: coefficients")
        assert_close64(
            flat_grad(model.shared), used @ G, rtol=1e-5, atol=1e-9, what=f"step {t}: shared .grad"
        )
        assert_close64(
            weighting.task_weights, weights64, rtol=1e-5, what=f"step {t}: weights after update"
        )
        assert float(weighting.task_weights.double().sum()) == pytest.approx(K, rel=1e-6)
        assert_close64(
            weighting.initial_losses, initial64, rtol=1e-6, what="initial losses (first step)"
        )
        assert_close64(
            weighting.last_grad_norms, layer_norms, rtol=1e-6, what="last_grad_norms (of W)"
        )
        changed |= not torch.allclose(weights64, torch.ones(K, dtype=torch.float64))
        optimizer.step()
        optimizer.zero_grad()
    assert changed


def test_gradnorm_closed_form_weight_gradient_equals_autograd_of_l_grad(model, batch):
    """dL_grad/dw_i = sign(G_i - target_i) norm(grad_W L_i), with L_grad differentiated by autograd
    (targets detached), as the SGD step of the weights reveals."""
    lr = 1e-3
    losses = model_losses(model, batch)
    layer = list(model.last_shared_layer.parameters())
    norms = task_grads64(losses, layer).norm(dim=1)
    w = torch.tensor([0.5, 1.7, 0.8], dtype=torch.float64, requires_grad=True)
    G = w * norms
    # first step: r = 1; target = mean G
    l_grad = (G - G.mean().detach()).abs().sum()
    (grad,) = torch.autograd.grad(l_grad, w)
    weighting = GradNorm(
        model.shared,
        K,
        last_shared_layer=layer,
        weight_optimizer=lambda p: torch.optim.SGD(p, lr=lr),
    )
    with torch.no_grad():
        weighting.task_weights.copy_(w.detach())
    weighting.backward(losses)
    new = w.detach() - lr * grad
    assert_close64(weighting.task_weights, new * K / new.sum(), rtol=1e-5)


def test_gradnorm_last_shared_layer_must_be_shared(model):
    with pytest.raises(ValueError):
        GradNorm(model.shared, K, last_shared_layer=model.heads[0])


def test_grad_normalization_representation_mode_matches_oracle(model, batch):
    losses, z = model_losses(model, batch, features=True)
    Z = task_grads64(losses, [z])
    coeffs64 = 1 / (Z.norm(dim=1) + EPS)
    dz = (coeffs64 @ Z).reshape(z.shape)
    trunk64 = torch.cat(
        [g.reshape(-1) for g in torch.autograd.grad(z, model.shared, dz, retain_graph=True)]
    )
    GradNormalization(model.shared, K).backward(losses, features=z)
    assert_close64(flat_grad(model.shared), trunk64, rtol=1e-9, atol=1e-13)


# -- PCGrad ------------------------------------------------------------------------------------


@ONE_SEED_ON_CUDA
@pytest.mark.parametrize("k,seed,conflicting", JACOBIANS)
def test_pcgrad_matches_sequential_projection_of_vectors(device, k, seed, conflicting):
    jacobian = make_jacobian(k, seed, conflicting)
    d, _, _ = _update(weighting.PCGrad, jacobian, device=device, seed=7)
    orders = torch.Generator().manual_seed(7)
    expected = torch.zeros(N, dtype=torch.float64)
    for i in range(k):
        projected = jacobian[i].clone()
        for j in torch.randperm(k, generator=orders).tolist():
            if j != i and projected @ jacobian[j] < 0:
                projected -= (projected @ jacobian[j]) / (jacobian[j] @ jacobian[j]) * jacobian[j]
        expected += projected
    torch.testing.assert_close(d, expected, rtol=1e-10, atol=1e-12)


def test_pcgrad_two_opposed_tasks_by_hand():
    """g1 = (1, 0), g2 = (-1, 1): <g1, g2> = -1, so g1' = g1 + g2 / 2 = (0.5, 0.5) and
    g2' = g2 + g1 = (0, 1); d = (0.5, 1.5) in any order."""
    jacobian = torch.zeros(2, N, dtype=torch.float64)
    jacobian[0, 0], jacobian[1, 0], jacobian[1, 1] = 1.0, -1.0, 1.0
    d, _, _ = _update(weighting.PCGrad, jacobian, seed=0)
    torch.testing.assert_close(d[:2], torch.tensor([0.5, 1.5], dtype=torch.float64))
    assert not d[2:].any()


# -- CAGrad ------------------------------------------------------------------------------------


@pytest.mark.cuda_subset(seed=(0,), c=(0.5,))
@pytest.mark.parametrize("k,seed,conflicting", JACOBIANS)
@pytest.mark.parametrize("c", [0.2, 0.5, 0.9])
def test_cagrad_maximises_the_worst_improvement_in_the_ball(device, k, seed, conflicting, c):
    """CAGrad's d solves max_d min_i <g_i, d> over the ball norm(d - g0) <= c norm(g0): it lies
    on the sphere, and no point of the ball (sampled) does better."""
    jacobian = make_jacobian(k, seed, conflicting)
    d, _, _ = _update(weighting.CAGrad, jacobian, device=device, c=c)
    g0 = jacobian.mean(0)
    radius = c * g0.norm()
    torch.testing.assert_close((d - g0).norm(), radius, rtol=1e-7, atol=0)
    worst = (jacobian @ d).min()
    g = torch.Generator().manual_seed(seed + 100)
    directions = torch.randn(4000, N, generator=g, dtype=torch.float64)
    candidates = g0 + radius * directions / directions.norm(dim=1, keepdim=True)
    assert worst >= (candidates @ jacobian.T).min(dim=1).values.max() - 1e-9 * g0.norm() ** 2


def test_cagrad_c_zero_is_the_mean_and_rescale_divides():
    jacobian = make_jacobian(3, 0, conflicting=True)
    d, _, _ = _update(weighting.CAGrad, jacobian, c=0.0)
    torch.testing.assert_close(d, jacobian.mean(0))
    plain, _, _ = _update(weighting.CAGrad, jacobian, c=0.5)
    rescaled, _, _ = _update(weighting.CAGrad, jacobian, c=0.5, rescale=True)
    torch.testing.assert_close(rescaled, plain / 1.25)


# -- IMTL-G ------------------------------------------------------------------------------------


@ONE_SEED_ON_CUDA
@pytest.mark.parametrize("k,seed,conflicting", JACOBIANS)
def test_imtl_g_projects_equally_onto_every_unit_gradient(device, k, seed, conflicting):
    jacobian = make_jacobian(k, seed, conflicting)
    d, coeffs, _ = _update(weighting.IMTLG, jacobian, device=device)
    torch.testing.assert_close(coeffs.sum(), torch.tensor(1.0, dtype=coeffs.dtype))
    projections = (jacobian / jacobian.norm(dim=1, keepdim=True)) @ d
    torch.testing.assert_close(projections, projections[0].expand(k), rtol=1e-9, atol=1e-12)


# -- Aligned-MTL -------------------------------------------------------------------------------


@ONE_SEED_ON_CUDA
@pytest.mark.parametrize("k,seed,conflicting", JACOBIANS)
@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
def test_aligned_mtl_is_the_mean_of_the_aligned_gradients(device, k, seed, conflicting, scale_mode):
    """With J = U S V^T (thin SVD), the aligned gradients are the rows of sigma U V^T: orthogonal,
    of equal norm sigma; d = their mean."""
    jacobian = make_jacobian(k, seed, conflicting)
    d, _, _ = _update(weighting.AlignedMTL, jacobian, device=device, scale_mode=scale_mode)
    u, s, vt = torch.linalg.svd(jacobian, full_matrices=False)
    eigenvalues = s.square()
    sigma = {"min": eigenvalues.min(), "median": eigenvalues.median(), "rmse": eigenvalues.mean()}[
        scale_mode
    ].sqrt()
    aligned = sigma * u @ vt
    torch.testing.assert_close(d, aligned.mean(0), rtol=1e-9, atol=1e-12)


def test_aligned_mtl_drops_the_null_space_of_rank_deficient_gradients():
    jacobian = make_jacobian(2, 0)
    jacobian = torch.cat([jacobian, jacobian[:1]])  # task 3 repeats task 1: rank 2
    d, coeffs, _ = _update(weighting.AlignedMTL, jacobian)
    assert torch.isfinite(coeffs).all() and d.norm() > 0


# -- Nash-MTL ----------------------------------------------------------------------------------


@ONE_SEED_ON_CUDA
@pytest.mark.parametrize("k,seed,conflicting", JACOBIANS)
def test_nash_mtl_solves_the_bargaining_equation(device, k, seed, conflicting):
    jacobian = make_jacobian(k, seed, conflicting)
    d, coeffs, _ = _update(weighting.NashMTL, jacobian, device=device, max_norm=None)
    gramian = jacobian @ jacobian.T
    ridged = gramian + 1e-8 * torch.diag(gramian.diagonal())  # the documented regularisation
    assert (coeffs > 0).all()
    torch.testing.assert_close(ridged @ coeffs.double(), 1.0 / coeffs.double(), rtol=1e-10, atol=0)
    torch.testing.assert_close(
        d.norm(), torch.tensor(math.sqrt(k), dtype=d.dtype), rtol=1e-6, atol=0
    )


def test_nash_mtl_clips_to_max_norm_and_is_invariant_to_loss_scale():
    jacobian = make_jacobian(3, 2, conflicting=True)
    d, _, _ = _update(weighting.NashMTL, jacobian, max_norm=0.5)
    torch.testing.assert_close(d.norm(), torch.tensor(0.5, dtype=d.dtype))
    scaled = jacobian * torch.tensor([[10.0], [1.0], [0.1]], dtype=torch.float64)
    torch.testing.assert_close(
        _update(weighting.NashMTL, scaled, max_norm=None)[0],
        _update(weighting.NashMTL, jacobian, max_norm=None)[0],
    )


def test_nash_mtl_update_every_reuses_the_solution():
    params = jacobian_params()
    method = weighting.NashMTL(params, 2, update_every=3, max_norm=None)
    first = method.step(split_rows(make_jacobian(2, 0)))
    second = method.step(split_rows(make_jacobian(2, 1)))
    fourth_input = split_rows(make_jacobian(2, 3))
    method.step(split_rows(make_jacobian(2, 2)))
    fourth = method.step(fourth_input)
    torch.testing.assert_close(second, first)
    assert not torch.allclose(fourth, first)


# -- UPGrad ------------------------------------------------------------------------------------


@ONE_SEED_ON_CUDA
@pytest.mark.parametrize("k,seed,conflicting", JACOBIANS)
def test_upgrad_conflicts_with_no_task(device, k, seed, conflicting):
    jacobian = make_jacobian(k, seed, conflicting)
    d, _, _ = _update(weighting.UPGrad, jacobian, device=device)
    scale = jacobian.norm(dim=1).max() ** 2
    assert (jacobian @ d >= -1e-9 * scale).all()


def test_upgrad_without_conflict_is_the_mean():
    jacobian = make_jacobian(3, 0).abs()  # non-negative rows: no pair conflicts
    d, _, _ = _update(weighting.UPGrad, jacobian)
    torch.testing.assert_close(d, jacobian.mean(0))


@pytest.mark.parametrize("k,seed", [(2, 0), (3, 4), (5, 1)])
def test_upgrad_projections_satisfy_the_projection_optimality_conditions(k, seed):
    """p_i is the projection of g_i onto the cone {x : J x >= 0} iff (KKT) p_i is in the cone
    and p_i = g_i + sum_j lam_j g_j with lam >= 0 and lam_j <p_i, g_j> = 0: dual_cone_weights'
    row i minus e_i is that lam."""
    from fusedmtl.weighting.solvers import dual_cone_weights

    jacobian = make_jacobian(k, seed, conflicting=True)
    weights = dual_cone_weights(jacobian @ jacobian.T)
    scale = jacobian.norm(dim=1).max() ** 2
    for i in range(k):
        multipliers = weights[i] - torch.eye(k, dtype=torch.float64)[i]
        projection = weights[i] @ jacobian
        slack = jacobian @ projection
        assert (multipliers >= -1e-12).all()
        assert (slack >= -1e-9 * scale).all()
        assert (
            multipliers * slack
        ).abs().max() <= 1e-9 * scale * multipliers.abs().max().clamp_min(1)


# -- DB-MTL ------------------------------------------------------------------------------------


@ONE_SEED_ON_CUDA
@pytest.mark.parametrize("k,seed,conflicting", JACOBIANS)
def test_db_mtl_without_average_balances_log_gradients_to_the_largest(device, k, seed, conflicting):
    jacobian = make_jacobian(k, seed, conflicting)
    losses = torch.linspace(0.5, 3.0, k, dtype=torch.float64)
    d, _, _ = _update(weighting.DBMTL, jacobian, losses, device=device, beta=0.0)
    log_grads = jacobian / losses[:, None]
    norms = log_grads.norm(dim=1)
    torch.testing.assert_close(
        d, norms.max() * (log_grads / norms[:, None]).sum(0), rtol=1e-10, atol=1e-12
    )


def test_db_mtl_running_average_and_checkpoint():
    """Three steps with beta = 0.9, beta_sigma = 0.5 against the recurrence
    h <- g/L + beta / t^sigma (h - g/L) from h = 0; a reloaded module continues identically."""
    params = jacobian_params()
    method = weighting.DBMTL(params, 2, beta=0.9, beta_sigma=0.5)
    average = torch.zeros(2, N, dtype=torch.float64)
    for t in range(1, 4):
        jacobian, losses = make_jacobian(2, t), torch.tensor([1.0 + t, 0.5], dtype=torch.float64)
        for p in params:
            p.grad = None
        method.step(split_rows(jacobian), losses)
        log_grads = jacobian / losses[:, None]
        average = log_grads + 0.9 / t**0.5 * (average - log_grads)
        norms = average.norm(dim=1)
        expected = norms.max() * (average / norms[:, None]).sum(0)
        torch.testing.assert_close(
            torch.cat([p.grad.reshape(-1) for p in params]), expected, rtol=1e-10, atol=1e-12
        )
    reloaded = weighting.DBMTL(jacobian_params(), 2, beta=0.9, beta_sigma=0.5)
    reloaded.load_state_dict(method.state_dict())
    step_input = (make_jacobian(2, 9), torch.tensor([2.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(
        reloaded.step(split_rows(step_input[0]), step_input[1]),
        method.step(split_rows(step_input[0]), step_input[1]),
        rtol=0,
        atol=0,
    )


def test_db_mtl_skipped_step_keeps_the_running_averages():
    """A step with a non-finite gradient, skipped, leaves the averages as they were (step() writes
    the new ones into spare buffers first); the next finite step continues the recurrence."""
    params = jacobian_params()
    method = weighting.DBMTL(params, 2, beta=0.9, on_nonfinite="skip")
    losses = torch.tensor([1.5, 0.5], dtype=torch.float64)
    method.step(split_rows(make_jacobian(2, 1)), losses)
    before = {name: b.clone() for name, b in method.named_buffers()}
    bad = make_jacobian(2, 2)
    bad[0, 3] = math.inf
    with pytest.warns(UserWarning, match="skipping"):
        assert method.step(split_rows(bad), losses) is None
    for name, b in method.named_buffers():
        assert torch.equal(b, before[name]), name
    fresh = weighting.DBMTL(jacobian_params(), 2, beta=0.9)
    fresh.load_state_dict(method.state_dict())
    step_input = split_rows(make_jacobian(2, 3))
    torch.testing.assert_close(
        method.step(step_input, losses), fresh.step(step_input, losses), rtol=0, atol=0
    )
