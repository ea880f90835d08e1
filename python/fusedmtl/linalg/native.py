"""Fake (meta) implementations of the compiled ``fusedmtl::jacobi_svd`` and ``jacobi_eigh``, for
torch.compile and opcheck. Their schemas are in csrc/torch_bindings.cpp, their kernels in
csrc/linalg/."""

from __future__ import annotations

import torch


@torch.library.register_fake("fusedmtl::jacobi_svd")
def _jacobi_svd_fake(A):
    m, n = A.shape[-2:]
    batch = A.shape[:-2]
    return A.new_empty((*batch, m, n)), A.new_empty((*batch, n)), A.new_empty((*batch, n, n))


@torch.library.register_fake("fusedmtl::jacobi_eigh")
def _jacobi_eigh_fake(A):
    n = A.shape[-1]
    return A.new_empty((*A.shape[:-2], n)), A.new_empty((*A.shape[:-2], n, n))
