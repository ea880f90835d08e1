"""The Gramian methods of part 2 (PCGrad, CAGrad, IMTL-G, Aligned-MTL, Nash-MTL, UPGrad, DB-MTL)
and FAMO against float64 oracles on explicit Jacobians, plus properties every gradient-based
method shares (finite answers on degenerate inputs, permutation equivariance, K = 1).

Each method runs through ``step(task_grads, losses)``: the task gradients are the rows of an
explicit K x n Jacobian J, split over a few parameter tensors, and the update the method writes
into .grad is compared with d computed from J directly.
"""

from __future__ import annotations

import math

import pytest
import torch

from fusedmtl import weighting

SHAPES = [(3, 4), (5,), (2, 2)]  # 21 elements over 3 parameters
N = sum(math.prod(s) for s in SHAPES)


def _params():
    return [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in SHAPES]


def _task_grads(jacobian: torch.Tensor) -> list[list[torch.Tensor]]:
    rows = []
    for row in jacobian:
        pieces, offset = [], 0
        for s in SHAPES:
            pieces.append(row[offset: offset + math.prod(s)].reshape(s).clone())
            offset += math.prod(s)
        rows.append(pieces)
    return rows


def _update(method_cls, jacobian, losses=None, **kwargs):
    """(d written into .grad as a flat vector, the coefficients)."""
    params = _params()
    method = method_cls(params, jacobian.shape[0], **kwargs)
    coeffs = method.step(_task_grads(jacobian), losses)
    return torch.cat([p.grad.reshape(-1) for p in params]), coeffs, method


def _jacobian(k: int, seed: int, conflicting: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    jacobian = torch.randn(k, N, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, k, dtype=torch.float64)[:, None]
    if conflicting:  # every later task pulls against the first
        jacobian[1:] -= 1.5 * jacobian[:1] * jacobian[1:].norm(dim=1, keepdim=True) / jacobian[0].norm()
    return jacobian


JACOBIANS = [(k, seed, conflicting) for k in (2, 3, 5) for seed in (0, 1) for conflicting in (False, True)]


# -- PCGrad ------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,seed,conflicting", JACOBIANS)
def test_pcgrad_matches_sequential_projection_of_vectors(k, seed, conflicting):
    jacobian = _jacobian(k, seed, conflicting)
    d, _, _ = _update(weighting.PCGrad, jacobian, seed=7)
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


@pytest.mark.parametrize("k,seed,conflicting", JACOBIANS)
@pytest.mark.parametrize("c", [0.2, 0.5, 0.9])
def test_cagrad_maximises_the_worst_improvement_in_the_ball(k, seed, conflicting, c):
    """CAGrad's d solves max_d min_i <g_i, d> over the ball norm(d - g0) <= c norm(g0): it lies
    on the sphere, and no point of the ball (sampled) does better."""
    jacobian = _jacobian(k, seed, conflicting)
    d, _, _ = _update(weighting.CAGrad, jacobian, c=c)
    g0 = jacobian.mean(0)
    radius = c * g0.norm()
    torch.testing.assert_close((d - g0).norm(), radius, rtol=1e-7, atol=0)
    worst = (jacobian @ d).min()
    g = torch.Generator().manual_seed(seed + 100)
    directions = torch.randn(4000, N, generator=g, dtype=torch.float64)
    candidates = g0 + radius * directions / directions.norm(dim=1, keepdim=True)
    assert worst >= (candidates @ jacobian.T).min(dim=1).values.max() - 1e-9 * g0.norm() ** 2


def test_cagrad_c_zero_is_the_mean_and_rescale_divides():
    jacobian = _jacobian(3, 0, conflicting=True)
    d, _, _ = _update(weighting.CAGrad, jacobian, c=0.0)
    torch.testing.assert_close(d, jacobian.mean(0))
    plain, _, _ = _update(weighting.CAGrad, jacobian, c=0.5)
    rescaled, _, _ = _update(weighting.CAGrad, jacobian, c=0.5, rescale=True)
    torch.testing.assert_close(rescaled, plain / 1.25)


# -- IMTL-G ------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,seed,conflicting", JACOBIANS)
def test_imtl_g_projects_equally_onto_every_unit_gradient(k, seed, conflicting):
    jacobian = _jacobian(k, seed, conflicting)
    d, coeffs, _ = _update(weighting.IMTLG, jacobian)
    torch.testing.assert_close(coeffs.sum(), torch.tensor(1.0, dtype=coeffs.dtype))
    projections = (jacobian / jacobian.norm(dim=1, keepdim=True)) @ d
    torch.testing.assert_close(projections, projections[0].expand(k), rtol=1e-9, atol=1e-12)


# -- Aligned-MTL -------------------------------------------------------------------------------


@pytest.mark.parametrize("k,seed,conflicting", JACOBIANS)
@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
def test_aligned_mtl_is_the_mean_of_the_aligned_gradients(k, seed, conflicting, scale_mode):
    """With J = U S V^T (thin SVD), the aligned gradients are the rows of sigma U V^T: orthogonal,
    of equal norm sigma; d = their mean."""
    jacobian = _jacobian(k, seed, conflicting)
    d, _, _ = _update(weighting.AlignedMTL, jacobian, scale_mode=scale_mode)
    u, s, vt = torch.linalg.svd(jacobian, full_matrices=False)
    eigenvalues = s.square()
    sigma = {"min": eigenvalues.min(), "median": eigenvalues.median(), "rmse": eigenvalues.mean()}[scale_mode].sqrt()
    aligned = sigma * u @ vt
    torch.testing.assert_close(d, aligned.mean(0), rtol=1e-9, atol=1e-12)


def test_aligned_mtl_drops_the_null_space_of_rank_deficient_gradients():
    jacobian = _jacobian(2, 0)
    jacobian = torch.cat([jacobian, jacobian[:1]])  # task 3 repeats task 1: rank 2
    d, coeffs, _ = _update(weighting.AlignedMTL, jacobian)
    assert torch.isfinite(coeffs).all() and d.norm() > 0


# -- Nash-MTL ----------------------------------------------------------------------------------


@pytest.mark.parametrize("k,seed,conflicting", JACOBIANS)
def test_nash_mtl_solves_the_bargaining_equation(k, seed, conflicting):
    jacobian = _jacobian(k, seed, conflicting)
    d, coeffs, _ = _update(weighting.NashMTL, jacobian, max_norm=None)
    gramian = jacobian @ jacobian.T
    ridged = gramian + 1e-8 * torch.diag(gramian.diagonal())  # the documented regularisation
    assert (coeffs > 0).all()
    torch.testing.assert_close(ridged @ coeffs.double(), 1.0 / coeffs.double(), rtol=1e-10, atol=0)
    torch.testing.assert_close(d.norm(), torch.tensor(math.sqrt(k), dtype=d.dtype), rtol=1e-6, atol=0)


def test_nash_mtl_clips_to_max_norm_and_is_invariant_to_loss_scale():
    jacobian = _jacobian(3, 2, conflicting=True)
    d, _, _ = _update(weighting.NashMTL, jacobian, max_norm=0.5)
    torch.testing.assert_close(d.norm(), torch.tensor(0.5, dtype=d.dtype))
    scaled = jacobian * torch.tensor([[10.0], [1.0], [0.1]], dtype=torch.float64)
    torch.testing.assert_close(_update(weighting.NashMTL, scaled, max_norm=None)[0], _update(weighting.NashMTL, jacobian, max_norm=None)[0])


def test_nash_mtl_update_every_reuses_the_solution():
    params = _params()
    method = weighting.NashMTL(params, 2, update_every=3, max_norm=None)
    first = method.step(_task_grads(_jacobian(2, 0)))
    second = method.step(_task_grads(_jacobian(2, 1)))
    fourth_input = _task_grads(_jacobian(2, 3))
    method.step(_task_grads(_jacobian(2, 2)))
    fourth = method.step(fourth_input)
    torch.testing.assert_close(second, first)
    assert not torch.allclose(fourth, first)


# -- UPGrad ------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,seed,conflicting", JACOBIANS)
def test_upgrad_conflicts_with_no_task(k, seed, conflicting):
    jacobian = _jacobian(k, seed, conflicting)
    d, _, _ = _update(weighting.UPGrad, jacobian)
    scale = jacobian.norm(dim=1).max() ** 2
    assert (jacobian @ d >= -1e-9 * scale).all()


def test_upgrad_without_conflict_is_the_mean():
    jacobian = _jacobian(3, 0).abs()  # non-negative rows: no pair conflicts
    d, _, _ = _update(weighting.UPGrad, jacobian)
    torch.testing.assert_close(d, jacobian.mean(0))


@pytest.mark.parametrize("k,seed", [(2, 0), (3, 4), (5, 1)])
def test_upgrad_projections_satisfy_the_projection_optimality_conditions(k, seed):
    """p_i is the projection of g_i onto the cone {x : J x >= 0} iff (KKT) p_i is in the cone
    and p_i = g_i + sum_j lam_j g_j with lam >= 0 and lam_j <p_i, g_j> = 0: dual_cone_weights'
    row i minus e_i is that lam."""
    from fusedmtl.weighting.solvers import dual_cone_weights

    jacobian = _jacobian(k, seed, conflicting=True)
    weights = dual_cone_weights(jacobian @ jacobian.T)
    scale = jacobian.norm(dim=1).max() ** 2
    for i in range(k):
        multipliers = weights[i] - torch.eye(k, dtype=torch.float64)[i]
        projection = weights[i] @ jacobian
        slack = jacobian @ projection
        assert (multipliers >= -1e-12).all()
        assert (slack >= -1e-9 * scale).all()
        assert (multipliers * slack).abs().max() <= 1e-9 * scale * multipliers.abs().max().clamp_min(1)


# -- DB-MTL ------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,seed,conflicting", JACOBIANS)
def test_db_mtl_without_average_balances_log_gradients_to_the_largest(k, seed, conflicting):
    jacobian = _jacobian(k, seed, conflicting)
    losses = torch.linspace(0.5, 3.0, k, dtype=torch.float64)
    d, _, _ = _update(weighting.DBMTL, jacobian, losses, beta=0.0)
    log_grads = jacobian / losses[:, None]
    norms = log_grads.norm(dim=1)
    torch.testing.assert_close(d, norms.max() * (log_grads / norms[:, None]).sum(0), rtol=1e-10, atol=1e-12)


def test_db_mtl_running_average_and_checkpoint():
    """Three steps with beta = 0.9, beta_sigma = 0.5 against the recurrence
    h <- g/L + beta / t^sigma (h - g/L) from h = 0; a reloaded module continues identically."""
    params = _params()
    method = weighting.DBMTL(params, 2, beta=0.9, beta_sigma=0.5)
    average = torch.zeros(2, N, dtype=torch.float64)
    for t in range(1, 4):
        jacobian, losses = _jacobian(2, t), torch.tensor([1.0 + t, 0.5], dtype=torch.float64)
        for p in params:
            p.grad = None
        method.step(_task_grads(jacobian), losses)
        log_grads = jacobian / losses[:, None]
        average = log_grads + 0.9 / t**0.5 * (average - log_grads)
        norms = average.norm(dim=1)
        expected = norms.max() * (average / norms[:, None]).sum(0)
        torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in params]), expected, rtol=1e-10, atol=1e-12)
    reloaded = weighting.DBMTL(_params(), 2, beta=0.9, beta_sigma=0.5)
    reloaded.load_state_dict(method.state_dict())
    step_input = (_jacobian(2, 9), torch.tensor([2.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(
        reloaded.step(_task_grads(step_input[0]), step_input[1]), method.step(_task_grads(step_input[0]), step_input[1]),
        rtol=0, atol=0,
    )


def test_db_mtl_skipped_step_keeps_the_running_averages():
    """A step with a non-finite gradient, skipped, leaves the averages as they were (step() writes
    the new ones into spare buffers first); the next finite step continues the recurrence."""
    params = _params()
    method = weighting.DBMTL(params, 2, beta=0.9, on_nonfinite="skip")
    losses = torch.tensor([1.5, 0.5], dtype=torch.float64)
    method.step(_task_grads(_jacobian(2, 1)), losses)
    before = {name: b.clone() for name, b in method.named_buffers()}
    bad = _jacobian(2, 2)
    bad[0, 3] = math.inf
    with pytest.warns(UserWarning, match="skipping"):
        assert method.step(_task_grads(bad), losses) is None
    for name, b in method.named_buffers():
        assert torch.equal(b, before[name]), name
    fresh = weighting.DBMTL(_params(), 2, beta=0.9)
    fresh.load_state_dict(method.state_dict())
    step_input = _task_grads(_jacobian(2, 3))
    torch.testing.assert_close(method.step(step_input, losses), fresh.step(step_input, losses), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(weighting.GRADIENT_BASED))
def test_step_leaves_the_given_gradients_untouched(name):
    """step() reads the caller's gradients; methods that transform them (DB-MTL) work on copies,
    so calling it twice with the same gradients is two steps on the same input."""
    task_grads = _task_grads(_jacobian(3, 5, conflicting=True))
    before = [[g.clone() for g in row] for row in task_grads]
    method = _method(name, _params(), 3)
    method.step(task_grads, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    for row, row_before in zip(task_grads, before):
        for g, g_before in zip(row, row_before):
            assert torch.equal(g, g_before)


# -- FAMO --------------------------------------------------------------------------------------


def test_famo_against_its_update_rule():
    """Logits xi from 0, updated by SGD(lr) on J_softmax^T delta with delta the log-loss decrease;
    weights z / (c (L + eps)), c = sum z / (L + eps)."""
    lr, eps = 0.3, 1e-8
    method = weighting.FAMO(3, weight_optimizer=lambda p: torch.optim.SGD(p, lr=lr), eps=eps)
    g = torch.Generator().manual_seed(0)
    logits, previous = torch.zeros(3, dtype=torch.float64), None
    for _ in range(5):
        values = torch.rand(3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64)
        losses = values.clone().requires_grad_()
        total = method(list(losses))
        if previous is not None:
            logits = logits.requires_grad_()
            delta = (previous + eps).log() - (values + eps).log()
            (grad,) = torch.autograd.grad(torch.softmax(logits, 0), logits, delta)
            logits = (logits - lr * grad).detach()
        previous = values
        z = torch.softmax(logits, 0)
        c = (z / (values + eps)).sum()
        torch.testing.assert_close(method.last_weights.double(), z / (c * (values + eps)), rtol=1e-6, atol=0)
        torch.testing.assert_close(total.double(), ((z * (values + eps).log()).sum() / c).double(), rtol=1e-6, atol=0)
        (grad_losses,) = torch.autograd.grad(total, losses)
        torch.testing.assert_close(grad_losses, method.last_weights.to(grad_losses))


# -- properties shared by every gradient-based method -------------------------------------------


def _method(name: str, params, k: int):
    kwargs = {"last_shared_layer": params[-1:]} if name == "gradnorm" else {}
    return weighting.GRADIENT_BASED[name](params, k, **kwargs)


def _degenerate(kind: str) -> torch.Tensor:
    g = _jacobian(1, 0)[0]
    return {
        "identical": torch.stack([g, g, g]),
        "opposite": torch.stack([g, -g]),
        "zero_gradient": torch.stack([g, torch.zeros_like(g), _jacobian(2, 1)[1]]),
        "all_zero": torch.zeros(2, N, dtype=torch.float64),
        "single_task": g[None],
    }[kind]


@pytest.mark.parametrize("name", list(weighting.GRADIENT_BASED))
@pytest.mark.parametrize("kind", ["identical", "opposite", "zero_gradient", "all_zero", "single_task"])
def test_degenerate_gradients_give_a_finite_update(name, kind):
    jacobian = _degenerate(kind)
    params = _params()
    method = _method(name, params, jacobian.shape[0])
    losses = torch.linspace(1.0, 2.0, jacobian.shape[0], dtype=torch.float64)
    coeffs = method.step(_task_grads(jacobian), losses)
    assert torch.isfinite(coeffs).all(), coeffs
    assert all(torch.isfinite(p.grad).all() for p in params)
    if kind == "single_task" and name not in ("gradnorm",):
        d = torch.cat([p.grad.reshape(-1) for p in params])
        cosine = d @ jacobian[0] / (d.norm() * jacobian[0].norm())
        torch.testing.assert_close(cosine, torch.tensor(1.0, dtype=cosine.dtype))


DETERMINISTIC = [n for n in weighting.GRADIENT_BASED if n not in ("pcgrad", "gradvac")]


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_permuting_the_tasks_permutes_the_coefficients(name):
    jacobian = _jacobian(4, 3, conflicting=True)
    losses = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    perm = torch.tensor([2, 0, 3, 1])
    coeffs = _method(name, _params(), 4).step(_task_grads(jacobian), losses)
    permuted = _method(name, _params(), 4).step(_task_grads(jacobian[perm]), losses[perm])
    torch.testing.assert_close(permuted, coeffs[perm], rtol=1e-7, atol=1e-10)
