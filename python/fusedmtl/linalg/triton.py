"""Triton kernel of ``jacobi_svd``: the one-sided Jacobi SVD of csrc/linalg/jacobi_math.h, the
same rounds of disjoint rotations, written over whole columns at once: one program per matrix
holds A (m x n) and V (n x n) as register tiles; in each round every column is rotated with its
round-robin partner, which it reads back through a scratch copy of the tile in global memory
(a gather by the partner's index between two barriers). Each column of a pair computes the
rotation from the same two column norms and dot product, summed in the same order, so both take
the same (c, s). The sweeps end in the program when one rotates nothing.

Registered as the torch custom ops ``fusedmtl::triton_jacobi_svd`` and ``triton_jacobi_eigh``
(the native ops' schemas) with fakes; ``COMPILE_CASES`` lists the kernel's launches for the check
that compiles them for real GPUs (tests/test_gpu_resources.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusedmtl.backend import device_guard
from fusedmtl.linalg import check_input

MAX_SWEEPS = 30  # as csrc/linalg/jacobi_math.h
_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _jacobi_svd_kernel(
    a_ptr, u_ptr, s_ptr, v_ptr, work_ptr, m, n, tol,
    M: tl.constexpr, N: tl.constexpr, MAX_SWEEPS: tl.constexpr, DTYPE: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, M)[:, None]
    vrows = tl.arange(0, N)[:, None]
    columns = tl.arange(0, N)
    a_ptr += b * m * n
    a = tl.load(a_ptr + rows * n + columns[None, :], mask=(rows < m) & (columns[None, :] < n))
    a = tl.where((rows < m) & (columns[None, :] < n), a, 0.0).to(DTYPE)
    v = (vrows == columns[None, :]).to(DTYPE)
    scratch_a = work_ptr + b * (M * N + N * N)
    scratch_v = scratch_a + M * N
    n_even = n + n % 2
    fixed = n_even - 1
    sweep = 0
    rotated = 1
    while (rotated > 0) & (sweep < MAX_SWEEPS):
        rotated = 0
        for r in range(0, fixed):
            # the round-robin partner: pairs (r + k, r - k) mod fixed, and (r, fixed)
            partner = (2 * r - columns + 2 * fixed) % fixed
            partner = tl.where(columns == r, fixed, partner)
            partner = tl.where(columns == fixed, r, partner)
            live = (columns < n) & (partner < n)
            partner = tl.where(live, partner, columns)
            tl.store(scratch_a + rows * N + columns[None, :], a)
            tl.store(scratch_v + vrows * N + columns[None, :], v)
            tl.debug_barrier()
            a_partner = tl.load(scratch_a + rows * N + partner[None, :])
            v_partner = tl.load(scratch_v + vrows * N + partner[None, :])
            tl.debug_barrier()  # every read done before the next round's store
            own = tl.sum(a * a, 0)
            other = tl.sum(a_partner * a_partner, 0)
            gamma = tl.sum(a * a_partner, 0)
            low = columns < partner
            alpha = tl.where(low, own, other)
            beta = tl.where(low, other, own)
            rotate = live & (tl.abs(gamma) > tol * tl.sqrt(alpha) * tl.sqrt(beta))
            zeta = (beta - alpha) / (2.0 * tl.where(rotate, gamma, 1.0))
            t = tl.where(zeta >= 0, 1.0, -1.0) / (tl.abs(zeta) + tl.sqrt(1.0 + zeta * zeta))
            c = 1.0 / tl.sqrt(1.0 + t * t)
            s = c * t
            c = tl.where(rotate, c, 1.0).to(DTYPE)
            # the low column p takes c a_p - s a_q, the high one q takes c a_q + s a_p
            s = tl.where(rotate, tl.where(low, -s, s), 0.0).to(DTYPE)
            # (a column left alone keeps its values: 0 * a NaN partner would spread it)
            a = tl.where(rotate[None, :], c[None, :] * a + s[None, :] * a_partner, a)
            v = tl.where(rotate[None, :], c[None, :] * v + s[None, :] * v_partner, v)
            rotated += tl.sum(rotate.to(tl.int32), 0)
        sweep += 1
    sigma = tl.sqrt(tl.sum(a * a, 0))
    # descending, ties in column order, NaN as +inf, the padding last (jacobi_math.h's
    # sorted_rank)
    key = tl.where(columns < n, tl.where(sigma == sigma, sigma, float("inf")), -1.0)
    before = (key[None, :] > key[:, None]) | (
        (key[None, :] == key[:, None]) & (columns[None, :] < columns[:, None])
    )
    rank = tl.sum(before.to(tl.int32), 1)
    rank = tl.where(columns < n, rank, 0)
    out = columns[None, :] < n
    tl.store(s_ptr + b * n + rank, sigma, mask=columns < n)
    u = a / tl.where(sigma > 0, sigma, 1.0)[None, :]
    u = tl.where(sigma[None, :] > 0, u, 0.0)
    tl.store(u_ptr + b * m * n + rows * n + rank[None, :], u, mask=(rows < m) & out)
    tl.store(v_ptr + b * n * n + vrows * n + rank[None, :], v, mask=(vrows < n) & out)


def _warps(M: int, N: int, dtype: torch.dtype) -> int:
    """Enough warps that the four register tiles (A, V and their partners' copies) fit without
    spilling: one per 256 float32 (128 float64) entries of A, a power of two from 4 to 16. ptxas
    (sm_80 / sm_90): no spill in float32; float64 64 x 64 spills 0 / 48 B, 128 x 64 20 / 252 B
    (at 4 warps 868 B and ~9 KB; 32 warps cap the registers at 64 and spill more)."""
    per_warp = 256 if dtype == torch.float32 else 128
    return min(16, max(4, triton.next_power_of_2(M * N // per_warp)))


def _padded(size: int) -> int:
    return max(triton.next_power_of_2(size), 2)


@torch.library.custom_op("fusedmtl::triton_jacobi_svd", mutates_args=())
def jacobi_svd_op(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as ``torch.ops.fusedmtl.jacobi_svd``, run by Triton (the scaling by a power
    of two, which the native kernels do in place, by torch.frexp / torch.ldexp around it)."""
    U, S, V = _svd_outputs(A)
    m, n = A.shape[-2:]
    batch = S.numel() // n
    if batch == 0:
        return U, S, V
    _, exponent = torch.frexp(A.abs().amax((-2, -1), keepdim=True))
    scaled = torch.ldexp(A, -exponent).contiguous()
    M, N = _padded(m), _padded(n)
    work = torch.empty(batch * (M * N + N * N), dtype=A.dtype, device=A.device)
    with device_guard(A.device):
        _jacobi_svd_kernel[(batch,)](
            scaled, U, S, V, work, m, n, (m**0.5) * torch.finfo(A.dtype).eps,
            M=M, N=N, MAX_SWEEPS=MAX_SWEEPS, DTYPE=_TL_DTYPES[A.dtype],
            num_warps=_warps(M, N, A.dtype),
        )  # fmt: skip
    return U, torch.ldexp(S, exponent.squeeze(-1)), V


@jacobi_svd_op.register_fake
def _(A):
    return _svd_outputs(A)


@torch.library.custom_op("fusedmtl::triton_jacobi_eigh", mutates_args=())
def jacobi_eigh_op(A: Tensor) -> tuple[Tensor, Tensor]:
    """Same contract as ``torch.ops.fusedmtl.jacobi_eigh``, by the SVD kernel: on A (from its
    lower triangle), and on A + r I (r Gershgorin's bound on -lambda_min) for the matrices whose
    eigenpairs the first does not resolve (csrc/linalg/jacobi_math.h: eigen_residual_ok), chosen
    by torch.where; the signs, the shift and the order by torch."""
    W, Q = _eigh_outputs(A)
    if W.numel() == 0:
        return W, Q
    n = A.shape[-1]
    lower = A.tril()
    A = lower + lower.tril(-1).mT
    U, S, V = jacobi_svd_op(A)
    columns = U * S[..., None, :]  # A V
    sign = torch.where((columns * V).sum(-2) < 0, -1.0, 1.0).to(A.dtype)
    residual = (columns - (sign * S)[..., None, :] * V).norm(dim=-2)
    bound = 8 * n * torch.finfo(A.dtype).eps * S[..., :1]
    resolved = ~(residual > bound).any(-1, keepdim=True)
    diagonal = A.diagonal(dim1=-2, dim2=-1)
    shift = (A.abs().sum(-1) - diagonal.abs() - diagonal).amax(-1, keepdim=True).clamp_min(0)
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    _, S_shifted, V_shifted = jacobi_svd_op(A + shift[..., None] * eye)
    eigenvalues = torch.where(resolved, sign * S, S_shifted - shift)
    vectors = torch.where(resolved[..., None], V, V_shifted)
    order = torch.sort(eigenvalues, dim=-1, stable=True)
    return order.values, vectors.gather(-1, order.indices[..., None, :].expand_as(vectors))


@jacobi_eigh_op.register_fake
def _(A):
    return _eigh_outputs(A)


def _svd_outputs(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    check_input("jacobi_svd", A)
    m, n = A.shape[-2:]
    batch = A.shape[:-2]
    return A.new_empty((*batch, m, n)), A.new_empty((*batch, n)), A.new_empty((*batch, n, n))


def _eigh_outputs(A: Tensor) -> tuple[Tensor, Tensor]:
    check_input("jacobi_eigh", A)
    n = A.shape[-1]
    return A.new_empty((*A.shape[:-2], n)), A.new_empty((*A.shape[:-2], n, n))


def _compile_cases():
    """(kernel, signature, constexprs) of every launch shape class: each dtype, the padded sizes
    of square matrices up to 64 and of the (K + 1) x K systems of the solvers."""
    names = {torch.float32: "fp32", torch.float64: "fp64"}
    cases = []
    for dtype, tl_dtype in _TL_DTYPES.items():
        signature = {
            "a_ptr": f"*{names[dtype]}", "u_ptr": f"*{names[dtype]}",
            "s_ptr": f"*{names[dtype]}", "v_ptr": f"*{names[dtype]}",
            "work_ptr": f"*{names[dtype]}", "m": "i32", "n": "i32", "tol": names[dtype],
        }  # fmt: skip
        for m, n in ((4, 4), (16, 16), (64, 64), (65, 64), (128, 64)):
            constexprs = {"M": _padded(m), "N": _padded(n), "MAX_SWEEPS": MAX_SWEEPS}
            options = {"num_warps": _warps(constexprs["M"], constexprs["N"], dtype)}
            cases.append(
                (_jacobi_svd_kernel, signature, {**constexprs, "DTYPE": tl_dtype}, options)
            )
    return cases


COMPILE_CASES = _compile_cases()
