"""Nash-MTL: multi-task learning as a bargaining game (Navon et al. 2022), on the Gramian."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fusedmtl.weighting.gradient_based import GradientWeighting
from fusedmtl.weighting.solvers import as_float64_gramian, cpu_shortcuts, halving_line_search

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
    every n-th step, reusing the last coefficients in between (the paper's speed option; its step
    count is a Python int in the extra state, so the schedule reads nothing on the device).

    Properties (tests/weighting/test_solver_properties.py), where some d has J d > 0 (else the
    bargaining problem has no solution and the ridge decides): non-conflicting, permutation
    invariant, d(s J) = d(J); not linear under scaling, not strongly stationary.
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
        # the steps taken with update_every > 1, a Python int: the solves are scheduled without a
        # device read
        self.steps_done = 0
        if self.num_tasks is not None:
            self._init_task_state()

    @property
    def _host_state(self) -> bool:  # (the step count decides which steps solve)
        return self.update_every > 1

    def _init_task_state(self) -> None:
        self.register_buffer("solution", torch.ones(self.num_tasks, dtype=torch.float64))

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        m, _ = as_float64_gramian(gramian, validate=False)  # at the accuracy of its dtype
        if self.update_every == 1 or self.steps_done % self.update_every == 0:
            self.solution.copy_(nash_bargaining(m, validate=False))
        if self.update_every > 1:  # (only then is it host state)
            self.steps_done += 1
        coeffs = self.solution.to(m.device, copy=True)  # (not the buffer a later solve writes)
        if self.max_norm is not None:
            norm = (coeffs @ m @ coeffs).clamp_min(0).sqrt()
            clipped = coeffs * (self.max_norm / norm.clamp_min(_TINY)).clamp(max=1.0)
            coeffs = torch.where(norm > 0, clipped, coeffs)
        return coeffs.to(gramian.dtype)

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "steps_done": self.steps_done}

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        self.steps_done = int(state["steps_done"])


def nash_bargaining(
    M: Tensor, ridge: float = 1e-8, max_iter: int = 100, validate: bool = True
) -> Tensor:
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

    No host synchronisation (solvers.py's convention): ``max_iter`` iterations run, an iterate
    that has stopped no longer changing, and each line search tests its 41 halvings at once
    (:func:`~fusedmtl.weighting.solvers.halving_line_search`); on CPU tensors the loop ends
    when it stops. The iterates are those of the sequential algorithm.

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
    ``ridge = 0`` is allowed only for positive definite M (``ValueError`` otherwise, a host read).

    Args:
        M: Gramian ``Tensor[K, K]``, symmetric PSD, any float dtype / device.
        ridge: relative ridge (>= 0).
        max_iter: Newton iteration limit (typically 5 to 10 are used, up to ~30 when M is singular).
        validate: check M's finiteness (a host read; ``ValueError``).
    Returns:
        ``Tensor[K]`` float64 on M's device, positive and finite.
    """
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    M = as_float64_gramian(M, validate)[0]
    K = M.shape[0]
    diagonal = M.diagonal()
    trace = diagonal.sum()
    zero = trace <= 0  # all gradients zero: a = 1
    eye = torch.eye(K, dtype=_F64, device=M.device)
    M = torch.where(zero, eye, M)
    diagonal, trace = M.diagonal(), torch.where(zero, float(K), trace)
    M_ridge = M + ridge * torch.diag(torch.where(diagonal > 0, diagonal, trace / K))
    if ridge == 0 and int(torch.linalg.cholesky_ex(M_ridge).info) != 0:
        raise ValueError("nash_bargaining with ridge=0 needs a positive definite Gramian")
    a = M_ridge.diagonal().rsqrt()
    a = a * (K / (a @ M_ridge @ a)).sqrt()
    stopped = torch.zeros((), dtype=torch.bool, device=M.device)
    previous_decrement_sq = torch.full((), math.inf, dtype=_F64, device=M.device)
    shortcuts = cpu_shortcuts(M)
    for _ in range(max_iter):
        if shortcuts and bool(stopped):
            break
        inverse_a = a.reciprocal()
        M_a = M_ridge @ a
        gradient = M_a - inverse_a
        hessian = M_ridge + torch.diag(inverse_a * inverse_a)
        factor, _ = torch.linalg.cholesky_ex(hessian)  # PD: M_r is PSD plus a positive diagonal
        step = -torch.cholesky_solve(gradient.unsqueeze(-1), factor).squeeze(-1)
        decrement_sq = -(gradient @ step)  # lambda^2 ~ 2 (f(a) - f*)
        # lambda < 1/4: the full step stays in the Dikin ellipsoid (a > 0) and the next lambda is
        # ~lambda^2; stop once that is at rounding (or lambda stagnates there)
        full = decrement_sq < 0.0625
        if shortcuts and bool(full):
            fraction = decrement_sq.new_ones(())  # (unused: the full step is taken)
        else:
            fraction = _armijo_fraction(step, inverse_a, M_a, M_ridge, decrement_sq)
        a = torch.where(stopped, a, a + torch.where(full, 1.0, fraction) * step)
        stop = full & ((decrement_sq < 1e-14) | (decrement_sq >= previous_decrement_sq))
        previous_decrement_sq = torch.where(full, decrement_sq, previous_decrement_sq)
        stopped = stopped | stop
    return torch.where(zero, 1.0, a)


def _armijo_fraction(
    step: Tensor, inverse_a: Tensor, M_a: Tensor, M_ridge: Tensor, decrement_sq: Tensor
) -> Tensor:
    """nash_bargaining's damped step: Armijo backtracking from the largest step that keeps
    a > 0, with f(a + t s) - f(a) = t <s, M a> + t^2 / 2 <s, M s> - sum log(1 + t s / a), down to
    a fraction of 1e-12 (at most 40 halvings from 1)."""
    relative_step = step * inverse_a
    slope, curvature = step @ M_a, step @ M_ridge @ step

    def armijo(t: Tensor) -> Tensor:
        change = (
            t * slope + 0.5 * t * t * curvature - torch.log1p(t[:, None] * relative_step).sum(-1)
        )
        return (t <= 1e-12) | (change <= -0.25 * t * decrement_sq)

    largest = (0.99 / (-relative_step.min()).clamp_min(_TINY)).clamp(max=1.0)
    return halving_line_search(largest, 41, armijo)[0]
