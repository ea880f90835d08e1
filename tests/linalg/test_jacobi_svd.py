"""fusedmtl.linalg: jacobi_svd, eigh and pinv on every backend and device, against torch.linalg in
float64 on the float64 copy of the input (the oracle), on random and degenerate matrices.

The precision contract: one-sided Jacobi is backward stable, so every error is bounded by
``K(n) = 4 (n + 2) eps`` (eps of the input's dtype) times the matrix's scale: its spectral norm for
the SVD and pinv, its largest absolute row sum (the shift eigh adds, >= the spectral norm) for
eigh; the pseudo-inverse's error also carries its condition (||A|| ||A^+||^2).

The Triton backend gets the matrices of at most 16 columns and one 64-column case (two on CUDA):
on the CPU it runs in the interpreter (seconds per 64-column matrix), on a GPU each padded shape
and dtype is a compilation, in gpu-check's few minutes.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import fusedmtl
import fusedmtl.linalg as L
from tests.helpers import BACKEND_DEVICES, assert_bitwise, dtype_id, skip_without_a_gpu

F32, F64 = torch.float32, torch.float64
SHAPES = [
    (1, 1),
    (2, 2),
    (3, 1),
    (4, 4),
    (5, 4),
    (7, 7),
    (9, 8),
    (16, 16),
    (33, 32),
    (64, 64),
    (65, 64),
    (128, 64),
]
BATCHES = {(4, 4): (3,), (5, 4): (2, 2), (9, 8): (3,), (33, 32): (2,)}
TRITON_COLUMNS = 16  # the widest matrices the Triton backend gets (plus TRITON_WIDE)


# torch.linalg (the reference backend: MKL's LAPACK here) is held to 8 times the bound: its gesdd
# rebuilds a 5 x 4 float64 matrix to 32 eps ||A|| (numpy's svd too), 1.3 K(4).
REFERENCE_SLACK = 8


def factor(n: int, dtype: torch.dtype) -> float:
    """K(n): the bound of every error, relative to the matrix's scale (REFERENCE_SLACK times it
    under the reference backend)."""
    slack = REFERENCE_SLACK if fusedmtl.backend.current() == "reference" else 1
    return 4 * (n + 2) * torch.finfo(dtype).eps * slack


def assert_within(error: torch.Tensor, bound, what: str) -> None:
    """error <= bound element-wise (bound broadcast; a zero bound asks for an exact 0)."""
    __tracebackhide__ = True
    error = error.double()
    bound = torch.as_tensor(bound, dtype=F64, device=error.device)
    error, bound = torch.broadcast_tensors(error, bound)
    assert torch.isfinite(error).all(), f"{what}: not finite: {error}"
    over = error > bound
    if over.any():
        ratio = torch.where(bound > 0, error / bound, torch.where(over, torch.inf, 0.0))
        worst = int(ratio.reshape(-1).argmax())
        raise AssertionError(
            f"{what}: {int(over.sum())} of {error.numel()} over the bound; worst "
            f"{error.reshape(-1)[worst].item():.3e} vs {bound.reshape(-1)[worst].item():.3e} "
            f"({ratio.reshape(-1)[worst].item():.3g} times)"
        )


def spectral_norm(A: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(A.double(), 2)


# --------------------------------------------------------------------------------------------
# Samples


@dataclass(frozen=True)
class Sample:
    """A matrix (or batch) of one kind: random, rank (rank-deficient: G G^T of rank r < n when
    square, G H^T otherwise), zero, identical (every column the same), opposite (columns x, -x,
    x, ...), spread (a diagonal over 1e-150 .. 1e150, float64), identity."""

    kind: str
    m: int
    n: int
    dtype: torch.dtype
    batch: tuple[int, ...] = ()

    @property
    def id(self) -> str:
        shape = "x".join(str(s) for s in (*self.batch, self.m, self.n))
        return f"{self.kind}-{shape}-{dtype_id(self.dtype)}"

    @property
    def rank(self) -> int:
        return max(1, self.n // 3)

    def make(self, device: str = "cpu", seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        m, n, batch = self.m, self.n, self.batch

        def randn(*shape):
            return torch.randn(*batch, *shape, generator=g, dtype=F64)

        if self.kind == "random":
            A = randn(m, n)
        elif self.kind == "rank":
            G = randn(m, self.rank)
            A = G @ (G if m == n else randn(n, self.rank)).mT
        elif self.kind == "zero":
            A = torch.zeros(*batch, m, n, dtype=F64)
        elif self.kind == "identical":
            A = randn(m, 1).expand(*batch, m, n)
        elif self.kind == "opposite":
            signs = torch.tensor([(-1.0) ** j for j in range(n)], dtype=F64)
            A = randn(m, 1) * signs
        elif self.kind == "spread":
            exponents = torch.linspace(-150, 150, n, dtype=F64)[torch.randperm(n, generator=g)]
            signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(F64)
            A = torch.zeros(*batch, m, n, dtype=F64)
            A[..., :n, :] = torch.diag(signs * 10.0**exponents)
        elif self.kind == "identity":
            A = torch.eye(m, n, dtype=F64).expand(*batch, m, n)
        else:
            raise ValueError(self.kind)
        return A.to(device=device, dtype=self.dtype).contiguous()


def _svd_samples() -> list[Sample]:
    out = [
        Sample("random", m, n, dtype, BATCHES.get((m, n), ()))
        for m, n in SHAPES
        for dtype in (F32, F64)
    ]
    degenerate = {
        "rank": [(4, 4), (7, 7), (9, 8), (16, 16), (64, 64), (128, 64)],
        "zero": [(1, 1), (5, 4), (16, 16), (65, 64)],
        "identical": [(2, 2), (9, 8), (16, 16), (64, 64)],
        "opposite": [(4, 4), (5, 4), (16, 16), (33, 32)],
        "identity": [(1, 1), (4, 4), (16, 16), (64, 64)],
    }
    for kind, shapes in degenerate.items():
        for m, n in shapes:
            for dtype in (F32, F64):
                out.append(Sample(kind, m, n, dtype, (2,) if (m, n) == (4, 4) else ()))
    out += [Sample("spread", m, n, F64) for m, n in [(2, 2), (7, 7), (9, 8), (16, 16), (64, 64)]]
    return out


SVD_SAMPLES = _svd_samples()
# The Triton backend's 64-column cases on each device (the largest tile on CUDA: 128 x 64 float64)
TRITON_WIDE = {"cpu": (Sample("random", 65, 64, F32),)}
TRITON_WIDE["cuda"] = TRITON_WIDE["cpu"] + (Sample("random", 128, 64, F64),)


def _runs(backend: str, device: str, columns: int, sample=None) -> bool:
    """Whether a case of that many columns runs on the backend and device (the Triton backend
    only up to TRITON_COLUMNS, and its TRITON_WIDE samples)."""
    if backend != "triton" or columns <= TRITON_COLUMNS:
        return True
    return sample in TRITON_WIDE[torch.device(device).type]


def backend_device_samples(samples):
    """(backend, device, sample) for every backend and device of BACKEND_DEVICES that runs it."""
    return [
        pytest.param(b, d, s, id=f"{b}-{d}-{s.id}")
        for b, d in BACKEND_DEVICES
        for s in samples
        if _runs(b, d, s.n, s)
    ]


# --------------------------------------------------------------------------------------------
# jacobi_svd


def check_svd(A, U, S, V, what=""):
    """The SVD contract on A [..., m, n]: shapes, dtypes and devices; S against svdvals of the
    float64 copy, non-negative and descending; U diag(S) V^T = A; V orthogonal; U's columns
    orthonormal where S is above the error bound of S, exactly 0 where S == 0."""
    __tracebackhide__ = True
    m, n = A.shape[-2:]
    batch = A.shape[:-2]
    for name, t, shape in (("U", U, (m, n)), ("S", S, (n,)), ("V", V, (n, n))):
        assert t.shape == (*batch, *shape), f"{what} {name}: shape {tuple(t.shape)}"
        assert t.dtype == A.dtype and t.device == A.device, f"{what} {name}: {t.dtype} {t.device}"
    k = factor(n, A.dtype)
    A64 = A.double()
    S64 = torch.linalg.svdvals(A64)
    norm = S64[..., :1]  # ||A||_2 of each matrix, [..., 1]
    U64, S_, V64 = U.double(), S.double(), V.double()
    assert (S >= 0).all(), f"{what}: negative singular values {S}"
    assert (S[..., :-1] >= S[..., 1:]).all(), f"{what}: S not descending: {S}"
    assert_within((S_ - S64).abs(), k * norm, f"{what} S vs svdvals")
    rebuilt = (U64 * S_[..., None, :]) @ V64.mT
    assert_within(spectral_norm(rebuilt - A64), k * norm[..., 0], f"{what} U diag(S) V^T - A")
    eye = torch.eye(n, dtype=F64, device=A.device)
    assert_within(spectral_norm(V64.mT @ V64 - eye), k, f"{what} V^T V - I")
    zero = (S == 0)[..., None, :].expand_as(U)
    assert (U[zero] == 0).all(), f"{what}: U's column of a zero singular value is not 0"
    kept = S_ > k * norm  # distinguishable from 0
    pairs = kept[..., :, None] & kept[..., None, :]
    gram = U64.mT @ U64 - eye
    assert_within(gram[pairs].abs(), k, f"{what} U^T U - I (columns of S > K(n) ||A||)")


@pytest.mark.parametrize(
    "backend, device, sample",
    backend_device_samples(SVD_SAMPLES),
    indirect=["backend", "device"],
)
def test_jacobi_svd(backend, device, sample):
    A = sample.make(device)
    U, S, V = L.jacobi_svd(A)
    check_svd(A, U, S, V, sample.id)
    if sample.kind in ("zero", "identical", "opposite", "identity", "rank"):
        # the rank is exact: the singular values beyond it are at the rounding level
        rank = {"zero": 0, "identical": 1, "opposite": 1, "identity": sample.n}.get(
            sample.kind, sample.rank
        )
        k = factor(sample.n, sample.dtype)
        norm = spectral_norm(A)[..., None]
        assert (S[..., :rank].double() > k * norm).all(), S
        assert_within(S[..., rank:].double(), k * norm, f"{sample.id} S beyond the rank")
    if sample.kind == "zero":
        assert (S == 0).all() and (U == 0).all()


@pytest.mark.parametrize(
    "backend, device, n",
    [pytest.param(b, d, n, id=f"{b}-{d}-{n}") for b, d in BACKEND_DEVICES for n in (7, 16)],
    indirect=["backend", "device"],
)
def test_jacobi_svd_of_a_spread_diagonal_keeps_the_relative_accuracy(backend, device, n):
    """The power-of-two scaling of the wrapper puts the largest entry in [0.5, 1): every
    singular value whose square stays a normal number after it (>= s_max 2^-500, here 1e150 ..
    1e-10) comes back to K(n) of itself, not only of s_max (without the scaling, 1e150 squared
    overflows). The smaller ones are held to the absolute bound only (check_svd)."""
    A = Sample("spread", n, n, F64).make(device)
    U, S, V = L.jacobi_svd(A)
    exact = A.diagonal().abs().sort(descending=True).values
    k = factor(n, F64)
    normal = exact >= exact[0] * 2.0**-500
    assert normal.sum() >= n // 2
    assert_within((S - exact).abs()[normal], k * exact[normal], "relative S of the diagonal")


@pytest.mark.parametrize(
    "backend, device, batch",
    [pytest.param(b, d, s, id=f"{b}-{d}-{s}") for b, d in BACKEND_DEVICES for s in ((0,), (2, 0))],
    indirect=["backend", "device"],
)
def test_jacobi_svd_of_an_empty_batch_is_empty(backend, device, batch):
    A = torch.zeros(*batch, 5, 3, device=device)
    U, S, V = L.jacobi_svd(A)
    assert U.shape == (*batch, 5, 3) and S.shape == (*batch, 3) and V.shape == (*batch, 3, 3)


def test_jacobi_svd_of_a_strided_view_is_that_of_its_contiguous_copy(backend, device):
    B = torch.randn(2, 6, 9, dtype=F64, device=device)
    view = B.mT  # [2, 9, 6], not contiguous
    for name, got, want in zip("USV", L.jacobi_svd(view), L.jacobi_svd(view.contiguous())):
        assert_bitwise(got, want, f"{name} of a transposed view")


BAD_INPUTS = {
    "int64": lambda: torch.ones(4, 4, dtype=torch.int64),
    "int32": lambda: torch.ones(2, 4, 4, dtype=torch.int32),
    "float16": lambda: torch.ones(4, 4, dtype=torch.float16),
    "1-D": lambda: torch.ones(4),
    "n>m": lambda: torch.ones(3, 5),
    "n>64": lambda: torch.ones(65, 65),
    "m>128": lambda: torch.ones(129, 4),
    "n=0": lambda: torch.ones(3, 0),
    "batch-n=0": lambda: torch.ones(2, 3, 0),
}


@pytest.mark.parametrize("bad", list(BAD_INPUTS))
def test_jacobi_svd_rejects_bad_inputs(backend, device, bad):
    A = BAD_INPUTS[bad]().to(device)
    with pytest.raises(RuntimeError, match="fusedmtl.linalg.jacobi_svd"):
        L.jacobi_svd(A)


BAD_EIGH_INPUTS = {
    "int64": lambda: torch.ones(4, 4, dtype=torch.int64),
    "float16": lambda: torch.ones(4, 4, dtype=torch.float16),
    "1-D": lambda: torch.ones(4),
    "not square": lambda: torch.ones(5, 4),
    "n>64": lambda: torch.ones(65, 65),
    "n=0": lambda: torch.ones(2, 0, 0),
}


@pytest.mark.parametrize("bad", list(BAD_EIGH_INPUTS))
def test_jacobi_eigh_op_rejects_bad_inputs(backend, device, bad):
    """The op itself (fusedmtl.linalg.eigh hands these to torch.linalg.eigh instead)."""
    skip_without_a_gpu(device)
    if backend == "reference":
        pytest.skip("the reference backend has no jacobi_eigh op: eigh is torch.linalg.eigh")
    A = BAD_EIGH_INPUTS[bad]().to(device)
    if backend == "triton":
        from fusedmtl.linalg import triton as triton_linalg

        op = triton_linalg.jacobi_eigh_op
    else:
        op = torch.ops.fusedmtl.jacobi_eigh
    with pytest.raises(RuntimeError, match="fusedmtl.linalg.jacobi_eigh"):
        op(A)


@pytest.mark.parametrize("fn", ["jacobi_svd", "eigh", "pinv"])
def test_a_tensor_that_requires_grad_is_refused(backend, device, fn):
    """Not differentiable on any backend (no autograd formula): a clear error rather than
    outputs that look differentiable and a backward that leaves A.grad None."""
    A = torch.eye(3, device=device, dtype=F64, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        getattr(L, fn)(A)
    w, _ = L.eigh(A.detach())
    with torch.no_grad():
        assert torch.equal(L.eigh(A)[0], w)


@pytest.mark.parametrize("dtype", [F32, F64], ids=dtype_id)
def test_native_cpu_op_is_bitwise_independent_of_the_thread_count(dtype, restore_num_threads):
    """Each matrix on one thread: 1 and 2 threads give the same bits, and so does each matrix of
    the batch alone."""
    A = torch.randn(16, 33, 32, dtype=dtype)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(torch.ops.fusedmtl.jacobi_svd(A))
    for name, one, two in zip("USV", *results):
        assert_bitwise(two, one, f"{name}: 2 threads vs 1")
    for b in (0, 9):
        for name, alone, batched in zip("USV", torch.ops.fusedmtl.jacobi_svd(A[b]), results[0]):
            assert_bitwise(alone, batched[b], f"{name}: matrix {b} alone vs in the batch")


# --------------------------------------------------------------------------------------------
# eigh


def _symmetric(kind: str, n: int, dtype, batch=(), device="cpu", seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "indefinite":
        G = torch.randn(*batch, n, n, generator=g, dtype=F64)
        A = (G + G.mT) / 2
    elif kind == "psd-rank":
        G = torch.randn(*batch, n, max(1, n // 3), generator=g, dtype=F64)
        A = G @ G.mT
    elif kind == "identity":
        A = torch.eye(n, dtype=F64).expand(*batch, n, n)
    elif kind == "zero":
        A = torch.zeros(*batch, n, n, dtype=F64)
    else:
        raise ValueError(kind)
    return A.to(device=device, dtype=dtype).contiguous()


EIGH_CASES = (
    [("indefinite", n, d, (3,) if n == 4 else ()) for n in (1, 2, 4, 9, 16, 64) for d in (F32, F64)]
    + [("psd-rank", n, d, ()) for n in (4, 16, 64) for d in (F32, F64)]
    + [("identity", n, d, ()) for n in (1, 9, 64) for d in (F32, F64)]
    + [("zero", n, d, (2,) if n == 4 else ()) for n in (4, 16) for d in (F32, F64)]
)


def _eigh_params():
    out = []
    for b, d in BACKEND_DEVICES:
        for kind, n, dtype, batch in EIGH_CASES:
            if not _runs(b, d, n):
                continue
            shape = "x".join(str(s) for s in (*batch, n, n))
            out.append(pytest.param(b, d, kind, n, dtype, batch, id=f"{b}-{d}-{kind}-{shape}-"
                                    f"{dtype_id(dtype)}"))  # fmt: skip
    return out


def check_eigh(A, w, V, what=""):
    """Ascending eigenvalues against torch.linalg.eigh's (float64), the residual A V - V diag(w)
    and V^T V - I, each within K(n) of the scale (the largest absolute row sum)."""
    __tracebackhide__ = True
    n = A.shape[-1]
    assert w.shape == A.shape[:-1] and V.shape == A.shape, (w.shape, V.shape)
    assert w.dtype == V.dtype == A.dtype and w.device == V.device == A.device
    A64 = A.double()
    k = factor(n, A.dtype)
    scale = A64.abs().sum(-1).amax(-1, keepdim=True)  # [..., 1]
    assert (w[..., :-1] <= w[..., 1:]).all(), f"{what}: eigenvalues not ascending: {w}"
    expected = torch.linalg.eigh(A64).eigenvalues
    w64, V64 = w.double(), V.double()
    assert_within((w64 - expected).abs(), k * scale, f"{what} eigenvalues")
    residual = A64 @ V64 - V64 * w64[..., None, :]
    assert_within(spectral_norm(residual), k * scale[..., 0], f"{what} A V - V diag(w)")
    eye = torch.eye(n, dtype=F64, device=A.device)
    assert_within(spectral_norm(V64.mT @ V64 - eye), k, f"{what} V^T V - I")


@pytest.mark.parametrize(
    "backend, device, kind, n, dtype, batch", _eigh_params(), indirect=["backend", "device"]
)
def test_eigh(backend, device, kind, n, dtype, batch):
    A = _symmetric(kind, n, dtype, batch, device)
    w, V = L.eigh(A)
    check_eigh(A, w, V, f"{kind} n={n}")
    if kind == "psd-rank":  # the zero eigenvalues stay at the rounding level
        k = factor(n, dtype)
        scale = A.double().abs().sum(-1).amax(-1, keepdim=True)
        assert_within(w[..., : n - max(1, n // 3)].double().abs(), k * scale, "null eigenvalues")
    if kind in ("identity", "zero"):
        assert_within((w.double() - float(kind == "identity")).abs(), factor(n, dtype), kind)


@pytest.mark.parametrize("dtype", [F32, F64], ids=dtype_id)
def test_eigh_reads_only_the_lower_triangle(backend, device, dtype):
    A = _symmetric("indefinite", 9, dtype, (2,), device)
    garbage = torch.randn(2, 9, 9, dtype=F64).to(device, dtype) * 1e3
    mixed = A.tril() + garbage.triu(1)
    w, V = L.eigh(A)
    w_mixed, V_mixed = L.eigh(mixed)
    assert_bitwise(w_mixed, w, "eigenvalues with garbage above the diagonal")
    assert_bitwise(V_mixed, V, "eigenvectors with garbage above the diagonal")
    check_eigh(A, w_mixed, V_mixed, "lower triangle")


# --------------------------------------------------------------------------------------------
# pinv


def _with_singular_values(m, n, s, dtype, device="cpu", seed=0):
    """Q1 diag(s) Q2^T (m x n) with orthonormal Q1 [m, r], Q2 [n, r] (r = len(s)), in float64 then
    cast; returns the matrix and Q1, Q2 in float64."""
    g = torch.Generator().manual_seed(seed)
    r = len(s)
    Q1 = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=F64)).Q
    Q2 = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=F64)).Q
    A = Q1 @ torch.diag(torch.tensor(s, dtype=F64)) @ Q2.mT
    return A.to(device=device, dtype=dtype), Q1.to(device), Q2.to(device)


def check_pinv(A, X, rtol, what=""):
    """X = pinv(A) against torch.linalg.pinv of the float64 copy (same rtol), within
    K ||A|| ||A^+||^2 (the perturbation bound of the pseudo-inverse at a gap), and the four
    Moore-Penrose conditions of X and A_r (A without the singular values at most rtol s_max, of
    which X is the pseudo-inverse) within K kappa of their scale."""
    __tracebackhide__ = True
    m, n = A.shape[-2:]
    assert X.shape == (*A.shape[:-2], n, m) and X.dtype == A.dtype and X.device == A.device
    A64, X64 = A.double(), X.double()
    k = factor(min(m, n), A.dtype)
    U, s, Vh = torch.linalg.svd(A64, full_matrices=False)
    expected = torch.linalg.pinv(A64, rtol=rtol)
    kept = s > rtol * s[..., :1]
    A64 = (U * torch.where(kept, s, 0)[..., None, :]) @ Vh  # A_r
    norm = s[..., 0]
    inverse_norm = torch.where(kept, 1 / s, 0).amax(-1)  # ||A^+||
    kappa = norm * inverse_norm
    assert_within(spectral_norm(X64 - expected), k * norm * inverse_norm**2, f"{what} vs pinv")
    for name, lhs, rhs, scale in (
        ("A X A = A", A64 @ X64 @ A64, A64, norm),
        ("X A X = X", X64 @ A64 @ X64, X64, inverse_norm),
        ("(A X)^T = A X", (A64 @ X64).mT, A64 @ X64, 1),
        ("(X A)^T = X A", (X64 @ A64).mT, X64 @ A64, 1),
    ):
        assert_within(spectral_norm(lhs - rhs), k * kappa * scale, f"{what} {name}")


PINV_FULL = [(1, 1), (4, 4), (9, 8), (8, 9), (5, 16), (16, 16), (33, 7), (65, 64), (64, 128)]


def _pinv_params(shapes):
    return [
        pytest.param(b, d, shape, dtype, id=f"{b}-{d}-{shape[0]}x{shape[1]}-{dtype_id(dtype)}")
        for b, d in BACKEND_DEVICES
        for shape in shapes
        for dtype in (F32, F64)
        if _runs(b, d, min(shape))
    ]


@pytest.mark.parametrize(
    "backend, device, shape, dtype", _pinv_params(PINV_FULL), indirect=["backend", "device"]
)
def test_pinv_of_a_full_rank_matrix(backend, device, shape, dtype):
    m, n = shape
    batch = (3,) if shape == (4, 4) else ()
    A = torch.randn(*batch, m, n, dtype=F64).to(device, dtype)
    X = L.pinv(A)
    check_pinv(A, X, max(m, n) * torch.finfo(dtype).eps, f"{m}x{n}")
    if m == n:  # the inverse
        eye = torch.eye(n, dtype=F64, device=device)
        k = factor(n, dtype)
        kappa = torch.linalg.cond(A.double())
        assert_within(spectral_norm(X.double() @ A.double() - eye), k * kappa, "X A - I")


@pytest.mark.parametrize("shape", [(5, 3), (3, 5)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_pinv_of_a_zero_matrix_is_zero_and_leaves_its_batch_alone(backend, device, shape):
    """s_max = 0 drops every singular value (as torch.linalg.pinv); the other matrix of the
    batch is inverted as alone."""
    A = torch.randn(2, *shape, dtype=F64, device=device)
    A[0] = 0
    X = L.pinv(A)
    assert X.shape == (2, shape[1], shape[0])
    assert (X[0] == 0).all()
    check_pinv(A[1], X[1], max(shape) * torch.finfo(F64).eps, "beside a zero matrix")


@pytest.mark.parametrize(
    "backend, device, shape, dtype",
    _pinv_params([(6, 6), (9, 8), (5, 12), (16, 16), (40, 33)]),
    indirect=["backend", "device"],
)
def test_pinv_of_a_rank_deficient_matrix_with_a_gap(backend, device, shape, dtype):
    """Rank r = min(m, n) // 2, singular values 1 .. 0.1, then the rounding level: rtol 1e-3
    sits in the gap."""
    m, n = shape
    r = min(m, n) // 2
    A, Q1, Q2 = _with_singular_values(m, n, torch.linspace(1, 0.1, r).tolist(), dtype, device)
    X = L.pinv(A, rtol=1e-3)
    check_pinv(A, X, 1e-3, f"rank {r} of {m}x{n}")
    # nothing of the null space: X maps the complement of Q1 to 0, its rows lie in span(Q2)
    k = factor(min(m, n), dtype)
    X64 = X.double()
    off_range = X64 - X64 @ Q1 @ Q1.mT
    assert_within(spectral_norm(off_range), k * 100, "X (I - Q1 Q1^T)")
    off_rows = X64 - Q2 @ Q2.mT @ X64
    assert_within(spectral_norm(off_rows), k * 100, "(I - Q2 Q2^T) X")


@pytest.mark.parametrize("dtype", [F32, F64], ids=dtype_id)
@pytest.mark.parametrize("shape", [(6, 4), (4, 6)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_pinv_cuts_at_rtol_times_the_largest_singular_value(backend, device, shape, dtype):
    """Singular values 1, 0.5, rtol (1 + 5%) and rtol (1 - 5%): the third is inverted, the fourth
    dropped (5% of rtol is 17 times K(n) in float32)."""
    m, n = shape
    rtol = 1e-3
    s = [1.0, 0.5, rtol * 1.05, rtol * 0.95]
    A, Q1, Q2 = _with_singular_values(m, n, s, dtype, device)
    X = L.pinv(A, rtol=rtol)
    check_pinv(A, X, rtol, f"cut {m}x{n}")
    kept = torch.tensor([1 / v for v in s[:3]] + [0.0], dtype=F64, device=device)
    expected = Q2 * kept @ Q1.mT
    k = factor(min(m, n), dtype)
    assert_within(spectral_norm(X.double() - expected), k / (rtol * 1.05) ** 2, "vs Q2 S^+ Q1^T")
    # and the decision itself: X maps the dropped direction to (nearly) 0, the kept one to v / s
    small = X.double() @ Q1[:, 2:]
    assert_within((small[:, 0] - Q2[:, 2] * kept[2]).norm(), 0.01 * kept[2], "kept direction")
    assert_within(small[:, 1].norm(), 0.01 * kept[2], "dropped direction")


# --------------------------------------------------------------------------------------------
# opcheck and torch.compile


OPCHECK_INPUTS = {
    "native": [((4, 4), F32), ((2, 9, 8), F64)],
    "triton": [((3, 3), F32), ((2, 5, 4), F64)],
}
OPCHECK = [
    pytest.param(b, d, shape, dtype, id=f"{b}-{d}-{'x'.join(map(str, shape))}-{dtype_id(dtype)}")
    for b, d in BACKEND_DEVICES
    for shape, dtype in OPCHECK_INPUTS.get(b, ())
]


@pytest.mark.parametrize("op_backend, device, shape, dtype", OPCHECK)
@pytest.mark.parametrize("name", ["jacobi_svd", "jacobi_eigh"])
def test_opcheck(name, op_backend, device, shape, dtype):
    """The native ops and (where the Triton backend runs) the Triton ops: schema, fake kernel,
    dynamic-shape AOT dispatch."""
    skip_without_a_gpu(device)
    if name == "jacobi_eigh":
        shape = (*shape[:-1], shape[-2])  # square
    if op_backend == "triton":
        from fusedmtl.linalg import triton as triton_linalg

        op = getattr(triton_linalg, f"{name}_op")
    else:
        op = getattr(torch.ops.fusedmtl, name).default
    torch.library.opcheck(op, (torch.randn(shape, dtype=dtype, device=device),))


@pytest.mark.compile
@pytest.mark.parametrize("compiler", ["inductor", "aot_eager"])
def test_torch_compile_fullgraph_of_eigh_and_pinv_matches_eager(compiler):
    """On the native backend: the op's fake kernel lets dynamo capture eigh and pinv whole.
    aot_eager runs the captured graph as traced (the same bits as eager); inductor may reorder
    the shift's row sums (to K(n) of the scale)."""
    torch._dynamo.reset()
    try:

        def fn(A, B):
            w, V = L.eigh(A)
            return w, V, L.pinv(B)

        A = _symmetric("indefinite", 6, F64, (2,))
        B = torch.randn(7, 5, dtype=F64)
        with fusedmtl.backend.use("native"):
            compiled = torch.compile(fn, fullgraph=True, backend=compiler)
            got = compiled(A, B)
            want = fn(A, B)
        if compiler == "aot_eager":
            for name, g, e in zip(("w", "V", "pinv"), got, want):
                assert_bitwise(g, e, f"compiled {name} vs eager")
        else:
            k = factor(6, F64)
            scale = A.abs().sum(-1).amax(-1, keepdim=True)
            assert_within((got[0] - want[0]).abs(), k * scale, "compiled eigenvalues")
            # an eigenvector moves by the eigenvalues' perturbation over their gap
            gap = want[0].diff(dim=-1).amin(-1, keepdim=True)[..., None]
            assert_within((got[1] - want[1]).abs(), k * scale[..., None] / gap, "compiled V")
            s = torch.linalg.svdvals(B)
            bound = k * s[0] / s[-1] ** 2
            assert_within(spectral_norm(got[2] - want[2]), bound, "compiled pinv")
        check_eigh(A, got[0], got[1], "compiled eigh")
        check_pinv(B, got[2], 7 * torch.finfo(F64).eps, "compiled pinv")
    finally:
        torch._dynamo.reset()
