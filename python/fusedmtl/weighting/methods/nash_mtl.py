"""Nash-MTL: multi-task learning as a bargaining game (Navon et al. 2022), on the Gramian."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fusedmtl.weighting.gradient_based import GradientWeighting
from fusedmtl.weighting.solvers import as_float64_gramian

_F64 = torch.float64
_TINY = torch.finfo(_F64).tiny


class NashMTL(GradientWeighting):
    """Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya, "Multi-Task Learning as a
    Bargaining Game", ICML 2022.

    The Nash bargaining solution: a > 0 with M a = 1 / a element-wise, found by our own small
    solver (:func:`nash_bargaining`, damped Newton on the strictly
    convex 0.5 a^T M a - sum log a_i; no cvxpy). Then norm(d)^2 = a^T M a = K. As in the paper,
    the update is clipped to norm ``max_norm`` (on the Gramian: c scaled by
    min(1, max_norm / sqrt(c^T M c)); None disables it), and ``update_every`` n > 1 re-solves only
    every n-th step, reusing the last coefficients in between (the paper's speed option).

    Properties (tests/weighting/test_solver_properties.py), where some d has J d > 0 (else the
    bargaining problem has no solution and the ridge decides): non-conflicting, permutation
    invariant, d(s J) = d(J); not linear under scaling, not strongly stationary.

    Host synchronisation: the damped Newton solve runs on the host (Python floats, a line
    search; the Gramian is copied to the CPU), so this method is not yet sync-free
    (tests/weighting/test_no_host_sync.py).
    """

    def __init__(
        self,
        shared_params=None,
        tasks=None,
        *,
        max_norm: float | None = 1.0,
        update_every: int = 1,
        **kwargs,
    ) -> None:
        super().__init__(shared_params, tasks, **kwargs)
        if update_every < 1:
            raise ValueError(f"NashMTL: update_every must be at least 1, got {update_every}")
        self.max_norm, self.update_every = max_norm, int(update_every)
        self.register_buffer("steps_done", torch.tensor(0))
        if self.num_tasks is not None:
            self._init_task_state()

    def _init_task_state(self) -> None:
        self.register_buffer("solution", torch.ones(self.num_tasks, dtype=torch.float64))

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        m, _ = as_float64_gramian(gramian)  # at the accuracy of the Gramian's dtype
        m = m.cpu()  # (a host algorithm: see the class docstring)
        if int(self.steps_done) % self.update_every == 0:
            self.solution.copy_(nash_bargaining(m))
        self.steps_done += 1
        coeffs = self.solution.clone().cpu()
        if self.max_norm is not None:
            norm = (coeffs @ m @ coeffs).clamp_min(0).sqrt()
            coeffs = coeffs * (self.max_norm / norm).clamp(max=1.0) if norm > 0 else coeffs
        return coeffs.to(gramian.dtype)


def nash_bargaining(M: Tensor, ridge: float = 1e-8, max_iter: int = 100) -> Tensor:
    """Nash-MTL weights: ``a > 0`` with ``(M_r a)_i = 1 / a_i`` for every i.

    The Nash bargaining solution of Navon et al., "Multi-Task Learning as a Bargaining Game",
    ICML 2022; the update is ``d = sum_i a_i g_i``. ``M a = 1 / a`` is the stationarity
    condition of the strictly convex, self-concordant ``f(a) = 0.5 a^T M a - sum_i log a_i``
    on ``a > 0``, minimised by damped Newton: a backtracking (Armijo) line search from the
    largest step that keeps ``a > 0`` while the Newton decrement ``lambda >= 1/4``, full steps
    after (f is self-concordant, so they stay in the Dikin ellipsoid, ``a > 0``, and converge
    quadratically). Full Newton steps can double a coordinate that has to grow, so even the
    ridge-dominated solutions (~1e4 times the start) take 20 to 30 iterations.
    Start: ``a_i = 1 / sqrt(M_ii)`` scaled so that ``a^T M a = K`` (which holds at the solution).
    Stops when the squared Newton decrement ``lambda^2`` (~ twice the distance to the optimum
    in f) is below 1e-14 after a full step, so at rounding level: the residual
    ``|M_r a - 1 / a|`` is then about eps times ``|M_r| a + 1 / a`` (its rounding floor; at the
    huge ``a`` of a ridge-dominated direction ``M_r a`` cancels down to ``1 / a``).

    f is unbounded below, and no solution exists, when some ``a > 0`` has ``a^T M a = 0`` (a zero
    gradient; ``g`` and ``-g``). Hence ``M_r = M + ridge * D`` is solved, D the diagonal of M
    (trace(M) / K where that is zero): scaling a task's gradient by s > 0 scales its a_i by 1 / s
    and leaves d unchanged, ridge included (the bargaining solution's invariance); with the
    default ``ridge = 1e-8`` the result moves by about 1e-8 relative when M is well conditioned.
    Effects: a zero gradient ``g_i = 0`` decouples and gets
    ``a_i = 1 / sqrt(ridge * trace(M) / K)`` (large, ~1e4 / rms gradient norm, but it multiplies a
    zero gradient); K identical gradients ``g`` give ``a_i = 1 / sqrt(K ||g||^2 + ridge ||g||^2)``
    (~ ``1 / (sqrt(K) ||g||)``, no blow-up: M is singular but f is bounded); ``g`` and ``-g`` give
    ``a = (1, 1) / sqrt(ridge ||g||^2)`` and ``d = 0``. All gradients zero: ``a = 1`` (d = 0).
    ``ridge = 0`` is allowed only for positive definite M (``ValueError`` otherwise).

    Args:
        M: Gramian ``Tensor[K, K]``, symmetric PSD, any float dtype / device.
        ridge: relative ridge (>= 0).
        max_iter: Newton iteration limit (typically 5 to 10 are used, up to ~30 when M is singular).
    Returns:
        ``Tensor[K]`` float64 on the CPU, positive and finite.
    """
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    M = as_float64_gramian(M)[0].cpu()
    K = M.shape[0]
    trace = float(M.diagonal().sum())
    if trace <= 0:
        return torch.ones(K, dtype=_F64)
    diagonal = M.diagonal()
    M_ridge = M + ridge * torch.diag(torch.where(diagonal > 0, diagonal, trace / K))
    if ridge == 0 and int(torch.linalg.cholesky_ex(M_ridge).info) != 0:
        raise ValueError("nash_bargaining with ridge=0 needs a positive definite Gramian")
    a = M_ridge.diagonal().rsqrt()
    a = a * math.sqrt(K / float(a @ M_ridge @ a))
    previous_decrement_sq = math.inf
    for _ in range(max_iter):
        inverse_a = a.reciprocal()
        M_a = M_ridge @ a
        gradient = M_a - inverse_a
        hessian = M_ridge + torch.diag(inverse_a * inverse_a)
        factor, _ = torch.linalg.cholesky_ex(hessian)  # PD: M_r is PSD plus a positive diagonal
        step = -torch.cholesky_solve(gradient.unsqueeze(-1), factor).squeeze(-1)
        decrement_sq = -float(gradient @ step)  # lambda^2 ~ 2 (f(a) - f*)
        if decrement_sq < 0.0625:
            # lambda < 1/4: the full step stays in the Dikin ellipsoid (a > 0) and the next
            # lambda is ~lambda^2; stop once that is at rounding (or lambda stagnates there)
            a = a + step
            if decrement_sq < 1e-14 or decrement_sq >= previous_decrement_sq:
                break
            previous_decrement_sq = decrement_sq
            continue
        # damped phase: Armijo backtracking from the largest step that keeps a > 0, with
        # f(a + t s) - f(a) = t <s, M a> + t^2 / 2 <s, M s> - sum log(1 + t s / a)
        relative_step = step * inverse_a
        slope_quadratic = float(step @ M_a)
        curvature = float(step @ M_ridge @ step)
        fraction = min(1.0, 0.99 / max(float(-relative_step.min()), _TINY))
        while fraction > 1e-12:
            change = (
                fraction * slope_quadratic
                + 0.5 * fraction * fraction * curvature
                - float(torch.log1p(fraction * relative_step).sum())
            )
            if change <= -0.25 * fraction * decrement_sq:
                break
            fraction *= 0.5
        a = a + fraction * step
    return a
