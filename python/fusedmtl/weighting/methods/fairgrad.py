"""FairGrad: alpha-fair allocation of the first-order progress (docs/METHODS.md, section 4)."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl import linalg
from fusedmtl.weighting.gradient_based import GradientWeighting
from fusedmtl.weighting.solvers import as_float64_gramian, cpu_shortcuts, halving_line_search


def alpha_fair_weights(
    M: Tensor, alpha: float, max_iter: int = 100, tol: float = 1e-12, validate: bool = True
) -> Tensor:
    """The positive solution w of ``M w = w^(-1 / alpha)`` (FairGrad's equation 4).

    It is the minimiser of the strictly convex f(w) = w^T M w / 2 - sum_i h(w_i) over w > 0, with
    h' (w) = w^(-1 / alpha) (h = log for alpha = 1, w^(1 - 1/alpha) / (1 - 1/alpha) otherwise),
    found by damped Newton steps (Hessian M + diag(w^(-1/alpha - 1)) / alpha, positive definite)
    kept inside w > 0 by halving (Armijo's test up to f's rounding), from the solution for M's
    diagonal (the paper's code starts at 1 / K). A zero gradient (M_ii = 0) would need
    w_i = infinity; its weight multiplies a zero gradient, so it is set to 0 and the problem
    solved over the others (masked: their rows and columns of M are zero, their steps 0).

    No host synchronisation (solvers.py's convention): ``max_iter`` iterations run, an iterate
    that has stopped no longer changing, and each line search tests its 60 halvings at once; on
    CPU tensors the loop ends when it stops.

    Args:
        M: Gramian ``Tensor[K, K]``, symmetric PSD, any float dtype / device.
        alpha: the fairness parameter, > 0 (1: proportional fairness; -> infinity: max-min).
        max_iter: the most Newton steps.
        tol: stop when the relative residual max_i |(M w)_i w_i^(1/alpha) - 1| is below it.
        validate: check M's finiteness (a host read; ``ValueError``).
    Returns:
        ``Tensor[K]`` float64 on M's device, w_i > 0 where g_i != 0, else 0.
    """
    M = as_float64_gramian(M, validate)[0]
    diag = M.diagonal()
    live = diag > 1e-12 * diag.max().clamp_min(torch.finfo(M.dtype).tiny)
    Q = M * (live[:, None] & live[None, :])
    power = -1.0 / alpha
    # From the solution for M's diagonal alone, M_ii w_i = w_i^(-1/alpha): it has the answer's
    # scale, which damped steps from 1/K (the paper's start) spend iterations finding.
    x = torch.where(live, diag.clamp_min(torch.finfo(M.dtype).tiny).pow(1 / (power - 1)), 1.0)

    def objective(v: Tensor) -> Tensor:  # v: [..., k]
        h = v.log() if alpha == 1 else v.pow(1 + power) / (1 + power)
        return 0.5 * ((v @ Q) * v).sum(-1) - torch.where(live, h, 0.0).sum(-1)

    stopped = ~live.any()
    shortcuts = cpu_shortcuts(M)
    for _ in range(max_iter):
        if shortcuts and bool(stopped):
            break
        target = x.pow(power)
        residual = torch.where(live, Q @ x - target, 0.0)
        stopped = stopped | ((residual / target).abs().max() < tol)
        hessian = Q + torch.diag(torch.where(live, -power * x.pow(power - 1), 0.0))
        # (pinv: the diagonal term underflows when the problem has no solution and x diverges,
        # e.g. for opposite gradients; Newton then stops where f no longer decreases.)
        step = linalg.pinv(hessian) @ residual
        value, slope = objective(x), residual @ step
        # Near the solution f's decrease falls below its rounding: Armijo's test would then only
        # pass a vanishing step, and the iterate stall short of tol; the full step passes.
        rounding = 1e-13 * (1 + value.abs())

        def decreases(t: Tensor) -> Tensor:  # stay positive, then decrease f (Armijo)
            candidates = x - t[:, None] * step
            positive = (candidates > 0).all(-1)
            safe = torch.where(positive[:, None], candidates, 1.0)
            return positive & (objective(safe) <= value - 1e-4 * t * slope + rounding)

        t, improved = halving_line_search(x.new_ones(()), 60, decreases)
        stopped = stopped | ~improved
        x = torch.where(stopped, x, x - t * step)
    return torch.where(live, x, 0.0)


class FairGrad(GradientWeighting):
    """Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024 (arXiv:2402.15638).

    The update d = sum_i w_i g_i maximises the alpha-fair utility sum_i u(<g_i, d>) of the tasks'
    first-order progress over a ball; its stationarity condition is G G^T w = w^(-1 / alpha), that
    is ``M w = w^(-1/alpha)`` on the Gramian (equation 4), solved exactly by
    :func:`alpha_fair_weights` on the K x K problem (torchjd and the paper's code call scipy's
    least_squares). alpha = 0 is linear scalarisation, w = 1 / K (section 3); alpha = 1 is
    Nash-MTL's bargaining condition.

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
        return alpha_fair_weights(gramian, self.alpha, self.max_iter, validate=False).to(
            gramian.dtype
        )
