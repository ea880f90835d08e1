// The small dense linear algebra the weighting solvers run on the device without a host sync
// (torch.linalg's eigh, svd and pinv read LAPACK's error code on the host); schemas in
// csrc/torch_bindings.cpp, the method in linalg/jacobi_math.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace fusedmtl::linalg {

// The thin SVD of a batch of small matrices A [..., m, n] (float32 or float64, n <= m <= 128,
// n <= 64) by one-sided Jacobi: A = U diag(S) V^T with U [..., m, n], S [..., n] descending and V
// [..., n, n] (V itself, not V^T). A column of U whose singular value is 0 is 0.
std::tuple<at::Tensor, at::Tensor, at::Tensor> jacobi_svd_cpu(const at::Tensor& A);
// The eigenvalues W [..., n] (ascending) and eigenvectors Q [..., n, n] (columns) of the
// symmetric A [..., n, n] (its lower triangle; float32 or float64, n <= 64), by the same sweeps
// on A + r I.
std::tuple<at::Tensor, at::Tensor> jacobi_eigh_cpu(const at::Tensor& A);
#ifdef FUSEDMTL_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> jacobi_svd_cuda(const at::Tensor& A);
std::tuple<at::Tensor, at::Tensor> jacobi_eigh_cuda(const at::Tensor& A);
#endif

// Check A (named errors for the dtype, the rank and the size limits) and return the outputs,
// allocated on A's device.
std::tuple<at::Tensor, at::Tensor, at::Tensor> jacobi_svd_outputs(const at::Tensor& A);
std::tuple<at::Tensor, at::Tensor> jacobi_eigh_outputs(const at::Tensor& A);

}  // namespace fusedmtl::linalg
