"""CAGrad: conflict-averse gradient descent (Liu et al. 2021), on the Gramian."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fusedmtl.weighting.gradient_based import GradientWeighting
from fusedmtl.weighting.solvers import (
    DECISION_RTOL,
    as_float64_gramian,
    dual_cone_ridge,
    lower_bounded_min_norm,
    min_norm_simplex_with_support,
)

_F64 = torch.float64
_RTOL = DECISION_RTOL
_TINY = torch.finfo(_F64).tiny
# plus this fraction of max_i ||g_i|| in the g_w = 0 test, for w concentrated on (nearly) zero
# gradients
_NORM_FLOOR = 1e-10


class CAGrad(GradientWeighting):
    """Liu, Liu, Jin, Stone, Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021.

    With g0 = mean_i g_i and phi = c^2 norm(g0)^2: w = argmin_{w in simplex} <g_w, g0> +
    sqrt(phi) norm(g_w), g_w = sum_i w_i g_i, and d = g0 + sqrt(phi) / norm(g_w) g_w; the update
    maximises the worst task's improvement in a ball of radius c norm(g0) around g0. The K-dim
    problem is solved on the Gramian by :func:`cagrad_coefficients`.
    ``c`` = 0 is the plain mean; ``rescale`` divides by 1 + c^2 (the paper's option).

    Properties (tests/weighting/test_solver_properties.py): permutation invariant, d(s J) =
    s d(J); non-conflicting only for c >= 1 (the paper, section 3.1); not linear under scaling,
    not strongly stationary. Precision limit: on a strongly stationary Jacobian with c >= 1 the
    exact d lies in null(J) (d = 0 for c = 1, g_w anti-parallel to g0), and the computed one
    cancels to ~1e-10 ||g0|| in float64, where J d can be ~-1e-12 ||g_i||: a few times the
    properties' budget of 4 r max ||g_i|| on some random rank-19 20 x 100 matrices (r the
    Gramian's resolution; e.g. the sampler's 'strong' with seed 1003).

    Host synchronisation: the search runs on the host (Python floats; the Gramian is copied to
    the CPU), so this method is not yet sync-free (tests/weighting/test_no_host_sync.py).
    """

    def __init__(
        self, shared_params=None, tasks=None, *, c: float = 0.5, rescale: bool = False, **kwargs
    ) -> None:
        super().__init__(shared_params, tasks, **kwargs)
        if c < 0:
            raise ValueError(f"CAGrad: c must be non-negative, got {c}")
        self.c, self.rescale = float(c), rescale

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        return cagrad_coefficients(gramian.detach(), c=self.c, rescale=self.rescale).to(
            gramian.dtype
        )


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
    M, _ = as_float64_gramian(M)
    M = M.cpu()  # (a host algorithm: see the class docstring)
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
    w_t = torch.full((K,), 1.0 / K, dtype=_F64)
    for iteration in range(200):
        shifted = M + t * (a[:, None] + a[None, :]) + (t * t) * g0_sq
        w_t, face = min_norm_simplex_with_support(shifted, least_norm=False)
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
        A0 = max(
            float(w0 @ M @ w0), 0.0
        )  # ||p0||^2, p0 the min-norm point of the face's affine hull
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
    ``g0`` onto the dual cone ``{x : <x, g_j> >= 0}`` (``coef = 1/K + u``, ``u >= 0``, as
    UPGrad's), which lies in the ball. ``r = 0`` gives ``coef = 1/K``.
    Returns ``Tensor[K]`` float64 on the CPU.
    """
    M, resolution = as_float64_gramian(M)
    M = M.cpu()  # (a host algorithm: see the class docstring)
    K = M.shape[0]
    a, g0_sq, r = _cagrad_problem(M, c)
    mean_weights = torch.full((K,), 1.0 / K, dtype=_F64)
    coefficients = mean_weights
    if r > 0:
        w = cagrad_weights(M, c)
        gw_norm = math.sqrt(max(float(w @ M @ w), 0.0))
        norms = M.diagonal().sqrt()
        if gw_norm > math.sqrt(resolution) * float(w @ norms) + _NORM_FLOOR * float(norms.max()):
            coefficients = mean_weights + (r / gw_norm) * w
        else:
            ridge = dual_cone_ridge(resolution)
            coefficients = lower_bounded_min_norm(M, mean_weights.unsqueeze(0), ridge)[0]
    if rescale:
        coefficients = coefficients / (1.0 + c * c)
    return coefficients
