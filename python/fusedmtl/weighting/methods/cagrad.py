"""CAGrad: conflict-averse gradient descent (Liu et al. 2021), on the Gramian."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.weighting.gradient_based import GradientWeighting
from fusedmtl.weighting.solvers import (
    DECISION_RTOL,
    as_float64_gramian,
    cpu_shortcuts,
    dual_cone_ridge,
    lower_bounded_min_norm,
    min_norm_simplex_with_support,
    nnls_iterations,
    solve_on_support,
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

    No host synchronisation (solvers.py's convention): the search is a homotopy of fixed
    length on the Gramian's device (:func:`cagrad_weights`).
    """

    def __init__(
        self, shared_params=None, tasks=None, *, c: float = 0.5, rescale: bool = False, **kwargs
    ) -> None:
        super().__init__(shared_params, tasks, **kwargs)
        if c < 0:
            raise ValueError(f"CAGrad: c must be non-negative, got {c}")
        self.c, self.rescale = float(c), rescale

    def coefficients(self, gramian: Tensor, losses: Tensor | None = None) -> Tensor:
        coefficients = cagrad_coefficients(
            gramian.detach(), c=self.c, rescale=self.rescale, validate=False
        )
        return coefficients.to(gramian.dtype)


def _cagrad_problem(M: Tensor, c: float) -> tuple[Tensor, Tensor]:
    """a = M b (a_i = <g_i, g0>, b = 1 / K) and r = c ||g0|| = sqrt(phi), ||g0||^2 = b^T M b."""
    if c < 0:
        raise ValueError(f"c must be >= 0, got {c}")
    a = M.mean(1)
    return a, c * a.mean().clamp_min(0).sqrt()


def cagrad_weights(M: Tensor, c: float = 0.5, validate: bool = True) -> Tensor:
    """CAGrad dual weights: ``w = argmin_{w in simplex} w^T M b + sqrt(phi) sqrt(w^T M w)``.

    Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021, with
    ``b = 1 / K``, ``g0 = mean_i g_i``, ``phi = c^2 ||g0||^2``, ``g_w = sum_i w_i g_i``; the
    objective is ``F(w) = <g_w, g0> + r ||g_w||``, ``r = sqrt(phi)``. The reference implementation
    uses scipy's SLSQP; this one is exact.

    Algorithm: F's KKT conditions at w are those of the projection of ``-t g0`` onto the convex
    hull of the gradients, ``min_{w in simplex} ||g_w + t g0||^2``, at ``t = ||g_w|| / r``; and
    ``||g_w(t)|| / (r t)`` decreases in t, so the root is the first t where it reaches 1. A
    homotopy in t follows the projection from t = 0 (MGDA's minimum-norm point, solved exactly
    by :func:`~fusedmtl.weighting.solvers.min_norm_simplex_with_support`): on a face S (affinely
    independent gradients) the projection is affine in t, ``w0 + t w1`` (one batched solve of
    ``Q_SS [y z] = [1 a_S]``, ``Q = M + s 1 1^T``, s the face's least positive ``||g_i||^2``),
    and ``||g_w|| = r t`` has the closed-form root ``t* = sqrt(A0 / (r^2 - A2))``,
    ``A0 = ||g_w0||^2``, ``A2 = ||g_w1||^2`` (``g_w0`` is orthogonal to the face's directions).
    If t* comes before the face ends (a weight on S reaching 0, or a multiplier off S reaching
    0), ``w0 + t* w1`` is the exact minimiser; otherwise the face changes there (that index
    leaves or enters) and the homotopy goes on.
    No host synchronisation: :func:`~fusedmtl.weighting.solvers.nnls_iterations` (K) face
    changes run, the answer frozen once found (typically after 0 to 2 changes); on CPU tensors
    the loop ends then.

    Args:
        M: Gramian ``Tensor[K, K]``, symmetric PSD, any float dtype / device.
        c: the radius ratio (>= 0; CAGrad uses 0.5).
        validate: check M's finiteness (a host read; ``ValueError``).
    Returns:
        ``Tensor[K]`` float64 on M's device, nonnegative, summing to 1.

    Degenerate cases: K = 1 gives ``[1]``. ``r = 0`` (c = 0, or ``g0 = 0``: all gradients zero,
    ``g`` and ``-g``) leaves the linear ``<g_w, g0>``, minimised by uniform weights over the
    gradients of least ``<g_i, g0>`` (all of them when ``g0 = 0``). When 0 is in the hull and
    optimal (``g_w = 0``: e.g. ``g1 = -g2`` and a third gradient orthogonal to them), the weights
    of 0 on the face the homotopy is on are returned. When w is not unique (affinely dependent
    gradients) the minimiser on an affinely independent face is returned.
    """
    M, resolution = as_float64_gramian(M, validate)
    return cagrad_homotopy(M, c, resolution)[0]


def _at_zero(M: Tensor, w: Tensor, resolution: float) -> Tensor:
    """Whether g_w = 0 to the Gramian's resolution: ||g_w|| is resolved only to about
    sqrt(resolution) sum_i w_i ||g_i|| (plus 1e-10 max_i ||g_i|| for w on zero gradients)."""
    norms = M.diagonal().clamp_min(0).sqrt()
    gw_norm = (w @ M @ w).clamp_min(0).sqrt()
    return gw_norm <= resolution**0.5 * (w @ norms) + _NORM_FLOOR * norms.max()


def cagrad_homotopy(M: Tensor, c: float, resolution: float) -> tuple[Tensor, Tensor]:
    """:func:`cagrad_weights` on a float64 Gramian of that resolution
    (:func:`~fusedmtl.weighting.solvers.as_float64_gramian`), and whether the homotopy reached
    the root within its bound (a 0-dim bool tensor; if not, MGDA's weights are returned: the
    tests check that it always does)."""
    K, device = M.shape[0], M.device
    a, r = _cagrad_problem(M, c)
    false = torch.zeros((), dtype=torch.bool, device=device)
    if K == 1:
        return torch.ones(1, dtype=_F64, device=device), ~false
    scale = M.diagonal().max().clamp_min(0)
    # r = 0: F = <g_w, g0> is linear, minimised by the cheapest vertices (uniform for determinism)
    linear = r <= _RTOL * scale.sqrt()
    cheapest = a <= a.min() + _RTOL * scale.clamp_min(_TINY)
    linear_weights = cheapest.to(_F64) / cheapest.sum()
    M = torch.where(linear, torch.eye(K, dtype=_F64, device=device), M)  # (a well-posed dummy)
    weights, face = min_norm_simplex_with_support(M, least_norm=False)
    diagonal = M.diagonal()
    norms, g0_norm = diagonal.clamp_min(0).sqrt(), a.mean().clamp_min(0).sqrt()
    fallback = diagonal.sum() / K
    ones = torch.stack([torch.ones_like(a), a])
    unit = torch.eye(K, dtype=torch.bool, device=device)
    t = torch.zeros((), dtype=_F64, device=device)
    # For c >= 1 and 0 in the hull, g_w = 0 is optimal (F(w) >= (r - ||g0||) ||g_w|| >= 0 = F at
    # 0; other optima, g_w anti-parallel to g0 when c = 1, would cancel d to rounding noise).
    found = _at_zero(M, weights, resolution) if c >= 1 else false
    stuck = false
    shortcuts = cpu_shortcuts(M)
    for _ in range(nnls_iterations(K)):
        if shortcuts and bool(found | stuck):
            break
        # On S: M_SS w + t a_S = mu 1, 1^T w = 1, i.e. w = (mu + s) y - t z with Q_SS y = 1,
        # Q_SS z = a_S; so w = w0 + t w1 and mu = mu0 + t mu1.
        # s: the face's least positive ||g_i||^2, so that Q_SS = M_SS + s 1 1^T (PD on affinely
        # independent faces for any s > 0) keeps its smallest gradients' entries (M_ij + s
        # rounds M_ij to ulp(s)); the columns of Q for the entering test below
        s = torch.where(face & (diagonal > 0), diagonal, torch.inf).amin()
        s = torch.where(torch.isinf(s), fallback, s).clamp_min(_TINY)
        Q = M + s
        solved = solve_on_support(Q, torch.cat([ones, Q]), face.expand(K + 2, K))
        y, z = solved[0], solved[1]
        # (g_j, sqrt(s)) off the span of the face's: only such a j can enter (a dependent j's
        # multiplier is 0 all along the face, up to rounding)
        independent = Q.diagonal() - (Q * solved[2:]).sum(-1) > 1e-9 * Q.diagonal()
        sum_y, sum_z = y.sum(), z.sum()
        w0, w1 = y / sum_y, y * (sum_z / sum_y) - z
        mu0, mu1 = 1.0 / sum_y - s, sum_z / sum_y
        A0 = (w0 @ M @ w0).clamp_min(0)  # ||p0||^2, p0 the min-norm point of the affine hull
        A2 = (w1 @ M @ w1).clamp_min(0)  # ||P_L g0||^2, L the face's direction space
        margin = r * r - A2
        t_root = torch.where(margin > 0, (A0 / margin.clamp_min(_TINY)).sqrt(), torch.inf)
        # The face ends where w0 + t w1 >= 0 on S or the multipliers off S,
        # (M w0 - mu0) + t (M w1 + a - mu1) >= 0, first fail, each to its own rounding: a weight
        # to _RTOL, the multiplier of j, <g_j - g_i, g_w + t g0> (i in S), to _RTOL (n_j + n_S)
        # (n_S + t ||g0||) + _RTOL s (mu0's rounding), n_S the face's largest norm. (At the root
        # CAGrad's KKT gradient is r / ||g_w|| times these multipliers: a tolerance relative to
        # max_i ||g_i||^2 alone lets a small-norm task that should enter stay out when ||g_w||
        # is small.)
        face_norm = torch.where(face, norms, 0.0).amax()
        spread = _RTOL * (norms + face_norm)
        level_tolerance = torch.where(face, _RTOL, spread * face_norm + _RTOL * s)
        slope_tolerance = torch.where(face, 0.0, spread * g0_norm)
        level = torch.where(face, w0, M @ w0 - mu0)
        slope = torch.where(face, w1, M @ w1 + a - mu1)
        falling = (slope + slope_tolerance < -torch.where(face, _RTOL, 0.0)) & (face | independent)
        ends = torch.where(
            falling,
            -(level + level_tolerance) / torch.where(falling, slope + slope_tolerance, -1.0),
            torch.inf,
        )
        t_end, index = torch.maximum(ends, t).min(0, keepdim=True)
        # A face that ends where it starts holds no root past t: this matters at t = 0 with
        # g_w0 = 0 (0 a vertex of the hull, t* = 0 on a face -t g0 leaves at once)
        at_once = (falling & (level + t * slope <= level_tolerance + t * slope_tolerance)).any()
        root_here = (t_root <= t_end[0] * (1 + 1e-11)) & ~(at_once & (t_root <= t))
        root_weights = (w0 + torch.maximum(t_root, t) * w1).clamp_min(0)
        root_weights = root_weights / root_weights.sum()
        weights = torch.where(found | stuck | ~root_here, weights, root_weights)
        found = found | (root_here & ~stuck)
        # no end and no root (only rounding could do that): the homotopy cannot go on
        stuck = stuck | (~found & torch.isinf(t_end[0]))
        face = torch.where(found | stuck, face, face ^ unit[index][0])
        t = torch.where(found | stuck, t, t_end[0])
    return torch.where(linear, linear_weights, weights), linear | found


def cagrad_coefficients(
    M: Tensor, c: float = 0.5, rescale: bool = False, validate: bool = True
) -> Tensor:
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
    UPGrad's), which lies in the ball. ``r = 0`` gives ``coef = 1/K``. Both candidates are
    computed and one selected (no host read).
    Returns ``Tensor[K]`` float64 on M's device.
    """
    M, resolution = as_float64_gramian(M, validate)
    K = M.shape[0]
    r = _cagrad_problem(M, c)[1]
    mean_weights = torch.full((K,), 1.0 / K, dtype=_F64, device=M.device)
    w = cagrad_homotopy(M, c, resolution)[0]
    gw_norm = (w @ M @ w).clamp_min(0).sqrt()
    resolved = ~_at_zero(M, w, resolution)
    ascent = mean_weights + (r / gw_norm.clamp_min(_TINY)) * w
    if cpu_shortcuts(M) and bool(resolved | (r <= 0)):
        projected = mean_weights  # (not selected)
    else:
        ridge = dual_cone_ridge(resolution)
        projected = lower_bounded_min_norm(M, mean_weights.unsqueeze(0), ridge)[0]
    coefficients = torch.where(r > 0, torch.where(resolved, ascent, projected), mean_weights)
    if rescale:
        coefficients = coefficients / (1.0 + c * c)
    return coefficients
