"""Small dense linear algebra without a host sync, for the weighting solvers' K x K matrices.

``torch.linalg.eigh``, ``svd`` and ``pinv`` read LAPACK's error code on the host: on CUDA each
call stalls the stream until the device catches up, so a training step that calls one can neither
run ahead of the GPU nor be captured in a CUDA graph. The functions here take the same arguments
and give the same results to rounding, computed by a one-sided Jacobi SVD (the op
``fusedmtl::jacobi_svd``: one CUDA block per matrix, the sweeps ending on the device) for batches of
matrices of at most 128 x 64 (larger ones go to torch.linalg, which syncs):

- :func:`jacobi_svd`: ``A = U diag(S) V^T``.
- :func:`eigh`: a symmetric matrix's eigenvalues (ascending) and eigenvectors (the op
  ``fusedmtl::jacobi_eigh``: the same sweeps on ``A + r I`` with ``r >= -lambda_min``, positive
  semi-definite, so that its SVD is its eigendecomposition).
- :func:`pinv`: the pseudo-inverse, singular values at most ``rtol`` times the largest dropped.

Backends as everywhere in fusedmtl (:mod:`fusedmtl.backend`): native (C++ / CUDA), Triton, and the
reference, which is torch.linalg itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl import backend

MAX_ROWS = 128
MAX_COLUMNS = 64
DTYPES = (torch.float32, torch.float64)

if backend._C is not None:
    from fusedmtl.linalg import native as _native  # noqa: F401  (fake registration)


def jacobi_svd(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD ``A = U diag(S) V^T`` of ``A: Tensor[..., m, n]``, ``n <= m <= 128``,
    ``n <= 64``, float32 or float64, by one-sided Jacobi (Demmel & Veselic 1992).

    Returns ``U: Tensor[..., m, n]``, ``S: Tensor[..., n]`` (descending), ``V: Tensor[..., n, n]``
    (V itself, where ``torch.linalg.svd`` returns ``V^T``). The column of U of a zero singular
    value is 0 (``torch.linalg.svd`` completes U to an orthonormal basis instead). No host sync on
    any device; non-finite entries give non-finite results (which ones depends on the backend;
    the reference raises torch's error). Accuracy: each S_k to ``~n eps S_1`` (to ``~n eps S_k``
    for a well-conditioned A up to column scaling, Demmel & Veselic), down to ``S_1 2^-500``
    (float64; ``2^-60`` float32): below that the squared column norms leave the normal range.
    ``RuntimeError`` for other dtypes or shapes, and for an A that requires grad (no autograd
    formula)."""
    _refuse_grad(A)
    chosen = backend.select(A.device)
    if chosen == "native":
        return torch.ops.fusedmtl.jacobi_svd(A)
    if chosen == "triton":
        return _triton().jacobi_svd_op(A)
    check_input("jacobi_svd", A)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return U * (S > 0)[..., None, :], S, Vh.mT


def eigh(A: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending, ``Tensor[..., n]``) and eigenvectors (columns, ``Tensor[..., n,
    n]``) of the symmetric ``A: Tensor[..., n, n]`` (its lower triangle, as ``torch.linalg.eigh``),
    float32 or float64 (``n > 64``, other dtypes: ``torch.linalg.eigh``, which syncs).

    The op ``fusedmtl::jacobi_eigh``: the sweeps of :func:`jacobi_svd` on A itself, whose SVD
    is its eigendecomposition when A is semi-definite (eigenvalues to relative accuracy: a
    Gramian's noise eigenvalues stay at ~eps of the largest), ``lambda_j = +-S_j`` by the sign of
    ``<A v_j, v_j>``, taken when every residual ``|A v_j - lambda_j v_j|`` is within ``8 n eps
    S_1``; otherwise (eigenvalues of opposite signs and close magnitudes) the sweeps on ``A + r
    I``, ``r = max(0, max_i sum_{j != i} |a_ij| - a_ii) >= -lambda_min`` (Gershgorin), positive
    semi-definite, ``lambda = S - r`` to ``~n eps (lambda_max + r)`` (LAPACK's eigh: ``~n eps
    ||A||``). The choice is made on the device: no host sync."""
    _refuse_grad(A)
    if A.dim() < 2 or A.shape[-1] != A.shape[-2] or not _jacobi_fits(A, *A.shape[-2:]):
        return torch.linalg.eigh(A)
    if backend.select(A.device) == "native":
        return torch.ops.fusedmtl.jacobi_eigh(A)
    return _triton().jacobi_eigh_op(A)


def pinv(A: Tensor, rtol: float | None = None) -> Tensor:
    """The pseudo-inverse ``Tensor[..., n, m]`` of ``A: Tensor[..., m, n]`` (through
    :func:`jacobi_svd` for ``min(m, n) <= 64``, ``max(m, n) <= 128``, float32 or float64; otherwise
    ``torch.linalg.pinv``, which syncs), as ``torch.linalg.pinv(A, rtol=rtol)``: singular
    values at most ``rtol`` times the largest are treated as 0 (``rtol`` None: ``max(m, n)`` eps).
    No host sync."""
    _refuse_grad(A)
    if A.dim() < 2:
        return torch.linalg.pinv(A, rtol=rtol)  # (its error)
    m, n = A.shape[-2:]
    if rtol is None:
        rtol = max(m, n) * torch.finfo(A.dtype).eps
    if not _jacobi_fits(A, max(m, n), min(m, n)):
        return torch.linalg.pinv(A, rtol=rtol)
    if m < n:
        return pinv(A.mT, rtol).mT
    U, S, V = jacobi_svd(A)
    kept = S > rtol * S[..., :1]
    inverse = torch.where(kept, 1.0 / torch.where(kept, S, 1.0), 0.0)
    return (V * inverse[..., None, :]) @ U.mT


def check_input(op: str, A: Tensor) -> None:
    """The native ops' checks (csrc/linalg/linalg_checks.cpp), for the other backends; ``op``:
    'jacobi_svd' or 'jacobi_eigh'."""
    name, shape = f"fusedmtl.linalg.{op}", list(A.shape)
    if A.dim() < 2:
        raise RuntimeError(f"{name}: expected A of shape [..., m, n], got {shape}")
    if A.dtype not in DTYPES:
        raise RuntimeError(f"{name}: expected float32 or float64, got {A.dtype}")
    m, n = A.shape[-2:]
    if op == "jacobi_eigh":
        if m != n or n == 0:
            raise RuntimeError(f"{name}: expected a square A of shape [..., n, n], got {shape}")
        if n > MAX_COLUMNS:
            raise RuntimeError(
                f"{name}: at most {MAX_COLUMNS} rows and columns (a small-matrix kernel), got "
                f"{shape}"
            )
        return
    if not 1 <= n <= m:
        raise RuntimeError(f"{name}: expected 1 <= n <= m for A of shape [..., m, n], got {shape}")
    if n > MAX_COLUMNS or m > MAX_ROWS:
        raise RuntimeError(
            f"{name}: at most {MAX_ROWS} rows and {MAX_COLUMNS} columns (a small-matrix kernel), "
            f"got {shape}"
        )


def _refuse_grad(A: Tensor) -> None:
    if A.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "fusedmtl.linalg: jacobi_svd, eigh and pinv are not differentiable (no autograd "
            "formula): pass A.detach(), or call them under torch.no_grad()"
        )


def _jacobi_fits(A: Tensor, m: int, n: int) -> bool:
    """Whether eigh and pinv run through jacobi_svd: on the native and Triton backends, for
    float32 and float64 matrices within its limits (the shapes only: no value is read)."""
    if backend.select(A.device) == "reference" or A.dtype not in DTYPES:
        return False
    return 1 <= n <= m and n <= MAX_COLUMNS and m <= MAX_ROWS


def _triton():
    from fusedmtl.linalg import triton as triton_kernels

    return triton_kernels
