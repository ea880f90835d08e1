"""Small K x K solvers of the gradient-based aggregations (../shared/METHODS.md, section 4).

Every method turns the Gramian ``M[i, j] = <g_i, g_j>`` of the K task gradients into
coefficients ``c`` and the shared update ``d = sum_i c_i g_i``. The problems solved here are
tiny (K from 1 to ~64) and run on the host at each training step, so they are written with a
few tensor ops per iteration and exact (active-set / Newton) algorithms rather than generic
solvers with loose tolerances.

Conventions shared by every public function:

* ``M`` is a symmetric positive semi-definite ``Tensor[K, K]`` of any floating dtype and device.
  It is copied to float64 on the CPU and symmetrised; results are float64 CPU tensors. A Gramian
  computed in low precision can have slightly negative eigenvalues (float32 rounding of a
  singular ``J J^T``); those are clamped to zero when they exceed float64 rounding, which
  changes ``M`` by no more than that rounding. Non-finite entries raise ``ValueError``.
* Singular ``M`` (identical, opposite, zero or linearly dependent gradients) is supported and
  never produces NaN or inf; each function documents what it returns in those cases.
* Accuracy: the KKT conditions of each problem hold to about 1e-12 relative to the scale of
  ``M`` (decisions such as "is this multiplier positive" use a relative threshold of 1e-12),
  except where M's own conditioning limits them (documented per function).
* Speed: a few tensor ops per active-set / Newton iteration, ~2 us each. Prefer one intra-op
  thread (``torch.set_num_threads(1)``): on a loaded machine the OpenMP spin-waits of these
  tiny ops can cost tens of ms.
* Deterministic: same input, same output (ties are broken by index, then resolved as
  documented).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "min_norm_simplex",
    "dual_cone_weights",
    "upgrad_coefficients",
    "nash_bargaining",
    "cagrad_weights",
    "cagrad_coefficients",
]

_F64 = torch.float64
# Relative threshold of every discrete decision (a multiplier's sign, a tie, a rank): well
# above float64 rounding of the K x K arithmetic, well below the accuracy the callers need.
_RTOL = 1e-12
_TINY = torch.finfo(_F64).tiny
# ||g_w||^2 = w^T M w has an absolute rounding error ~eps (sum_i w_i ||g_i||)^2, so a Gramian
# resolves ||g_w|| only down to ~sqrt(eps) sum_i w_i ||g_i||; below this (with a margin) it is 0.
_NORM_RESOLUTION = 1e-6
# plus this fraction of max_i ||g_i||, for w concentrated on (nearly) zero gradients
_NORM_FLOOR = 1e-10


def _as_gramian(M: Tensor) -> Tensor:
    """M as a symmetric PSD float64 CPU tensor (see the module docstring)."""
    if not isinstance(M, Tensor) or M.dim() != 2 or M.shape[0] != M.shape[1] or M.shape[0] == 0:
        shape = getattr(M, "shape", M)
        raise ValueError(f"expected a square Gramian Tensor[K, K] with K >= 1, got {shape!r}")
    M = M.detach().to(device="cpu", dtype=_F64)
    if not bool(torch.isfinite(M).all()):
        raise ValueError("the Gramian has non-finite entries")
    M = 0.5 * (M + M.T)
    if M.shape[0] > 1:
        eigenvalues, eigenvectors = torch.linalg.eigh(M)
        # float64 rounding of an exactly singular PSD matrix gives eigenvalues of about
        # -K * eps * max|lambda|; only genuinely negative ones (low-precision input) are clamped,
        # so that float64 inputs, and their exact ties and zero rows, are left untouched.
        if float(eigenvalues[0]) < -_RTOL * max(float(eigenvalues[-1]), 0.0):
            M = (eigenvectors * eigenvalues.clamp_min(0)) @ eigenvectors.T
            M = 0.5 * (M + M.T)
    return M


def _solve_on_support(Q: Tensor, rhs: Tensor, support: Tensor) -> Tensor:
    """For each row b: the solution s of Q[S, S] s_S = rhs[b, S], s = 0 off S = support[b].

    Batched by embedding Q[S, S] in the identity: (Q masked to S x S) + I on the complement.
    Q: [K, K], rhs and support: [B, K]."""
    K = Q.shape[0]
    pair_mask = support[:, :, None] & support[:, None, :]
    system = torch.where(pair_mask, Q, torch.zeros((), dtype=_F64))
    system = system + torch.diag_embed((~support).to(_F64))
    rhs = torch.where(support, rhs, torch.zeros((), dtype=_F64)).unsqueeze(-1)
    factor, info = torch.linalg.cholesky_ex(system)
    if bool((info == 0).all()):
        solution = torch.cholesky_solve(rhs, factor)
    else:  # numerically semi-definite block (nearly dependent columns): LU still gives a small residual
        solution = torch.linalg.solve(system, rhs)
    return solution.squeeze(-1).reshape(-1, K) * support


def _nnls_gram(Q: Tensor, P: Tensor, b_sq: Tensor, least_norm: bool) -> tuple[Tensor, Tensor]:
    """Nonnegative least squares in Gramian form, batched over the rows of P.

    For each row p of P [B, K] solves min_{x >= 0} 0.5 x^T Q x - p^T x, which is
    min_{x >= 0} 0.5 ||A x - b||^2 for some A, b with Q = A^T A, p = A^T b, b_sq = ||b||^2 [B]
    (A and b are never formed; b_sq only sets the scale of the thresholds).

    Lawson & Hanson's active-set algorithm (1974, ch. 23): the support only ever holds columns
    that are linearly independent (a column in the span of the support has zero gradient at
    the support's least-squares solution, so it is never added), hence the systems solved are
    non-singular even when Q is singular. It terminates after finitely many steps with the KKT
    conditions exact up to the thresholds: x >= 0, w = p - Q x <= 0 off the support, w = 0 on it.

    With least_norm, when the minimiser is not unique (Q singular and some column off the
    support with w = 0), returns the minimiser of least Euclidean norm if that has no negative
    entry (always the case for exact ties such as duplicated columns); otherwise the
    active set's. Returns (x [B, K], support [B, K] bool)."""
    B, K = P.shape
    x = torch.zeros(B, K, dtype=_F64)
    support = torch.zeros(B, K, dtype=torch.bool)
    excluded = torch.zeros(B, K, dtype=torch.bool)
    running = torch.ones(B, dtype=torch.bool)
    column_norm = Q.diagonal().clamp_min(0).sqrt()
    b_norm = b_sq.clamp_min(0).sqrt().unsqueeze(-1)
    unit = torch.eye(K, dtype=torch.bool)

    def gradient_and_threshold(x):
        # w_j = a_j^T (b - A x): rounding is ~eps * ||a_j|| (||b|| + sum_k ||a_k|| x_k)
        w = P - x @ Q
        threshold = _RTOL * column_norm * (b_norm + (x * column_norm).sum(-1, keepdim=True))
        return w, threshold

    # Shortcut, one solve instead of K iterations: when Q is positive definite (pivots well away
    # from zero, so the minimiser is unique) and its unconstrained minimiser is positive, that
    # is the answer (x > 0, zero gradient: the KKT conditions hold).
    factor, info = torch.linalg.cholesky_ex(Q)
    pivots_sq = factor.diagonal().square()
    if int(info) == 0 and float(pivots_sq.min()) > 1e-8 * float(Q.diagonal().max()):
        unconstrained = torch.cholesky_solve(P.T, factor).T
        interior = (unconstrained > 0).all(-1, keepdim=True)
        x = torch.where(interior, unconstrained, x)
        support = support | interior
        running = running & ~interior.squeeze(-1)

    for _ in range(3 * K + 10):
        if not bool(running.any()):
            break
        s = _solve_on_support(Q, P, support)
        feasible = ((s > 0) | ~support).all(-1)
        accept = running & feasible
        x = torch.where(accept.unsqueeze(-1), s, x)
        w, threshold = gradient_and_threshold(x)
        candidate = ~support & ~excluded & (w > threshold)
        has_candidate = candidate.any(-1)
        entering = torch.where(candidate, w / column_norm.clamp_min(_TINY), -math.inf).argmax(-1)
        support = support | (unit[entering] & (accept & has_candidate).unsqueeze(-1))
        running = running & ~(accept & ~has_candidate)
        blocked = running & ~feasible
        if bool(blocked.any()):
            # move from x towards s until the first support coordinate reaches zero, drop it
            shrinking = support & (s <= 0)
            ratio = torch.where(shrinking, x / (x - s).clamp_min(_TINY), math.inf)
            alpha, leaving_index = ratio.min(-1)
            moved = x + alpha.unsqueeze(-1) * (s - x)
            leaving = support & (unit[leaving_index] | (moved <= 0))
            moved = torch.where(leaving, torch.zeros((), dtype=_F64), moved)
            x = torch.where(blocked.unsqueeze(-1), moved, x)
            support = torch.where(blocked.unsqueeze(-1), support & ~leaving, support)
            # A column that entered with a positive gradient but cannot grow is a rounding
            # artefact of a (nearly) dependent column; never re-entering it prevents cycling.
            excluded |= blocked.unsqueeze(-1) & (alpha == 0).unsqueeze(-1) & unit[leaving_index]

    if least_norm:
        w, threshold = gradient_and_threshold(x)
        x = _least_norm_minimiser(Q, x, support | (w.abs() <= threshold), support)
    return x, support


def _least_norm_minimiser(Q: Tensor, x: Tensor, tight: Tensor, support: Tensor) -> Tensor:
    """Among the minimisers of _nnls_gram, the one of least norm when it is nonnegative.

    Every minimiser y has the same residual A y = A x and is supported on the tight set T
    (zero gradient), so they are the nonnegative solutions of Q[T, T] y_T = (Q x)_T; the
    least-norm solution is pinv(Q[T, T]) (Q x)_T. Only rows with a tight column off the
    support can have several minimisers."""
    redo = (tight & ~support).any(-1)
    if not bool(redo.any()):
        return x
    mask = tight[redo]
    block = torch.where(mask[:, :, None] & mask[:, None, :], Q, torch.zeros((), dtype=_F64))
    eigenvalues, eigenvectors = torch.linalg.eigh(block)
    kept = eigenvalues > _RTOL * eigenvalues[:, -1:].clamp_min(_TINY)
    rhs = torch.where(mask, x[redo] @ Q, torch.zeros((), dtype=_F64))
    spectral = (eigenvectors.transpose(-1, -2) @ rhs.unsqueeze(-1)).squeeze(-1)
    spectral = torch.where(kept, spectral / torch.where(kept, eigenvalues, 1.0), torch.zeros((), dtype=_F64))
    y = (eigenvectors @ spectral.unsqueeze(-1)).squeeze(-1) * mask
    nonnegative = (y >= -_RTOL * x[redo].abs().amax(-1, keepdim=True)).all(-1)
    out = x.clone()
    out[redo] = torch.where(nonnegative.unsqueeze(-1), y.clamp_min(0), x[redo])
    return out


# ----------------------------------------------------------------------------------------------
# MGDA: minimum-norm point of the convex hull


def _min_norm_simplex_active_set(M: Tensor, least_norm: bool) -> tuple[Tensor, Tensor]:
    """argmin_{c in simplex} c^T M c by NNLS, and its support (affinely independent g_i).

    For s > 0, min_{x >= 0} ||G^T x||^2 + s (1^T x - 1)^2 (an NNLS with Q = M + s 1 1^T,
    p = s 1, ||b||^2 = s) is solved by x = c* s / (s + v*), c* the simplex minimiser and v* its
    value: writing x = t c with c in the simplex gives t^2 c^T M c + s (t - 1)^2, minimal at
    t = s / (s + c^T M c) with value s v / (s + v), increasing in v = c^T M c. s = trace(M) / K
    keeps Q as well conditioned as M and makes the result invariant to scaling M.
    The support's columns (g_i, sqrt(s)) are linearly independent, i.e. the g_i are affinely
    independent. M must not be zero."""
    K = M.shape[0]
    s = M.diagonal().sum() / K
    x, support = _nnls_gram(M + s, s.expand(1, K), s.reshape(1), least_norm)
    x = x[0]
    return x / x.sum(), support[0]


def min_norm_simplex(M: Tensor) -> Tensor:
    """MGDA weights: ``c = argmin_{c >= 0, sum(c) = 1} c^T M c``.

    The minimum-norm point ``sum_i c_i g_i`` of the convex hull of the task gradients, a
    Pareto-stationary common descent direction (Sener & Koltun, "Multi-Task Learning as
    Multi-Objective Optimization", NeurIPS 2018).

    Args:
        M: Gramian ``Tensor[K, K]``, symmetric PSD, any float dtype / device.
    Returns:
        ``Tensor[K]`` float64 on the CPU, nonnegative, summing to 1.

    Algorithm: K = 2 in closed form; otherwise an exact active-set solve (Lawson-Hanson NNLS on
    an equivalent problem, see ``_min_norm_simplex_active_set``), not Frank-Wolfe.

    The minimum-norm point ``sum_i c_i g_i`` is always unique, ``c`` is not when the gradients are
    affinely dependent. Then the ``c`` of least Euclidean norm is returned (identical gradients:
    uniform weights among them; ``g`` and ``-g``: ``(1/2, 1/2)``) whenever the active set can
    certify it (a nonnegative least-norm solution on the tight set; otherwise the active set's
    minimiser). Degenerate cases: K = 1 gives ``[1]``; all gradients zero gives uniform weights;
    a zero gradient ``g_i = 0`` gives ``c = e_i`` (``d = 0``, everything is Pareto-stationary),
    uniform among several zero gradients.
    """
    M = _as_gramian(M)
    K = M.shape[0]
    if K == 1:
        return torch.ones(1, dtype=_F64)
    if float(M.diagonal().sum()) <= 0:  # all gradients zero: every c is a minimiser
        return torch.full((K,), 1.0 / K, dtype=_F64)
    if K == 2:
        (m11, m12), (_, m22) = M.tolist()
        # f(y) = y^2 m11 + 2 y (1 - y) m12 + (1 - y)^2 m22 for c = (y, 1 - y);
        # f'(y) = 0 at y = (m22 - m12) / (m11 - 2 m12 + m22), ||g1 - g2||^2 the denominator.
        distance_sq = m11 - 2.0 * m12 + m22
        if distance_sq <= 4.0 * torch.finfo(_F64).eps * (m11 + m22):  # g1 == g2: f is constant
            y = 0.5
        else:
            y = min(max((m22 - m12) / distance_sq, 0.0), 1.0)
        return torch.tensor([y, 1.0 - y], dtype=_F64)
    return _min_norm_simplex_active_set(M, least_norm=True)[0]


# ----------------------------------------------------------------------------------------------
# UPGrad: projections onto the dual cone


def _lower_bounded_min_norm(M: Tensor, lower: Tensor) -> Tensor:
    """For each row l of lower [B, K]: argmin_{v >= l} v^T M v (componentwise), batched.

    With v = l + u, u >= 0: u^T M u + 2 u^T M l + l^T M l, an NNLS with Q = M, p = -M l and
    ||b||^2 = l^T M l (A = G^T, b = -G^T l). sum_j v_j g_j is the projection of sum_j l_j g_j
    onto the dual cone {x : <x, g_j> >= 0 for all j}: its KKT conditions are those of the
    projection with multipliers u. Least-norm u among several minimisers."""
    Ml = lower @ M
    u, _ = _nnls_gram(M, -Ml, (Ml * lower).sum(-1), least_norm=True)
    return lower + u


def dual_cone_weights(M: Tensor) -> Tensor:
    """Weights of the projections of each gradient onto the dual cone of all of them.

    Row i is ``w_i = argmin_{v >= e_i} v^T M v`` (componentwise, ``e_i`` the i-th unit vector),
    so that ``p_i = sum_j w_ij g_j`` is the projection of ``g_i`` onto the dual cone
    ``{x : <x, g_j> >= 0 for all j}``, the step of UPGrad (Quinton & Rey, "Jacobian Descent for
    Multi-Objective Optimization", 2024). Exact small nonnegative QP (v = e_i + u, u >= 0, all K
    rows solved together by a batched Lawson-Hanson NNLS).

    Args:
        M: Gramian ``Tensor[K, K]``, symmetric PSD, any float dtype / device.
    Returns:
        ``Tensor[K, K]`` float64 on the CPU with ``w_ii >= 1`` and ``w_ij >= 0``.

    ``p_i`` is unique, ``w_i`` is not when the gradients are linearly dependent; then the one with
    the least-norm ``u = w_i - e_i`` is returned (if nonnegative; otherwise the active set's).
    Degenerate cases: a gradient already in the dual cone (no conflict; K = 1; all gradients
    zero; identical gradients) gives ``w_i = e_i``; a zero gradient gives ``w_i = e_i`` and
    ``p_i = 0``; ``g`` and ``-g`` give ``w = [[1, 1], [1, 1]]`` (``p = 0``, the dual cone is the
    hyperplane orthogonal to ``g``).
    """
    M = _as_gramian(M)
    return _lower_bounded_min_norm(M, torch.eye(M.shape[0], dtype=_F64))


def upgrad_coefficients(M: Tensor) -> Tensor:
    """UPGrad coefficients ``c = mean_i w_i`` (rows of :func:`dual_cone_weights`), so that
    ``d = sum_j c_j g_j`` is the mean of the projections of the gradients onto their dual cone
    (Quinton & Rey 2024). ``Tensor[K]`` float64 CPU, ``c_j >= 1/K``."""
    return dual_cone_weights(M).mean(0)


# ----------------------------------------------------------------------------------------------
# Nash-MTL: the bargaining solution


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
    M = _as_gramian(M)
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


# ----------------------------------------------------------------------------------------------
# CAGrad


def _cagrad_problem(M: Tensor, c: float) -> tuple[Tensor, Tensor, float]:
    """a = M b (a_i = <g_i, g0>), b = 1 / K, and r = c ||g0|| = sqrt(phi)."""
    if c < 0:
        raise ValueError(f"c must be >= 0, got {c}")
    a = M.mean(1)
    return a, a.mean().clamp_min(0), c * math.sqrt(float(a.mean().clamp_min(0)))


def cagrad_weights(M: Tensor, c: float = 0.5) -> Tensor:
    """CAGrad dual weights: ``w = argmin_{w in simplex} w^T M b + sqrt(phi) sqrt(w^T M w)``.

    Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021, with
    ``b = 1 / K``, ``g0 = mean_i g_i``, ``phi = c^2 ||g0||^2``, ``g_w = sum_i w_i g_i``; the
    objective is ``F(w) = <g_w, g0> + r ||g_w||``, ``r = sqrt(phi)``. The reference implementation
    uses scipy's SLSQP; this one is exact.

    Algorithm: F's KKT conditions at w are those of the projection of ``-t g0`` onto the convex
    hull of the gradients, ``min_{w in simplex} ||g_w + t g0||^2``, at ``t = ||g_w|| / r``; and
    ``||g_w(t)|| / (r t)`` decreases in t. So a bracketed search over t: at each t the projection
    is solved exactly (active set, as MGDA, on the Gramian of ``g_i + t g0``); on its face S the
    projection is affine in t (``w0 + t w1``), valid on an interval of t computed exactly, and
    ``||g_w|| = r t`` has the closed-form root ``t* = sqrt(A0 / (r^2 - A2))`` with
    ``A0 = ||g_w0||^2``, ``A2 = ||g_w1||^2``. If t* lies in the face's interval, ``w0 + t* w1`` is
    the exact minimiser; otherwise the interval tells on which side the root is. Each t visits a
    new face, and t* is used as the next guess (else bisection): typically 1 to 3 projections.

    Args:
        M: Gramian ``Tensor[K, K]``, symmetric PSD, any float dtype / device.
        c: the radius ratio (>= 0; CAGrad uses 0.5).
    Returns:
        ``Tensor[K]`` float64 on the CPU, nonnegative, summing to 1.

    Degenerate cases: K = 1 gives ``[1]``. ``r = 0`` (c = 0, or ``g0 = 0``: all gradients zero,
    ``g`` and ``-g``) leaves the linear ``<g_w, g0>``, minimised by uniform weights over the
    gradients of least ``<g_i, g0>`` (all of them when ``g0 = 0``). When 0 is in the hull and
    optimal (``g_w = 0``: e.g. ``g1 = -g2`` and a third gradient orthogonal to them), the weights
    of 0 on the face the search ends on are returned. When w is not unique (affinely dependent
    gradients) the minimiser on an affinely independent face is returned.
    """
    M = _as_gramian(M)
    K = M.shape[0]
    a, g0_sq, r = _cagrad_problem(M, c)
    if K == 1:
        return torch.ones(1, dtype=_F64)
    scale = float(M.diagonal().max())
    if r <= _RTOL * math.sqrt(max(scale, 0.0)):
        # F = <g_w, g0>: linear, minimised by the cheapest vertices (uniform for determinism)
        cheapest = a <= a.min() + _RTOL * max(scale, _TINY)
        return cheapest.to(_F64) / cheapest.sum()

    # ||g_w|| <= max_i ||g_i|| < r t_high, so the root is below t_high.
    t_low, t_high = 0.0, 2.0 * math.sqrt(scale) / r
    t = min(1.0 / c, 0.5 * t_high)  # the root if g_w were g0
    ones = torch.ones(K, dtype=_F64)
    w_t = torch.full((K,), 1.0 / K, dtype=_F64)
    for iteration in range(200):
        shifted = M + t * (a[:, None] + a[None, :]) + (t * t) * g0_sq
        w_t, face = _min_norm_simplex_active_set(shifted, least_norm=False)
        # On the face: M_SS w + t a_S = mu 1, 1^T w_S = 1; affine in t:
        # [M_SS 1; 1^T 0] [w0 w1; -mu0 -mu1] = [0 -a_S; 1 0] (non-singular: S affinely independent).
        n = int(face.sum())
        bordered = torch.zeros(n + 1, n + 1, dtype=_F64)
        bordered[:n, :n] = M[face][:, face]
        bordered[:n, n] = 1.0
        bordered[n, :n] = 1.0
        rhs = torch.zeros(n + 1, 2, dtype=_F64)
        rhs[n, 0] = 1.0
        rhs[:n, 1] = -a[face]
        solution = torch.linalg.solve(bordered, rhs)
        w0 = torch.zeros(K, dtype=_F64)
        w1 = torch.zeros(K, dtype=_F64)
        w0[face], w1[face] = solution[:n, 0], solution[:n, 1]
        mu0, mu1 = -solution[n, 0], -solution[n, 1]
        # The face's interval: w0 + s w1 >= 0 on S, and the multipliers off S,
        # (M w0 - mu0) + s (M w1 + a - mu1) >= 0, up to rounding (relative thresholds).
        slack0 = torch.where(face, w0 + _RTOL, M @ w0 - mu0 + _RTOL * scale)
        slack1 = torch.where(face, w1 + _RTOL, M @ w1 + a - mu1 + _RTOL * scale)
        bounds = -slack0 / torch.where(slack1 == 0, _TINY, slack1)
        s_low = max([0.0] + bounds[(slack1 > 0) & (slack0 < 0)].tolist())
        s_high = min([math.inf] + bounds[(slack1 < 0)].tolist())
        s_low, s_high = min(s_low, t), max(s_high, t)  # the face was computed at t
        A0 = max(float(w0 @ M @ w0), 0.0)  # ||p0||^2, p0 the min-norm point of the face's affine hull
        A2 = max(float(w1 @ M @ w1), 0.0)  # ||P_L g0||^2, L the face's direction space
        t_root = math.sqrt(A0 / (r * r - A2)) if A2 < r * r else math.inf
        if s_low * (1 - 1e-11) <= t_root <= s_high * (1 + 1e-11):
            w = (w0 + t_root * w1).clamp_min(0)
            return w / w.sum()
        if t_root < s_low:
            t_high = min(t_high, s_low)
        else:
            t_low = max(t_low, s_high)
        if t_low < t_root < t_high and iteration % 3 != 2:
            t = t_root
        else:
            t = 0.5 * (t_low + t_high) if t_low > 0 else 0.25 * t_high
    return w_t  # not reached in practice; the last projection's weights are feasible


def cagrad_coefficients(M: Tensor, c: float = 0.5, rescale: bool = False) -> Tensor:
    """CAGrad coefficients: ``d = sum_i coef_i g_i = g0 + r / ||g_w|| g_w``.

    ``w`` from :func:`cagrad_weights`, ``g0 = mean_i g_i``, ``r = c ||g0||``,
    ``||g_w||^2 = w^T M w``; so ``coef = 1/K + r / ||g_w|| w``, divided by ``1 + c^2`` when
    ``rescale`` (Liu et al. 2021). ``d`` solves CAGrad's primal problem
    ``max_d min_i <g_i, d>`` subject to ``||d - g0|| <= r``.

    Guard ``g_w = 0`` (0 is in the hull and optimal; always the case for c >= 1 when 0 is in
    the hull): the direction ``g_w / ||g_w||`` is undefined, and a Gramian resolves ``||g_w||``
    only to ~sqrt(eps) sum_i w_i ||g_i|| (the reference's ``r / (||g_w|| + 1e-8)`` amplifies that
    noise into the coefficients). So when
    ``||g_w|| <= 1e-6 sum_i w_i ||g_i|| + 1e-10 max_i ||g_i||``, ``g_w = 0`` is assumed. Then
    every primal solution has ``min_i <g_i, d> = 0``; the one returned is the projection of
    ``g0`` onto the dual cone ``{x : <x, g_j> >= 0}`` (``coef = 1/K + u``, ``u >= 0``, as UPGrad's), which lies in the ball. ``r = 0`` gives ``coef = 1/K``.
    Returns ``Tensor[K]`` float64 on the CPU.
    """
    M = _as_gramian(M)
    K = M.shape[0]
    a, g0_sq, r = _cagrad_problem(M, c)
    mean_weights = torch.full((K,), 1.0 / K, dtype=_F64)
    coefficients = mean_weights
    if r > 0:
        w = cagrad_weights(M, c)
        gw_norm = math.sqrt(max(float(w @ M @ w), 0.0))
        norms = M.diagonal().sqrt()
        if gw_norm > _NORM_RESOLUTION * float(w @ norms) + _NORM_FLOOR * float(norms.max()):
            coefficients = mean_weights + (r / gw_norm) * w
        else:
            coefficients = _lower_bounded_min_norm(M, mean_weights.unsqueeze(0))[0]
    if rescale:
        coefficients = coefficients / (1.0 + c * c)
    return coefficients
