"""DualProj, ConFIG, Krum and FairGrad against torchjd 0.18's own aggregators (the oracle), on the
same float64 Jacobians: fusedmtl gets the Gramian J J^T through ``step``, torchjd gets J, and the
updates d (direction and scale) must agree. Plus degenerate Jacobians, K > G and one end-to-end
``backward(losses)`` on a shared-trunk model.

The agreement over random Jacobians runs on every device of the ``device`` fixture (on CUDA one
seed of each shape): fusedmtl's Gramian kernel and the solvers' device paths there, torchjd on the
CPU."""

from __future__ import annotations

import pytest
import torch

from fusedmtl import weighting

torchjd_aggregation = pytest.importorskip("torchjd.aggregation")
from torchjd._linalg import QuadprogProjector  # noqa: E402

G = 20  # gradient length


def _torchjd(name: str):
    """torchjd's aggregator with the settings of fusedmtl's method in METHODS (same order)."""
    if name == "dualproj":
        # torchjd's default projector regularises the Gramian by 1e-4 (relative to its trace),
        # which moves the answer for gradients of different scales; the exact QP is the oracle.
        return torchjd_aggregation.DualProj(
            projector=QuadprogProjector(norm_eps=1e-12, reg_eps=1e-12)
        )
    return {
        "config": lambda: torchjd_aggregation.ConFIG(),
        "krum": lambda: torchjd_aggregation.Krum(n_byzantine=1, n_selected=2),
        "fairgrad": lambda: torchjd_aggregation.FairGrad(alpha=2.0),
    }[name]()


METHODS = {
    "dualproj": (weighting.DualProj, {}),
    "config": (weighting.ConFIG, {}),
    "krum": (weighting.Krum, {"n_byzantine": 1, "n_selected": 2}),
    "fairgrad": (weighting.FairGrad, {"alpha": 2.0}),
}
# quadprog and scipy's least_squares stop at their own tolerances; ConFIG and Krum are closed forms.
RTOL = {"dualproj": 1e-5, "config": 1e-10, "krum": 1e-12, "fairgrad": 1e-6}


def _update(name: str, jacobian: torch.Tensor, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(d written into .grad, the coefficients), through ``step`` on two parameter tensors on
    ``device`` (returned on the CPU)."""
    return _update_with(name, jacobian, METHODS[name][1], device)


def _update_with(
    name: str, jacobian: torch.Tensor, kwargs: dict, device="cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    cls = METHODS[name][0]
    params = [
        torch.zeros(5, 2, dtype=torch.float64, device=device, requires_grad=True),
        torch.zeros(G - 10, dtype=torch.float64, device=device, requires_grad=True),
    ]
    method = cls(params, jacobian.shape[0], **kwargs)
    rows = [[row[:10].reshape(5, 2).clone(), row[10:].clone()] for row in jacobian.to(device)]
    coeffs = method.step(rows)
    return torch.cat([p.grad.reshape(-1) for p in params]).cpu(), coeffs.cpu()


def _jacobian(k: int, seed: int, conflicting: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, k, dtype=torch.float64)[:, None]
    jacobian = torch.randn(k, G, generator=gen, dtype=torch.float64) * scales
    if conflicting:  # every later task pulls against the first
        jacobian[1:] -= (
            1.5 * jacobian[:1] * jacobian[1:].norm(dim=1, keepdim=True) / jacobian[0].norm()
        )
    return jacobian


def _assert_agrees(
    name: str, jacobian: torch.Tensor, rtol: float | None = None, device="cpu"
) -> torch.Tensor:
    d, coeffs = _update(name, jacobian, device)
    expected = _torchjd(name)(jacobian)
    torch.testing.assert_close(coeffs.to(torch.float64) @ jacobian, d, rtol=1e-12, atol=1e-12)
    rtol = RTOL[name] if rtol is None else rtol
    # (plus an absolute tolerance: the solvers' answer for a zero update is zero only to 1e-10)
    tolerance = rtol * float(expected.norm()) + 1e-9 * float(jacobian.norm(dim=1).max())
    assert float((d - expected).norm()) <= tolerance, (name, d, expected)
    return d


@pytest.mark.cuda_subset(seed=(0,))
@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("k", [3, 5, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("conflicting", [False, True])
def test_agrees_with_torchjd(device, name, k, seed, conflicting):
    if name == "krum" and k < 4:
        pytest.skip("Krum with n_byzantine=1 needs K >= 4")
    _assert_agrees(name, _jacobian(k, seed, conflicting), device=device)


@pytest.mark.parametrize("name", ["dualproj", "config", "krum"])
def test_agrees_with_torchjd_when_k_exceeds_g(name):
    _assert_agrees(name, _jacobian_wide(12))


def _jacobian_wide(k: int) -> torch.Tensor:
    """K > the rank: K gradients in a 4-dimensional subspace of R^G."""
    gen = torch.Generator().manual_seed(5)
    basis = torch.randn(4, G, generator=gen, dtype=torch.float64)
    return torch.randn(k, 4, generator=gen, dtype=torch.float64) @ basis


# -- degenerate Jacobians, against torchjd and the closed forms --------------------------------


def _identical(k=4):
    return torch.randn(
        1, G, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    ).repeat(k, 1)


def _with_zero(k=4):
    jacobian = _jacobian(k, 4, conflicting=True)
    jacobian[1] = 0
    return jacobian


@pytest.mark.parametrize("name", sorted(METHODS))
def test_identical_gradients(name):
    jacobian = _identical()
    d = _assert_agrees(name, jacobian)
    # Every method but ConFIG (the sum of the projections) returns the gradient itself.
    expected = jacobian[0] * (jacobian.shape[0] if name == "config" else 1)
    if name != "fairgrad":  # (its scale is checked against torchjd above)
        torch.testing.assert_close(d, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_zero_gradient(name):
    d = _assert_agrees(name, _with_zero(), rtol=1e-5)
    assert torch.isfinite(d).all()


@pytest.mark.parametrize("name", ["dualproj", "config"])
def test_opposite_gradients_give_zero(name):
    g = _jacobian(1, 6, False)
    d, _ = _update(name, torch.cat([g, -g]))
    torch.testing.assert_close(d, torch.zeros(G, dtype=torch.float64), rtol=0, atol=1e-12)


def test_all_zero_gradients_give_zero():
    for name in METHODS:
        d, coeffs = _update(name, torch.zeros(4, G, dtype=torch.float64))
        assert torch.isfinite(coeffs).all(), name
        assert bool((d == 0).all()), name


def test_dualproj_update_conflicts_with_no_task_and_is_nearest():
    """The projection's KKT conditions, checked on J: J d >= 0, c >= u, and c_i > u_i only where
    <g_i, d> = 0; for K > G as well."""
    for jacobian in (_jacobian(8, 7, conflicting=True), _jacobian_wide(12)):
        d, coeffs = _update("dualproj", jacobian)
        progress = jacobian @ d
        tol = 1e-9 * float(jacobian.norm(dim=1).max()) ** 2
        u = 1.0 / jacobian.shape[0]
        assert bool((progress >= -tol).all())
        assert bool((coeffs >= u - 1e-12).all())
        assert bool((progress[coeffs > u + 1e-9].abs() <= tol).all())


def test_config_has_equal_cosines_with_every_task():
    jacobian = _jacobian(5, 8, conflicting=True)
    d, _ = _update("config", jacobian)
    cosines = (jacobian @ d) / (jacobian.norm(dim=1) * d.norm())
    torch.testing.assert_close(cosines, cosines[:1].expand(5), rtol=1e-10, atol=1e-12)
    assert float(cosines[0]) > 0


def test_krum_selects_by_the_paper_score():
    """The formula, in float64 on J: score_i = sum of the K - f - 2 smallest ||g_i - g_j||."""
    jacobian = _jacobian(7, 9, conflicting=False)
    jacobian[3] += 50.0  # an outlier is never chosen
    _, coeffs = _update("krum", jacobian)
    distances = torch.cdist(jacobian, jacobian)
    distances.fill_diagonal_(float("inf"))
    scores = distances.sort(dim=1).values[:, : 7 - 1 - 2].sum(1)
    expected = torch.zeros(7, dtype=torch.float64)
    expected[scores.argsort()[:2]] = 0.5
    torch.testing.assert_close(coeffs, expected)
    assert float(coeffs[3]) == 0


def test_krum_rejects_too_few_tasks_and_averages_one_or_two():
    with pytest.raises(ValueError, match="n_byzantine"):
        weighting.Krum([torch.zeros(2, requires_grad=True)], 3, n_byzantine=1)
    for k in (1, 2):
        jacobian = _jacobian(k, 13, conflicting=True)
        d, _ = _update_with("krum", jacobian, {})
        torch.testing.assert_close(d, jacobian.mean(0))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_fairgrad_solves_equation_4(alpha):
    jacobian = _jacobian(6, 10, conflicting=True)
    params = [torch.zeros(G, dtype=torch.float64, requires_grad=True)]
    w = weighting.FairGrad(params, 6, alpha=alpha).coefficients(jacobian @ jacobian.T)
    assert bool((w > 0).all())
    torch.testing.assert_close(jacobian @ (jacobian.T @ w), w.pow(-1 / alpha), rtol=1e-10, atol=0)


def test_fairgrad_alpha_1_is_nash_mtl_and_alpha_0_the_mean():
    jacobian = _jacobian(4, 11, conflicting=True)
    params = [torch.zeros(G, dtype=torch.float64, requires_grad=True)]
    M = jacobian @ jacobian.T
    fair = weighting.FairGrad(params, 4, alpha=1.0).coefficients(M)
    torch.testing.assert_close(M @ fair, 1 / fair, rtol=1e-9, atol=0)
    mean = weighting.FairGrad(params, 4, alpha=0.0).coefficients(M)
    torch.testing.assert_close(mean, torch.full((4,), 0.25, dtype=torch.float64))


def test_fairgrad_opposite_gradients_stay_finite():
    """g and -g: M w = w^(-1/alpha) has no solution (w = (t, t) sends f to -infinity); the
    answer must still be finite (the update is then along g - g = 0 up to the iterate)."""
    g = _jacobian(1, 12, False)
    d, coeffs = _update("fairgrad", torch.cat([g, -g]))
    assert torch.isfinite(coeffs).all() and torch.isfinite(d).all()


# -- end to end ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(METHODS))
def test_backward_on_a_shared_trunk(name):
    """backward(losses) writes sum_i c_i dL_i/dtrunk into the trunk's .grad and each head's own
    gradient into the head, as computed by autograd task by task."""
    torch.manual_seed(0)
    trunk = torch.nn.Linear(6, 8).double()
    heads = [torch.nn.Linear(8, 1).double() for _ in range(4)]
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randn(4, 16, 1, dtype=torch.float64)

    def losses():
        z = torch.tanh(trunk(x))
        return [torch.nn.functional.mse_loss(h(z), y[i]) for i, h in enumerate(heads)]

    cls, kwargs = METHODS[name]
    method = cls(trunk.parameters(), 4, **kwargs)
    coeffs = method.backward(losses())
    shared = list(trunk.parameters())
    per_task = [torch.autograd.grad(loss, shared, retain_graph=True) for loss in losses()]
    jacobian = torch.stack([torch.cat([g.reshape(-1) for g in grads]) for grads in per_task])
    expected_coeffs = method.coefficients(jacobian @ jacobian.T)
    torch.testing.assert_close(coeffs, expected_coeffs, rtol=1e-9, atol=1e-12)
    d = torch.cat([p.grad.reshape(-1) for p in trunk.parameters()])
    torch.testing.assert_close(d, coeffs.to(torch.float64) @ jacobian, rtol=1e-9, atol=1e-12)
    for i, head in enumerate(heads):
        expected = torch.autograd.grad(losses()[i], list(head.parameters()))
        for p, e in zip(head.parameters(), expected):
            torch.testing.assert_close(p.grad, e)
