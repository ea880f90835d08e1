// jacobi_svd and jacobi_eigh on CUDA: one block per matrix, A (column-major) and V in shared
// memory, one warp per pair of a round (the pairs of a round are disjoint: no two warps touch the
// same column), a block barrier between rounds. A warp's sums are taken lane-strided, then by a
// shuffle tree whose lane-0 result every lane reads, so all lanes take the same rotation. The
// sweeps end on the device when one rotates nothing in any warp; nothing is read on the host.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>

#include "linalg/jacobi_math.h"
#include "linalg/linalg.h"

namespace fusedmtl::linalg {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxWarps = 8;  // kMaxColumns / 2 pairs a round: 4 per warp at the limit

template <typename T>
__device__ T warp_sum(T x) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    x += __shfl_down_sync(0xffffffffu, x, offset);
  }
  return __shfl_sync(0xffffffffu, x, 0);
}

// The largest value of the warp, NaN skipped (as the CPU's std::max).
template <typename T>
__device__ T warp_max(T x) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const T other = __shfl_down_sync(0xffffffffu, x, offset);
    x = other > x ? other : x;
  }
  return __shfl_sync(0xffffffffu, x, 0);
}

template <typename T>
__device__ void rotate_columns(T* __restrict__ x, T* __restrict__ y, int rows, T c, T s, int lane) {
  for (int i = lane; i < rows; i += kWarp) {
    const T xi = x[i], yi = y[i];
    x[i] = c * xi - s * yi;
    y[i] = s * xi + c * yi;
  }
}

// The block's work space: a (m x n, column-major), v (n x n), per-column values (n).
template <typename T>
struct Shared {
  T* a;
  T* v;
  T* column;
};

// Loads A (row-major; symmetric: its lower triangle) into a, scaled by 2^-e (returned), and v = I;
// shifted: a + r I, r (gershgorin_shift) into shift. Every thread returns the same values.
template <typename T, bool kSymmetric>
__device__ int load(const T* __restrict__ A, Shared<T> w, int m, int n, bool shifted, T& shift) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  for (int idx = threadIdx.x; idx < m * n; idx += blockDim.x) {
    const int i = idx / n, j = idx % n;
    w.a[j * m + i] = kSymmetric ? A[max(i, j) * n + min(i, j)] : A[idx];
  }
  for (int idx = threadIdx.x; idx < n * n; idx += blockDim.x) w.v[idx] = T(idx % n == idx / n);
  __syncthreads();
  for (int j = warp; j < n; j += warps) {
    T most = 0;
    for (int i = lane; i < m; i += kWarp) {
      const T x = abs_of(w.a[j * m + i]);
      most = x > most ? x : most;  // (NaN skipped)
    }
    most = warp_max(most);
    if (lane == 0) w.column[j] = most;
  }
  __syncthreads();
  T amax = 0;
  for (int j = 0; j < n; ++j) amax = w.column[j] > amax ? w.column[j] : amax;
  const int e = scale_exponent(amax);
  __syncthreads();  // every thread has read column[] before it is written again
  for (int idx = threadIdx.x; idx < m * n; idx += blockDim.x) w.a[idx] = ldexp_of(w.a[idx], -e);
  __syncthreads();
  shift = 0;
  if (kSymmetric) {
    for (int j = warp; j < n; j += warps) {
      T row_sum = 0;
      for (int i = lane; i < m; i += kWarp) row_sum += abs_of(w.a[j * m + i]);
      row_sum = warp_sum(row_sum);
      if (lane == 0) w.column[j] = gershgorin_shift(row_sum, w.a[j * m + j]);
    }
    __syncthreads();
    for (int j = 0; j < n; ++j) shift = w.column[j] > shift ? w.column[j] : shift;
    __syncthreads();
    for (int j = threadIdx.x; shifted && j < n; j += blockDim.x) w.a[j * m + j] += shift;
    __syncthreads();
  }
  return e;
}

// Rotates the columns of a until they are orthogonal, accumulating the rotations into v.
template <typename T>
__device__ void sweep_to_orthogonality(Shared<T> w, int m, int n, T tol) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  const int n_even = n + (n & 1);
  for (int sweep = 0; sweep < kMaxSweeps; ++sweep) {
    int rotated = 0;
    for (int round = 0; round < n_even - 1; ++round) {
      for (int slot = warp; slot < n_even / 2; slot += warps) {  // warp-uniform
        int p, q;
        round_robin_pair(round, slot, n_even, p, q);
        if (q >= n) continue;  // the dummy column of an odd n
        T* ap = w.a + p * m;
        T* aq = w.a + q * m;
        T alpha = 0, beta = 0, gamma = 0;
        for (int i = lane; i < m; i += kWarp) {
          const T x = ap[i], y = aq[i];
          alpha += x * x;
          beta += y * y;
          gamma += x * y;
        }
        alpha = warp_sum(alpha);
        beta = warp_sum(beta);
        gamma = warp_sum(gamma);
        T c, s;
        if (!jacobi_rotation(alpha, beta, gamma, tol, c, s)) continue;
        rotate_columns(ap, aq, m, c, s, lane);
        rotate_columns(w.v + p * n, w.v + q * n, n, c, s, lane);
        rotated = 1;
      }
      __syncthreads();
    }
    if (!__syncthreads_or(rotated)) break;  // a sweep that rotated nothing, in any warp
  }
}

// column[j] = |a_j| (the singular values), then a barrier.
template <typename T>
__device__ void column_norms(Shared<T> w, int m, int n) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  for (int j = warp; j < n; j += warps) {
    T sum = 0;
    for (int i = lane; i < m; i += kWarp) sum += w.a[j * m + i] * w.a[j * m + i];
    sum = warp_sum(sum);
    if (lane == 0) w.column[j] = sqrt_of(sum);
  }
  __syncthreads();
}

// Symmetric (jacobi_eigh): A is n x n; out0 = W (ascending eigenvalues), out1 = Q. Otherwise
// out0 = U, out1 = S, out2 = V.
template <typename T, bool kSymmetric>
__global__ void __launch_bounds__(kMaxWarps* kWarp)
    jacobi_kernel(const T* __restrict__ A, T* __restrict__ out0, T* __restrict__ out1,
                  T* __restrict__ out2, int m, int n, T tol) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  Shared<T> w;
  w.a = reinterpret_cast<T*>(shared_bytes);
  w.v = w.a + m * n;
  w.column = w.v + n * n;
  __shared__ int ranks[kMaxColumns];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  const int64_t b = blockIdx.x;
  A += b * m * n;

  T shift;
  int e = load<T, kSymmetric>(A, w, m, n, false, shift);
  sweep_to_orthogonality(w, m, n, tol);
  column_norms(w, m, n);
  if (kSymmetric) {
    // The eigenpairs of A itself where every column passes eigen_residual_ok (lambda_j = s_j
    // sigma_j into column[j]); otherwise the sweeps again on A + r I.
    T sigma_max = 0;
    for (int j = 0; j < n; ++j) sigma_max = w.column[j] > sigma_max ? w.column[j] : sigma_max;
    int unresolved = 0;
    __syncthreads();  // every thread has read column[] before it is written again
    for (int j = warp; j < n; j += warps) {
      const T* aj = w.a + j * m;
      const T* vj = w.v + j * n;
      const T sigma = w.column[j];
      T dot = 0;
      for (int i = lane; i < n; i += kWarp) dot += aj[i] * vj[i];
      const T sign = warp_sum(dot) < 0 ? T(-1) : T(1);
      T residual = 0;
      for (int i = lane; i < n; i += kWarp) {
        const T d = aj[i] - sign * sigma * vj[i];
        residual += d * d;
      }
      unresolved |= !eigen_residual_ok(sqrt_of(warp_sum(residual)), sigma_max, n);
      __syncwarp();  // every lane has read column[j]
      if (lane == 0) w.column[j] = sign * sigma;
    }
    if (__syncthreads_or(unresolved)) {
      e = load<T, kSymmetric>(A, w, m, n, true, shift);
      sweep_to_orthogonality(w, m, n, tol);
      column_norms(w, m, n);
      for (int j = threadIdx.x; j < n; j += blockDim.x) w.column[j] -= shift;
      __syncthreads();
    }
  }

  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    if (kSymmetric) {
      ranks[j] = sorted_rank<false>(w.column, n, j);
      out0[b * n + ranks[j]] = ldexp_of(w.column[j], e);
    } else {
      ranks[j] = sorted_rank<true>(w.column, n, j);
      out1[b * n + ranks[j]] = ldexp_of(w.column[j], e);
    }
  }
  __syncthreads();
  T* vectors = (kSymmetric ? out1 : out2) + b * n * n;
  for (int idx = threadIdx.x; idx < n * n; idx += blockDim.x) {
    const int i = idx / n, j = idx % n;
    vectors[i * n + ranks[j]] = w.v[j * n + i];
  }
  if (!kSymmetric) {
    T* U = out0 + b * m * n;
    for (int idx = threadIdx.x; idx < m * n; idx += blockDim.x) {
      const int i = idx / n, j = idx % n;
      const T sigma = w.column[j];
      U[i * n + ranks[j]] = sigma > 0 ? w.a[j * m + i] / sigma : T(0);
    }
  }
}

template <typename T, bool kSymmetric>
void launch(const at::Tensor& A, T* out0, T* out1, T* out2, int64_t batch) {
  const int m = static_cast<int>(A.size(-2)), n = static_cast<int>(A.size(-1));
  const int warps = std::min(kMaxWarps, (n + 1) / 2);
  const size_t shared = sizeof(T) * static_cast<size_t>(m * n + n * n + n);
  // Above the default 48 KB a launch must opt in to its dynamic shared memory (a host-side
  // attribute of the function on the current device: no sync).
  if (shared > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(jacobi_kernel<T, kSymmetric>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared)));
  }
  const T tol = orthogonality_tolerance(m, std::numeric_limits<T>::epsilon());
  const int64_t most = std::numeric_limits<int32_t>::max();  // blocks of one grid
  for (int64_t first = 0; first < batch; first += most) {
    const auto blocks = static_cast<unsigned>(std::min(batch - first, most));
    const int64_t sizes[3] = {kSymmetric ? n : m * n, kSymmetric ? n * n : n, n * n};
    jacobi_kernel<T, kSymmetric>
        <<<blocks, warps * kWarp, shared, at::cuda::getCurrentCUDAStream()>>>(
            A.const_data_ptr<T>() + first * m * n, out0 + first * sizes[0], out1 + first * sizes[1],
            out2 ? out2 + first * sizes[2] : nullptr, m, n, tol);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> jacobi_svd_cuda(const at::Tensor& A) {
  const c10::cuda::CUDAGuard guard(A.device());
  auto [U, S, V] = jacobi_svd_outputs(A);
  const int64_t batch = S.numel() / A.size(-1);
  if (batch == 0) return {U, S, V};
  const at::Tensor input = A.contiguous();
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "jacobi_svd_cuda", [&] {
    launch<scalar_t, false>(input, U.mutable_data_ptr<scalar_t>(), S.mutable_data_ptr<scalar_t>(),
                            V.mutable_data_ptr<scalar_t>(), batch);
  });
  return {U, S, V};
}

std::tuple<at::Tensor, at::Tensor> jacobi_eigh_cuda(const at::Tensor& A) {
  const c10::cuda::CUDAGuard guard(A.device());
  auto [W, Q] = jacobi_eigh_outputs(A);
  const int64_t batch = W.numel() / A.size(-1);
  if (batch == 0) return {W, Q};
  const at::Tensor input = A.contiguous();
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "jacobi_eigh_cuda", [&] {
    launch<scalar_t, true>(input, W.mutable_data_ptr<scalar_t>(), Q.mutable_data_ptr<scalar_t>(),
                           nullptr, batch);
  });
  return {W, Q};
}

}  // namespace fusedmtl::linalg
