"""Small K x K solvers of the gradient-based aggregations (docs/METHODS.md, section 4).

Every method turns the Gramian ``M[i, j] = <g_i, g_j>`` of the K task gradients into
coefficients ``c`` and the shared update ``d = sum_i c_i g_i``. The problems solved here are
tiny (K from 1 to ~64) and run at each training step, so they are written with a few tensor
ops per iteration and exact (active-set / Newton) algorithms rather than generic solvers with
loose tolerances.

No host synchronisation: every function runs on the Gramian's device, with a fixed number of
iterations fixed by K alone (an active-set loop runs to its bound and stops changing once
converged, through masks and ``torch.where``) and no Python branch on a value, so a training step
never waits for the GPU and can be captured in a CUDA graph or compiled with
``torch.compile(fullgraph=True)`` (tests/weighting/test_no_host_sync.py). The one exception is the
input check of the public functions (``validate=True``, the default, reads the Gramian's
finiteness on the host); the methods call them with ``validate=False``.

Conventions shared by every public function:

* ``M`` is a symmetric positive semi-definite ``Tensor[K, K]`` of any floating dtype and device.
  It is converted to float64 on its device, symmetrised and cut to the accuracy of its dtype
  (:func:`as_float64_gramian`); results are float64 tensors on M's device. Non-finite entries
  raise ``ValueError`` (with ``validate=True``; otherwise the result is unspecified).
* Singular ``M`` (identical, opposite, zero or linearly dependent gradients) is supported and
  never produces NaN or inf; each function documents what it returns in those cases.
* Accuracy: the KKT conditions of each problem hold to about 1e-12 relative to the scale of
  ``M`` (decisions such as "is this multiplier positive" use a relative threshold of 1e-12),
  except where M's own conditioning limits them (documented per function).
* Speed: a few tensor ops per active-set iteration, ~2 us each on the CPU, 3 K + 10 of them
  (the loop's bound; the answer is reached after ~K). Prefer one intra-op
  thread (``torch.set_num_threads(1)``): on a loaded machine the OpenMP spin-waits of these
  tiny ops can cost tens of ms.
* Deterministic: same input, same output (ties are broken by index, then resolved as
  documented; for low-precision Gramians the dual cone's ridge resolves them).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from fusedmtl import linalg

__all__ = [
    "DECISION_RTOL",
    "as_float64_gramian",
    "cpu_shortcuts",
    "dual_cone_ridge",
    "dual_cone_weights",
    "gramian_resolution",
    "halving_line_search",
    "lower_bounded_min_norm",
    "min_norm_simplex",
    "min_norm_simplex_float64",
    "min_norm_simplex_with_support",
    "nnls_iterations",
    "solve_on_support",
    "upgrad_coefficients",
]

_F64 = torch.float64
# Relative threshold of every discrete decision (a multiplier's sign, a tie, a rank): well
# above float64 rounding of the K x K arithmetic, well below the accuracy the callers need.
DECISION_RTOL = 1e-12
_RTOL = DECISION_RTOL
_TINY = torch.finfo(_F64).tiny
# On CPU tensors outside torch.compile, reading a value waits for no device: there the active-set
# loop stops once every row has converged and skips the work no row needs (the answers are the
# same, the fixed-count loop only repeats a converged state). False runs the device path on the
# CPU too (the tests of that path do).
CPU_SHORTCUTS = True


def cpu_shortcuts(t: Tensor) -> bool:
    """Whether a fixed-count loop over ``t`` may stop early (``CPU_SHORTCUTS``, a CPU tensor, not
    under torch.compile): only then does reading a value wait for no device."""
    return CPU_SHORTCUTS and t.device.type == "cpu" and not torch.compiler.is_compiling()


def halving_line_search(
    start: Tensor, halvings: int, accept: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    """The first of ``start, start / 2, ..., start / 2^(halvings - 1)`` that ``accept`` takes: a
    backtracking line search without a host read, every candidate tested at once.

    ``accept`` maps the candidates (``Tensor[halvings]``, float64) to ``Tensor[halvings]`` bool.
    Returns (the fraction, whether any was accepted: 0-dim bool); with none accepted, the
    fraction is ``start / 2^halvings``, where a sequential loop of ``halvings`` halvings would end.
    Halving is exact in floating point, so the candidates are those of the sequential loop."""
    powers = torch.arange(halvings, dtype=_F64, device=start.device)
    accepted = accept(start * torch.pow(0.5, powers))
    found = accepted.any()
    first = torch.where(found, accepted.to(torch.int8).argmax(), halvings)
    return start * torch.pow(0.5, first.to(_F64)), found


def gramian_resolution(dtype: torch.dtype, K: int) -> float:
    """The relative accuracy of a K x K Gramian computed in ``dtype``: eigenvalues of its
    correlation matrix (see :func:`as_float64_gramian`) below this are indistinguishable from 0.

    Each entry M_ij of a Gramian rounded to (or accumulated in) ``dtype`` is accurate to a few
    eps ||g_i|| ||g_j||, so its correlation matrix C_ij = M_ij / (||g_i|| ||g_j||) to a few eps
    entrywise and its eigenvalues to ~K eps; 16 K eps leaves a margin (float32, K = 20: 3.8e-5;
    float64: 7.1e-14), capped at 1e-2 for the half-precision dtypes."""
    return min(16.0 * max(K, 1) * torch.finfo(dtype).eps, 1e-2)


def as_float64_gramian(M: Tensor, validate: bool = True) -> tuple[Tensor, float]:
    """M as a symmetric PSD float64 tensor (on M's device) at the accuracy of its dtype, and that
    accuracy.

    Checks the shape (``Tensor[K, K]``, K >= 1) and, with ``validate``, finiteness (``ValueError``
    otherwise; the one host read of this module: the methods pass ``validate=False`` and hand in
    only finite Gramians). The Gramian ``M = D C D`` (``D = diag(||g_i||)``, C the correlation
    matrix: gradients rounded or accumulated in M's dtype make C's entries accurate to a few eps)
    is replaced by ``D C' D``, C' = C with its eigenvalues below ``gramian_resolution(M.dtype, K)``
    set to 0 (float64 Gramians: only negative eigenvalues beyond rounding, so exact ties stay
    exact). That changes M by no more than its own rounding, removes the noise eigenvalues of a
    rank-deficient Gramian (a float32 ``J J^T`` of rank r has K - r eigenvalues of ~eps32 instead
    of 0, and near-dependent gradients seen through that noise make weights of ~1 / sqrt(eps32)
    and solutions that depend on the task order), and is invariant to scaling any gradient. Zero
    gradients stay exactly zero. Every solver here then works in float64, with its decisions at
    float64 rounding, on a matrix whose rank is that of the accuracy of the caller's dtype.
    Well-conditioned Gramians are returned unchanged (selected by ``torch.where``, no branch).

    Returns (``Tensor[K, K]`` float64 on M's device, the resolution as a float)."""
    if not isinstance(M, Tensor) or M.dim() != 2 or M.shape[0] != M.shape[1] or M.shape[0] == 0:
        shape = getattr(M, "shape", M)
        raise ValueError(f"expected a square Gramian Tensor[K, K] with K >= 1, got {shape!r}")
    K = M.shape[0]
    resolution, M_dtype = gramian_resolution(M.dtype, K), M.dtype
    M = M.detach().to(dtype=_F64)
    if validate and not bool(torch.isfinite(M).all()):  # (documented host read)
        raise ValueError("the Gramian has non-finite entries")
    M = 0.5 * (M + M.T)
    if K == 1:
        return M.clamp_min(0), resolution
    norms = M.diagonal().clamp_min(0).sqrt()
    inverse_norms = torch.where(norms > 0, 1.0 / norms.clamp_min(_TINY), 0.0)
    correlation = M * inverse_norms[:, None] * inverse_norms[None, :]
    eigenvalues, eigenvectors = linalg.eigh(correlation)
    # float64 Gramians keep their exact ties and zero rows unless genuinely indefinite
    cutoff = resolution if M_dtype != _F64 else -_RTOL
    largest = eigenvalues[-1].clamp_min(0)
    # rank-deficient at M's accuracy (or slightly indefinite): drop the noise eigenvalues;
    # otherwise M is left untouched (well-conditioned inputs keep their exact values)
    deficient = eigenvalues[0] < cutoff * largest
    kept = torch.where(eigenvalues >= max(cutoff, 0.0) * eigenvalues[-1], eigenvalues, 0.0)
    rebuilt = ((eigenvectors * kept) @ eigenvectors.T) * norms[:, None] * norms[None, :]
    return torch.where(deficient, 0.5 * (rebuilt + rebuilt.T), M), resolution


def _as_gramian(M: Tensor, validate: bool = True) -> Tensor:
    return as_float64_gramian(M, validate)[0]


def solve_on_support(Q: Tensor, rhs: Tensor, support: Tensor) -> Tensor:
    """For each row b: the solution s of Q[S, S] s_S = rhs[b, S], s = 0 off S = support[b].

    Batched by embedding Q[S, S] in the identity (:func:`_embedded`). Q: [K, K], rhs and support:
    [B, K]. Cholesky; where a system is numerically semi-definite
    (nearly dependent columns, which the active set admits only through rounding) the Cholesky
    of the system with a ridge of 1e-12 of its largest diagonal entry instead (selected, no
    branch; never a singular-matrix error)."""
    K = Q.shape[0]
    system = _embedded(Q, support)
    rhs = torch.where(support, rhs, 0.0).unsqueeze(-1)
    factor, info = torch.linalg.cholesky_ex(system)
    if cpu_shortcuts(system) and bool((info == 0).all()):
        return torch.cholesky_solve(rhs, factor).squeeze(-1).reshape(-1, K) * support
    ridge = 1e-12 * system.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(_TINY)
    ridged = system + torch.diag_embed(ridge[:, None].expand(-1, K))
    ridged_factor, _ = torch.linalg.cholesky_ex(ridged)
    factor = torch.where((info == 0)[:, None, None], factor, ridged_factor)
    solution = torch.cholesky_solve(rhs, factor).nan_to_num(0.0, 0.0, 0.0)
    return solution.squeeze(-1).reshape(-1, K) * support


def nnls_iterations(K: int) -> int:
    """The fixed number of active-set iterations of :func:`_nnls_gram` for K columns: 3 K + 10.

    Each iteration either adds a column or drops at least one, and an active set never repeats
    (the objective strictly decreases between them), so the loop is finite; on the problems of
    the tests it ends after at most ~K adds and a few drops. The bound is that of the former
    early-exit loop, so the answers are the same; iterations after convergence change nothing."""
    return 3 * K + 10


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
    Run for :func:`nnls_iterations` (K) iterations on every row, a row that has converged
    (``running`` False) no longer changing: no host read, no data-dependent branch (except with
    ``CPU_SHORTCUTS`` on CPU tensors, where it stops once every row has converged). There, for
    K <= ``ENUMERATED_MAX_K``, every support is tried at once first
    (:func:`_nnls_on_every_support`, the same stopping test), and the loop runs only if some row
    found none.

    With least_norm, when the minimiser is not unique (Q singular and some column off the
    support with w = 0), returns the minimiser of least Euclidean norm if that has no negative
    entry (always the case for exact ties such as duplicated columns); otherwise the
    active set's. Returns (x [B, K], support [B, K] bool)."""
    B, K = P.shape
    device = Q.device
    column_norm = Q.diagonal().clamp_min(0).sqrt()
    b_norm = b_sq.clamp_min(0).sqrt().unsqueeze(-1)

    def least_norm_of(x, support):
        w, threshold = _gradient_and_threshold(Q, P, x, column_norm, b_norm)
        return _least_norm_minimiser(Q, x, support | (w.abs() <= threshold), support)

    if K <= ENUMERATED_MAX_K and cpu_shortcuts(Q):
        x, support, certified = _nnls_on_every_support(Q, P, column_norm, b_norm)
        if bool(certified.all()):
            return (least_norm_of(x, support) if least_norm else x), support

    x = torch.zeros(B, K, dtype=_F64, device=device)
    support = torch.zeros(B, K, dtype=torch.bool, device=device)
    excluded = torch.zeros(B, K, dtype=torch.bool, device=device)
    running = torch.ones(B, dtype=torch.bool, device=device)
    unit = torch.eye(K, dtype=torch.bool, device=device)

    # Shortcut, one solve for the common case: when Q is positive definite (pivots well away
    # from zero, so the minimiser is unique) and its unconstrained minimiser is positive, that
    # is the answer (x > 0, zero gradient: the KKT conditions hold); those rows stop at once.
    factor, info = torch.linalg.cholesky_ex(Q)
    pivots_sq = factor.diagonal().square()
    definite = (info == 0) & (pivots_sq.min() > 1e-8 * Q.diagonal().max())
    unconstrained = torch.cholesky_solve(P.T, factor).T
    interior = definite & (unconstrained > 0).all(-1, keepdim=True)
    x = torch.where(interior, unconstrained, x)
    support = support | interior
    running = running & ~interior.squeeze(-1)

    shortcuts = cpu_shortcuts(Q)
    for _ in range(nnls_iterations(K)):
        if shortcuts and not bool(running.any()):
            break
        s = solve_on_support(Q, P, support)
        feasible = ((s > 0) | ~support).all(-1)
        accept = running & feasible
        x = torch.where(accept.unsqueeze(-1), s, x)
        w, threshold = _gradient_and_threshold(Q, P, x, column_norm, b_norm)
        candidate = ~support & ~excluded & (w > threshold)
        has_candidate = candidate.any(-1)
        entering = torch.where(candidate, w / column_norm.clamp_min(_TINY), -math.inf).argmax(-1)
        support = support | (unit[entering] & (accept & has_candidate).unsqueeze(-1))
        running = running & ~(accept & ~has_candidate)
        blocked = (running & ~feasible).unsqueeze(-1)
        if shortcuts and not bool(blocked.any()):
            continue
        # blocked rows: move from x towards s until the first support coordinate reaches zero,
        # drop it
        shrinking = support & (s <= 0)
        ratio = torch.where(shrinking, x / (x - s).clamp_min(_TINY), math.inf)
        alpha, leaving_index = ratio.min(-1)
        alpha = torch.where(torch.isfinite(alpha), alpha, 0.0)  # (rows that are not blocked)
        moved = x + alpha.unsqueeze(-1) * (s - x)
        leaving = support & (unit[leaving_index] | (moved <= 0))
        moved = torch.where(leaving, 0.0, moved)
        x = torch.where(blocked, moved, x)
        support = torch.where(blocked, support & ~leaving, support)
        # A column that entered with a positive gradient but cannot grow is a rounding
        # artefact of a (nearly) dependent column; never re-entering it prevents cycling.
        excluded = excluded | (blocked & (alpha == 0).unsqueeze(-1) & unit[leaving_index])

    return (least_norm_of(x, support) if least_norm else x), support


def _gradient_and_threshold(
    Q: Tensor, P: Tensor, x: Tensor, column_norm: Tensor, b_norm: Tensor
) -> tuple[Tensor, Tensor]:
    """The NNLS gradient w = p - Q x at x (rows, or [B, N, K] batches of them) and the threshold
    of the decision w_j > 0: w_j = a_j^T (b - A x) has rounding ~eps ||a_j|| (||b|| +
    sum_k ||a_k|| x_k)."""
    w = P - x @ Q
    threshold = _RTOL * column_norm * (b_norm + (x * column_norm).sum(-1, keepdim=True))
    return w, threshold


# K up to which :func:`_nnls_gram` on the CPU solves on every support at once (2^K of them)
# before it runs the active-set loop: at K = 4, ~4x fewer tensor ops than the loop's iterations.
ENUMERATED_MAX_K = 8


@functools.cache
def _supports(K: int, device: torch.device) -> Tensor:
    """Every subset of K columns, smallest first (then by index), as bool masks [2^K, K]."""
    order = sorted(range(2**K), key=lambda n: (n.bit_count(), n))
    masks = torch.tensor([[(n >> j) & 1 for j in range(K)] for n in order], dtype=torch.bool)
    return masks.to(device)


def _embedded(Q: Tensor, supports: Tensor) -> Tensor:
    """Q[S, S] for each support S (rows of ``supports`` [B, K] bool) embedded in the identity off
    S: [B, K, K], non-singular exactly when Q[S, S] is, so that one batched factorisation solves
    every support's system."""
    pairs = supports[:, :, None] & supports[:, None, :]
    return torch.where(pairs, Q, 0.0) + torch.diag_embed((~supports).to(Q.dtype))


def _nnls_on_every_support(
    Q: Tensor, P: Tensor, column_norm: Tensor, b_norm: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The NNLS of :func:`_nnls_gram` by enumeration: for every support S at once, the solution
    of Q[S, S] x_S = p_S (a batched Cholesky of the 2^K systems, :func:`_embedded`), and per
    row the first S, smallest first, whose solution meets the active-set loop's own stopping test
    (x_S > 0, w_j <= threshold off S; its Cholesky succeeded). Such an x satisfies the KKT
    conditions to the thresholds, as the loop's answer does; the loop's final support is one of
    the candidates, so one exists up to rounding.
    Returns (x [B, K], support [B, K], certified [B] bool: a support met the test)."""
    B, K = P.shape
    masks = _supports(K, Q.device)
    systems = _embedded(Q, masks)
    factors, info = torch.linalg.cholesky_ex(systems)
    rhs = P.T * masks[:, :, None]  # [2^K, K, B]
    x = torch.cholesky_solve(rhs, factors).permute(2, 0, 1) * masks  # [B, 2^K, K]
    w, threshold = _gradient_and_threshold(Q, P.unsqueeze(1), x, column_norm, b_norm[:, :, None])
    meets = torch.where(masks, x > 0, w <= threshold).all(-1) & (info == 0)  # [B, 2^K]
    first = meets.to(torch.int8).argmax(-1)
    rows = torch.arange(B, device=Q.device)
    return x[rows, first], masks[first], meets.any(-1)


def _least_norm_minimiser(Q: Tensor, x: Tensor, tight: Tensor, support: Tensor) -> Tensor:
    """Among the minimisers of _nnls_gram, the one of least norm when it is nonnegative.

    Every minimiser y has the same residual A y = A x and is supported on the tight set T
    (zero gradient), so they are the nonnegative solutions of Q[T, T] y_T = (Q x)_T; the
    least-norm solution is pinv(Q[T, T]) (Q x)_T. Only rows with a tight column off the
    support can have several minimisers; computed for every row (one batched eigh), used on
    those."""
    redo = (tight & ~support).any(-1, keepdim=True)
    if cpu_shortcuts(Q) and not bool(redo.any()):
        return x
    mask = tight
    block = torch.where(mask[:, :, None] & mask[:, None, :], Q, 0.0)
    eigenvalues, eigenvectors = linalg.eigh(block)
    kept = eigenvalues > _RTOL * eigenvalues[:, -1:].clamp_min(_TINY)
    rhs = torch.where(mask, x @ Q, 0.0)
    spectral = (eigenvectors.transpose(-1, -2) @ rhs.unsqueeze(-1)).squeeze(-1)
    spectral = torch.where(kept, spectral / torch.where(kept, eigenvalues, 1.0), 0.0)
    y = (eigenvectors @ spectral.unsqueeze(-1)).squeeze(-1) * mask
    nonnegative = (y >= -_RTOL * x.abs().amax(-1, keepdim=True)).all(-1, keepdim=True)
    return torch.where(redo & nonnegative, y.clamp_min(0), x)


# ----------------------------------------------------------------------------------------------
# MGDA: minimum-norm point of the convex hull


def min_norm_simplex_with_support(M: Tensor, least_norm: bool) -> tuple[Tensor, Tensor]:
    """argmin_{c in simplex} c^T M c, and its support (affinely independent g_i).

    On a support S the minimiser solves the KKT system M_SS c_S = v 1, 1^T c_S = 1 (v = c^T M c),
    non-singular exactly when the g_i, i in S, are affinely independent; it is solved in the
    correlations of the gradients, so that each keeps its own digits however far the norms
    spread (:func:`_simplex_kkt_on_supports`). The support: for K <= ``ENUMERATED_MAX_K``, the
    first of every support, smallest first, whose solution meets the KKT test (a minimal face
    always does, up to rounding). Otherwise (and, on a device, alongside, in case none meets)
    Lawson-Hanson's NNLS on an equivalent problem picks it: for s > 0,
    min_{x >= 0} ||G^T x||^2 + s (1^T x - 1)^2 (Q = M + s 1 1^T, p = s 1, ||b||^2 = s) is solved
    by x = c s / (s + v) (x = t c gives t^2 v + s (t - 1)^2, least at t = s / (s + v), increasing
    in v), s = the smallest nonzero ||g_i||^2, so that M + s 1 1^T keeps the entries of the
    smallest gradients (s = trace(M) / K rounded them to ulp(s), and the support was off by
    several indices for norms spread over 6 decades); then the KKT system on its support or on one
    of that support's K neighbours (one index in or out), the first that meets the test, replaces
    x, since M + s 1 1^T still rounds the largest gradients' share of the constraint. With
    least_norm, ties are resolved by :func:`_least_norm_simplex`. M must not be zero."""
    K = M.shape[0]
    enumerated = K <= ENUMERATED_MAX_K
    if enumerated:
        masks = _supports(K, M.device)
        weights, meets = _simplex_kkt_on_supports(M, masks)
        first = meets.to(torch.int8).argmax().reshape(1)  # (a tensor index: no host read)
        c, support = weights.index_select(0, first)[0], masks.index_select(0, first)[0]
        certified = meets.any()
    if not (enumerated and cpu_shortcuts(M) and bool(certified)):
        squared_norms = M.diagonal()
        s = torch.where(squared_norms > 0, squared_norms, torch.inf).amin()
        x, active = _nnls_gram(M + s, s.expand(1, K), s.reshape(1), least_norm=False)
        # (on the CPU the neighbours only if the support fails)
        neighbours = active
        polished, meets = _simplex_kkt_on_supports(M, neighbours)
        if not (cpu_shortcuts(M) and bool(meets.all())):
            unit = torch.eye(K, dtype=torch.bool, device=M.device)
            neighbours = torch.cat([active, active ^ unit])
            polished, meets = _simplex_kkt_on_supports(M, neighbours)
        pick = meets.to(torch.int8).argmax().reshape(1)
        looped = torch.where(meets.any(), polished.index_select(0, pick)[0], x[0] / x[0].sum())
        active = torch.where(meets.any(), neighbours.index_select(0, pick)[0], active[0])
        if enumerated:  # (on a device: both run, no host read decides)
            c = torch.where(certified, c, looped)
            support = torch.where(certified, support, active)
        else:
            c, support = looped, active
    if least_norm:
        c = _least_norm_simplex(M, c, support)
    return c, support


def _simplex_kkt_on_supports(M: Tensor, supports: Tensor) -> tuple[Tensor, Tensor]:
    """For each support S (rows of ``supports`` [B, K] bool): the solution c [B, K] (0 off S) of
    M_SS c_S = v 1, 1^T c_S = 1, and whether it meets the KKT test of the minimum on the simplex
    (``meets`` [B] bool): c_S > 0, and each multiplier (:func:`_simplex_multipliers`) zero on S
    and nonnegative off it, to its rounding. Such a c is a minimiser (up to that rounding).

    Solved as the bordered system [C_SS, -u_S; u_S^T, 0] [y_S; v'] = [0; 1] (C = D^-1 M D^-1 the
    correlations, u = D^-1 1 / ||D^-1 1||, c = D^-1 y normalised to sum 1), by LU, every support
    at once, each embedded in the identity off S. Zero gradients take D_ii = 1 (their C row is
    0; the bordered system stays non-singular). An affinely dependent S fails the LU or the
    test."""
    K = M.shape[0]
    norms = M.diagonal().clamp_min(0).sqrt()
    scale = torch.where(norms > 0, norms, 1.0)
    correlation = M / scale[:, None] / scale[None, :]
    border = 1.0 / scale
    border = border / border.norm()
    block = _embedded(correlation, supports)
    column = (border * supports).unsqueeze(-1)  # [B, K, 1]
    corner = torch.zeros_like(column[:, :1])
    system = torch.cat([torch.cat([block, -column], -1), torch.cat([column.mT, corner], -1)], 1)
    rhs = torch.zeros_like(system[:, :, :1])
    rhs[:, K] = 1.0
    solution, info = torch.linalg.solve_ex(system, rhs)
    c = solution[:, :K, 0] * supports / scale
    total = c.sum(-1, keepdim=True)
    c = c / torch.where(total != 0, total, 1.0)
    multipliers, tolerance = _simplex_multipliers(M, c)
    on_support = (c > 0) & (multipliers.abs() <= tolerance)
    meets = torch.where(supports, on_support, multipliers >= -tolerance).all(-1)
    return c, meets & (info == 0) & torch.isfinite(c).all(-1)


def _simplex_multipliers(M: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """The KKT multipliers mu_j = (M c)_j - c^T M c of the simplex minimum at c ([..., K]) and
    their rounding, _RTOL (||g_j|| + n_c) n_c, n_c = sum_k c_k ||g_k|| (the scale of the sums
    (M c)_j = <g_j, sum_k c_k g_k> and of c^T M c)."""
    norms = M.diagonal().clamp_min(0).sqrt()
    Mc = c @ M
    spread = (c * norms).sum(-1, keepdim=True)
    return Mc - (c * Mc).sum(-1, keepdim=True), _RTOL * (norms + spread) * spread


def _least_norm_simplex(M: Tensor, c: Tensor, support: Tensor) -> Tensor:
    """Among the minimisers of c^T M c on the simplex, the one of least Euclidean norm when it is
    nonnegative (always so for exact ties such as identical gradients); otherwise c.

    Every minimiser y has the same point sum_i y_i g_i and lies on the tight set T (the indices
    whose multiplier vanishes, to the rounding of :func:`_simplex_kkt_on_supports`), so the
    minimisers are the nonnegative solutions of M_TT y_T = (M c)_T, 1^T y_T = 1, and the least
    -norm one is the pseudo-inverse's. Rows equilibrated (row j divided by ||g_j|| max_k ||g_k||);
    checked a minimiser (the same point as c's, to the rounding of M y; norms spread over more
    than ~1e10 can fail it, then c stays). Only a tight index off the support can make several
    minimisers; on the CPU the rest is skipped then."""
    multipliers, tolerance = _simplex_multipliers(M, c)
    tight = support | (multipliers.abs() <= tolerance)
    redo = (tight & ~support).any()
    if cpu_shortcuts(M) and not bool(redo):
        return c
    norms = M.diagonal().clamp_min(0).sqrt()
    scale = torch.where(norms > 0, norms, 1.0)
    rows = scale * norms.max().clamp_min(_TINY)
    pairs = tight[:, None] & tight[None, :]
    system = torch.cat([torch.where(pairs, M, 0.0) / rows[:, None], tight[None].to(_F64)])
    rhs = torch.cat([torch.where(tight, c @ M, 0.0) / rows, torch.ones_like(c[:1])])
    y = linalg.pinv(system, rtol=M.shape[0] * _RTOL) @ rhs
    # a minimiser: G^T y = G^T c, seen as <g_j, G^T (y - c)> / ||g_j|| on T, to its rounding
    residual = torch.where(tight, (y - c) @ M, 0.0).abs() / scale
    same_point = residual <= M.shape[0] * _RTOL * (c @ norms + y.abs() @ norms)
    minimiser = (y >= -_RTOL * c.abs().max()).all() & same_point.all()
    y = y.clamp_min(0)
    return torch.where(redo & minimiser, y / y.sum(), c)


def min_norm_simplex(M: Tensor, validate: bool = True) -> Tensor:
    """MGDA weights: ``c = argmin_{c >= 0, sum(c) = 1} c^T M c``.

    The minimum-norm point ``sum_i c_i g_i`` of the convex hull of the task gradients, a
    Pareto-stationary common descent direction (Sener & Koltun, "Multi-Task Learning as
    Multi-Objective Optimization", NeurIPS 2018).

    Args:
        M: Gramian ``Tensor[K, K]``, symmetric PSD, any float dtype / device.
        validate: check M's finiteness (a host read; ``ValueError``).
    Returns:
        ``Tensor[K]`` float64 on M's device, nonnegative, summing to 1.

    Algorithm: K = 2 in closed form; otherwise the KKT system on the right face, found by
    enumeration (K <= 8) or an exact active-set solve (see ``min_norm_simplex_with_support``),
    not Frank-Wolfe. The point is exact to ~1e-12 of ``sum_i c_i ||g_i||`` on gradient norms
    spread over 1e-6 .. 1e6 (K <= 8; 1e-3 .. 1e3 beyond).

    The minimum-norm point ``sum_i c_i g_i`` is always unique, ``c`` is not when the gradients are
    affinely dependent. Then the ``c`` of least Euclidean norm is returned (identical gradients:
    uniform weights among them; ``g`` and ``-g``: ``(1/2, 1/2)``) whenever the active set can
    certify it (a nonnegative least-norm solution on the tight set; otherwise the active set's
    minimiser). Degenerate cases: K = 1 gives ``[1]``; all gradients zero gives uniform weights;
    a zero gradient ``g_i = 0`` gives ``c = e_i`` (``d = 0``, everything is Pareto-stationary),
    uniform among several zero gradients.
    """
    return min_norm_simplex_float64(_as_gramian(M, validate))


def min_norm_simplex_float64(M: Tensor) -> Tensor:
    """:func:`min_norm_simplex` of a Gramian :func:`as_float64_gramian` returned, or of any
    rescaling D M D of one (D diagonal, nonnegative: the correlation matrix, which the conversion
    cuts, is the same), without converting it again (an eigendecomposition and ~15 ops)."""
    K = M.shape[0]
    if K == 1:
        return torch.ones(1, dtype=_F64, device=M.device)
    if K == 2:
        m11, m12, m22 = M[0, 0], M[0, 1], M[1, 1]
        # f(y) = y^2 m11 + 2 y (1 - y) m12 + (1 - y)^2 m22 for c = (y, 1 - y);
        # f'(y) = 0 at y = (m22 - m12) / (m11 - 2 m12 + m22), ||g1 - g2||^2 the denominator, and
        # 1 - y = (m11 - m12) / (the same), computed so (not as 1 - y, which loses the digits of
        # a small weight: norms 1e-3 and 1e3 give 1 - y ~ 1e-6). g1 == g2 (both zero included):
        # f is constant, y = 1/2.
        distance_sq = m11 - 2.0 * m12 + m22
        tie = distance_sq <= 4.0 * torch.finfo(_F64).eps * (m11 + m22)
        denominator = torch.where(tie, 1.0, distance_sq)
        pair = (torch.stack([m22 - m12, m11 - m12]) / denominator).clamp(0.0, 1.0)
        pair = pair / pair.sum()
        return torch.where(tie, 0.5, pair)
    zero = M.diagonal().sum() <= 0  # all gradients zero: every c is a minimiser, uniform
    safe = torch.where(zero, torch.eye(K, dtype=_F64, device=M.device), M)
    weights = min_norm_simplex_with_support(safe, least_norm=True)[0]
    return torch.where(zero, 1.0 / K, weights)


# ----------------------------------------------------------------------------------------------
# UPGrad: projections onto the dual cone


def lower_bounded_min_norm(M: Tensor, lower: Tensor, ridge: float) -> Tensor:
    """For each row l of lower [B, K]: argmin_{v >= l} v^T M v + ridge ||D (v - l)||^2
    (componentwise, D = diag(||g_j||)), batched.

    With v = l + u, u >= 0: u^T (M + ridge D^2) u + 2 u^T M l + l^T M l, an NNLS with
    Q = M + ridge D^2, p = -M l and ||b||^2 = l^T M l (A = [G^T; sqrt(ridge) D], b = [-G^T l; 0]).
    Without the ridge, sum_j v_j g_j is the projection of sum_j l_j g_j onto the dual cone
    {x : <x, g_j> >= 0 for all j} (its KKT conditions are those of the projection with
    multipliers u), but u is not unique when the g_j are linearly dependent, and the active set's
    u can be as large as 1 / sqrt(resolution) on nearly dependent gradients (an ill-conditioned
    face): then sum_j v_j g_j, combined in the gradients' dtype, cancels to noise, and which face
    is found depends on the task order. The ridge (the Gramian's resolution, see
    :func:`dual_cone_ridge`) makes u unique, permutation equivariant, invariant to scaling any
    gradient and bounded (||D u|| <= ||G^T l|| / sqrt(ridge)), at a conflict
    <g_j, p> = -ridge ||g_j||^2 u_j, i.e. at most about ridge times the gradients' scale for
    u = O(1), which is below what the Gramian resolves."""
    Ml = lower @ M
    Q = M + ridge * torch.diag(M.diagonal().clamp_min(0))
    u, _ = _nnls_gram(Q, -Ml, (Ml * lower).sum(-1), least_norm=True)
    return lower + u


def dual_cone_ridge(resolution: float) -> float:
    """The ridge of :func:`lower_bounded_min_norm` for a Gramian of this resolution: the
    resolution itself for low-precision Gramians (float32: ~1e-6 to 1e-4, well above the active
    set's decision thresholds, so it resolves ties and bounds the weights), none for float64
    (there the exact active-set answer and its least-norm tie rule are kept)."""
    return resolution if resolution > 10 * DECISION_RTOL else 0.0


def dual_cone_weights(M: Tensor, validate: bool = True) -> Tensor:
    """Weights of the projections of each gradient onto the dual cone of all of them.

    Row i is ``w_i = argmin_{v >= e_i} v^T M v`` (componentwise, ``e_i`` the i-th unit vector),
    so that ``p_i = sum_j w_ij g_j`` is the projection of ``g_i`` onto the dual cone
    ``{x : <x, g_j> >= 0 for all j}``, the step of UPGrad (Quinton & Rey, "Jacobian Descent for
    Multi-Objective Optimization", 2024). Exact small nonnegative QP (v = e_i + u, u >= 0, all K
    rows solved together by a batched Lawson-Hanson NNLS).

    Args:
        M: Gramian ``Tensor[K, K]``, symmetric PSD, any float dtype / device.
        validate: check M's finiteness (a host read; ``ValueError``).
    Returns:
        ``Tensor[K, K]`` float64 on M's device with ``w_ii >= 1`` and ``w_ij >= 0``.

    ``p_i`` is unique, ``w_i`` is not when the gradients are linearly dependent; then the one with
    the least-norm ``u = w_i - e_i`` is returned (if nonnegative; otherwise the active set's).
    Degenerate cases: a gradient already in the dual cone (no conflict; K = 1; all gradients
    zero; identical gradients) gives ``w_i = e_i``; a zero gradient gives ``w_i = e_i`` and
    ``p_i = 0``; ``g`` and ``-g`` give ``w = [[1, 1], [1, 1]]`` (``p = 0``, the dual cone is the
    hyperplane orthogonal to ``g``).
    """
    M, resolution = as_float64_gramian(M, validate)
    lower = torch.eye(M.shape[0], dtype=_F64, device=M.device)
    return lower_bounded_min_norm(M, lower, dual_cone_ridge(resolution))


def upgrad_coefficients(M: Tensor, validate: bool = True) -> Tensor:
    """UPGrad coefficients ``c = mean_i w_i`` (rows of :func:`dual_cone_weights`), so that
    ``d = sum_j c_j g_j`` is the mean of the projections of the gradients onto their dual cone
    (Quinton & Rey 2024). ``Tensor[K]`` float64 on M's device, ``c_j >= 1/K``."""
    return dual_cone_weights(M, validate).mean(0)
