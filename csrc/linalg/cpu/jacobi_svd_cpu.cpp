// jacobi_svd and jacobi_eigh on the CPU: each matrix of the batch on one thread (at::parallel_for
// over the batch, so results do not depend on the thread count), its rounds' pairs in turn (they
// are disjoint: the same rotations as the CUDA kernel's concurrent ones, in the same order of
// sweeps and rounds).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "linalg/jacobi_math.h"
#include "linalg/linalg.h"

namespace fusedmtl::linalg {
namespace {

// Rotates the columns of a (column-major m x n) until they are orthogonal, accumulating the
// rotations into v (n x n, column-major, the identity on entry).
template <typename T>
void sweep_to_orthogonality(T* a, T* v, int m, int n) {
  const T tol = orthogonality_tolerance(m, std::numeric_limits<T>::epsilon());
  const int n_even = n + (n & 1);
  for (int sweep = 0; sweep < kMaxSweeps; ++sweep) {
    bool rotated = false;
    for (int round = 0; round < n_even - 1; ++round) {
      for (int slot = 0; slot < n_even / 2; ++slot) {
        int p, q;
        round_robin_pair(round, slot, n_even, p, q);
        if (q >= n) continue;  // the dummy column of an odd n
        T* ap = a + p * m;
        T* aq = a + q * m;
        T alpha = 0, beta = 0, gamma = 0;
        for (int i = 0; i < m; ++i) {
          alpha += ap[i] * ap[i];
          beta += aq[i] * aq[i];
          gamma += ap[i] * aq[i];
        }
        T c, s;
        if (!jacobi_rotation(alpha, beta, gamma, tol, c, s)) continue;
        rotated = true;
        for (int i = 0; i < m; ++i) {
          const T x = ap[i], y = aq[i];
          ap[i] = c * x - s * y;
          aq[i] = s * x + c * y;
        }
        T* vp = v + p * n;
        T* vq = v + q * n;
        for (int i = 0; i < n; ++i) {
          const T x = vp[i], y = vq[i];
          vp[i] = c * x - s * y;
          vq[i] = s * x + c * y;
        }
      }
    }
    if (!rotated) break;
  }
}

// Loads A (row-major m x n; symmetric: n x n from its lower triangle) into a, column-major, scaled
// by 2^-e, e = scale_exponent(max |a_ij|), which it returns; v is set to the identity. Shifted
// (symmetric only): a + r I, r from gershgorin_shift (returned in shift).
template <typename T, bool kSymmetric>
int load(const T* A, T* a, T* v, int m, int n, bool shifted, T& shift) {
  T amax = 0;
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < n; ++j) {
      const T x = kSymmetric ? A[std::max(i, j) * n + std::min(i, j)] : A[i * n + j];
      a[j * m + i] = x;
      amax = std::max(amax, abs_of(x));  // (NaN skipped, as scale_exponent skips inf)
    }
  }
  const int e = scale_exponent(amax);
  shift = 0;
  for (int j = 0; j < n; ++j) {
    T row_sum = 0;
    for (int i = 0; i < m; ++i) {
      a[j * m + i] = ldexp_of(a[j * m + i], -e);
      row_sum += abs_of(a[j * m + i]);  // (symmetric: column j = row j)
    }
    shift = std::max(shift, gershgorin_shift(row_sum, a[j * m + j]));
  }
  for (int j = 0; shifted && j < n; ++j) a[j * m + j] += shift;
  for (int j = 0; j < n; ++j) {
    for (int i = 0; i < n; ++i) v[j * n + i] = T(i == j);
  }
  return e;
}

template <typename T>
T column_dot(const T* x, const T* y, int m) {
  T sum = 0;
  for (int i = 0; i < m; ++i) sum += x[i] * y[i];
  return sum;
}

// One matrix of jacobi_svd: U [m, n], S [n], V [n, n] row-major; work space a (m x n), v (n x n),
// sigma (n).
template <typename T>
void svd_one(const T* A, T* U, T* S, T* V, int m, int n, T* a, T* v, T* sigma) {
  T unused;
  const int e = load<T, false>(A, a, v, m, n, false, unused);
  sweep_to_orthogonality(a, v, m, n);
  for (int j = 0; j < n; ++j) sigma[j] = sqrt_of(column_dot(a + j * m, a + j * m, m));
  for (int j = 0; j < n; ++j) {
    const int r = sorted_rank<true>(sigma, n, j);
    S[r] = ldexp_of(sigma[j], e);
    for (int i = 0; i < m; ++i) U[i * n + r] = sigma[j] > 0 ? a[j * m + i] / sigma[j] : T(0);
    for (int i = 0; i < n; ++i) V[i * n + r] = v[j * n + i];
  }
}

// One matrix of jacobi_eigh: W [n], Q [n, n]; lambda (n) work space besides a, v. First the
// sweeps on A itself (eigenvalues to relative accuracy where A is semi-definite), taken when
// every column passes eigen_residual_ok; otherwise on A + r I (absolute accuracy).
template <typename T>
void eigh_one(const T* A, T* W, T* Q, int n, T* a, T* v, T* lambda) {
  T shift;
  int e = load<T, true>(A, a, v, n, n, false, shift);
  sweep_to_orthogonality(a, v, n, n);
  T sigma_max = 0;
  for (int j = 0; j < n; ++j)
    sigma_max = std::max(sigma_max, sqrt_of(column_dot(a + j * n, a + j * n, n)));
  bool resolved = true;
  for (int j = 0; j < n; ++j) {
    const T* aj = a + j * n;
    const T* vj = v + j * n;
    const T sigma = sqrt_of(column_dot(aj, aj, n));
    const T sign = column_dot(aj, vj, n) < 0 ? T(-1) : T(1);
    T residual = 0;
    for (int i = 0; i < n; ++i)
      residual += (aj[i] - sign * sigma * vj[i]) * (aj[i] - sign * sigma * vj[i]);
    resolved = resolved && eigen_residual_ok(sqrt_of(residual), sigma_max, n);
    lambda[j] = sign * sigma;
  }
  if (!resolved) {
    e = load<T, true>(A, a, v, n, n, true, shift);
    sweep_to_orthogonality(a, v, n, n);
    for (int j = 0; j < n; ++j) lambda[j] = sqrt_of(column_dot(a + j * n, a + j * n, n)) - shift;
  }
  for (int j = 0; j < n; ++j) {
    const int r = sorted_rank<false>(lambda, n, j);
    W[r] = ldexp_of(lambda[j], e);
    for (int i = 0; i < n; ++i) Q[i * n + r] = v[j * n + i];
  }
}

template <bool kSymmetric>
void jacobi_batch(const at::Tensor& A, std::vector<at::Tensor>& outputs) {
  const int m = static_cast<int>(A.size(-2)), n = static_cast<int>(A.size(-1));
  const int64_t batch = A.numel() / (static_cast<int64_t>(m) * n);
  if (batch == 0) return;
  const at::Tensor input = A.contiguous();
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "jacobi_cpu", [&] {
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* out[3] = {nullptr, nullptr, nullptr};
    int64_t stride[3] = {0, 0, 0};
    for (size_t k = 0; k < outputs.size(); ++k) {
      out[k] = outputs[k].mutable_data_ptr<scalar_t>();
      stride[k] = outputs[k].numel() / batch;
    }
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> work(static_cast<size_t>(m * n + n * n + n));
      scalar_t* a = work.data();
      for (int64_t b = begin; b < end; ++b) {
        if (kSymmetric) {
          eigh_one(in + b * n * n, out[0] + b * stride[0], out[1] + b * stride[1], n, a, a + n * n,
                   a + 2 * n * n);
        } else {
          svd_one(in + b * m * n, out[0] + b * stride[0], out[1] + b * stride[1],
                  out[2] + b * stride[2], m, n, a, a + m * n, a + m * n + n * n);
        }
      }
    });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> jacobi_svd_cpu(const at::Tensor& A) {
  auto [U, S, V] = jacobi_svd_outputs(A);
  std::vector<at::Tensor> outputs = {U, S, V};
  jacobi_batch<false>(A, outputs);
  return {U, S, V};
}

std::tuple<at::Tensor, at::Tensor> jacobi_eigh_cpu(const at::Tensor& A) {
  auto [W, Q] = jacobi_eigh_outputs(A);
  std::vector<at::Tensor> outputs = {W, Q};
  jacobi_batch<true>(A, outputs);
  return {W, Q};
}

}  // namespace fusedmtl::linalg
