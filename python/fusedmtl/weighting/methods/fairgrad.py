"""FairGrad: alpha-fair allocation of the first-order progress (docs/METHODS.md, section 4)."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.weighting.gradient_based import GradientWeighting
from fusedmtl.weighting.solvers import as_float64_gramian


def alpha_fair_weights(M: Tensor, alpha: float, max_iter: int = 100, tol: float = 1e-12) -> Tensor:
    """The positive solution w of ``M w = w^(-1 / alpha)`` (FairGrad's equation 4).

    It is the minimiser of the strictly convex f(w) = w^T M w / 2 - sum_i h(w_i) over w > 0, with
    h' (w) = w^(-1 / alpha) (h = log for alpha = 1, w^(1 - 1/alpha) / (1 - 1/alpha) otherwise),
    found by damped Newton steps (Hessian M + diag(w^(-1/alpha - 1)) / alpha, positive definite)
    kept inside w > 0 by halving, from w = 1 / K as in the paper's code. A zero gradient (M_ii = 0)
    would need w_i = infinity; its weight multiplies a zero gradient, so it is set to 0 and the
    problem solved over the others.

    Args:
        M: Gramian ``Tensor[K, K]``, symmetric PSD, any float dtype / device.
        alpha: the fairness parameter, > 0 (1: proportional fairness; -> infinity: max-min).
        max_iter: the most Newton steps.
        tol: stop when the relative residual max_i |(M w)_i w_i^(1/alpha) - 1| is below it.
    Returns:
        ``Tensor[K]`` float64 on the CPU, w_i > 0 where g_i != 0, else 0.
    """
    M = as_float64_gramian(M)[0].cpu()  # (a host algorithm: Newton with a line search)
    k = M.shape[0]
    diag = M.diagonal()
    live = diag > 1e-12 * diag.max().clamp_min(torch.finfo(M.dtype).tiny)
    w = torch.zeros(k, dtype=M.dtype)
    if not bool(live.any()):
        return w
    Q = M[live][:, live]
    x = torch.full((Q.shape[0],), 1.0 / k, dtype=M.dtype)
    power = -1.0 / alpha

    def objective(v: Tensor) -> Tensor:
        h = v.log() if alpha == 1 else v.pow(1 + power) / (1 + power)
        return 0.5 * v @ Q @ v - h.sum()

    for _ in range(max_iter):
        target = x.pow(power)
        residual = Q @ x - target
        if float((residual / target).abs().max()) < tol:
            break
        hessian = Q + torch.diag(-power * x.pow(power - 1))
        # (pinv: the diagonal term underflows when the problem has no solution and x diverges,
        # e.g. for opposite gradients; Newton then stops where f no longer decreases.)
        step = torch.linalg.pinv(hessian, hermitian=True) @ residual
        t, value, improved = 1.0, objective(x), False
        # Backtracking: stay positive, then decrease f (Armijo).
        for _ in range(60):
            candidate = x - t * step
            if bool((candidate > 0).all()) and float(objective(candidate)) <= float(
                value - 1e-4 * t * (residual @ step)
            ):
                improved = True
                break
            t *= 0.5
        if not improved:
            break
        x = candidate
    w[live] = x
    return w


class FairGrad(GradientWeighting):
    """Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024 (arXiv:2402.15638).

    The update d = sum_i w_i g_i maximises the alpha-fair utility sum_i u(<g_i, d>) of the tasks'
    first-order progress over a ball; its stationarity condition is G G^T w = w^(-1 / alpha), that
    is ``M w = w^(-1/alpha)`` on the Gramian (equation 4), solved exactly by
    :func:`alpha_fair_weights` on the K x K problem (torchjd and the paper's code call scipy's
    least_squares). alpha = 0 is linear scalarisation, w = 1 / K (section 3); alpha = 1 is
    Nash-MTL's bargaining condition.

    Host synchronisation: the Newton solve with its line search runs on the host (the Gramian
    is copied to the CPU), so this method is not yet sync-free
    (tests/weighting/test_no_host_sync.py).

    Args:
        shared_params, tasks: see :class:`~fusedmtl.weighting.gradient_based.GradientWeighting`.
        alpha: the fairness parameter, >= 0 (the paper tries 0.5 to 10; its default is 1).
        max_iter: the most Newton steps.
        **kwargs: the options of :class:`~fusedmtl.weighting.gradient_based.GradientWeighting`.
    """

    def __init__(
        self, shared_params=None, tasks=None, *, alpha: float = 1.0, max_iter: int = 100, **kwargs
    ) -> None:
        super().__init__(shared_params, tasks, **kwargs)
        if not alpha >= 0:
            raise ValueError(f"FairGrad: alpha must be non-negative, got {alpha}")
        self.alpha = float(alpha)
        self.max_iter = int(max_iter)

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        k = gramian.shape[0]
        if self.alpha == 0:
            return torch.full((k,), 1.0 / k, dtype=gramian.dtype, device=gramian.device)
        return alpha_fair_weights(gramian, self.alpha, self.max_iter).to(gramian.dtype)
