// The one-sided (Hestenes) Jacobi SVD of jacobi_svd: its column ordering and rotation, shared by
// the CPU and CUDA kernels and mirrored by the Triton kernel (python/fusedmtl/linalg/triton.py).
//
// A (m x n, m >= n) is multiplied on the right by plane rotations J_pq until its columns are
// orthogonal to working accuracy: A J_1 J_2 ... = U diag(S), V = J_1 J_2 ... (Demmel & Veselic,
// "Jacobi's method is more accurate than QR", SIAM J. Matrix Anal. Appl. 13, 1992). Each rotation
// reads only the two columns' dot products, so the n / 2 disjoint pairs of a round run at once;
// convergence is tested on the device (a sweep without a rotation ends it), never on the host.
#pragma once

#include <math.h>

#include <limits>

#include "common/macros.h"

namespace fusedmtl::linalg {

// Limits of the op on every device: the CUDA kernel keeps A (m x n) and V (n x n) of one matrix
// in shared memory (float64 at the limits: 97 KB of the 163 KB an sm_80 block may opt into).
constexpr int kMaxColumns = 64;
constexpr int kMaxRows = 128;
// LAPACK's dgesvj stops after 30 sweeps too; Jacobi converges quadratically, in 5-10 sweeps for
// n <= 64 (a sweep that rotates nothing ends it earlier).
constexpr int kMaxSweeps = 30;

FUSEDMTL_HOST_DEVICE float abs_of(float x) { return fabsf(x); }
FUSEDMTL_HOST_DEVICE double abs_of(double x) { return fabs(x); }
FUSEDMTL_HOST_DEVICE float sqrt_of(float x) { return sqrtf(x); }
FUSEDMTL_HOST_DEVICE double sqrt_of(double x) { return sqrt(x); }
FUSEDMTL_HOST_DEVICE float ldexp_of(float x, int e) { return ldexpf(x, e); }
FUSEDMTL_HOST_DEVICE double ldexp_of(double x, int e) { return ldexp(x, e); }

// The exponent e with 2^(e-1) <= amax < 2^e (0 for 0 and non-finite amax): A is scaled by 2^-e,
// exactly, before the sweeps, so that its squared column norms neither overflow nor underflow,
// and the singular values (eigenvalues) by 2^e after.
template <typename T>
FUSEDMTL_HOST_DEVICE int scale_exponent(T amax) {
  int e = 0;
  if (amax > T(0) && amax <= std::numeric_limits<T>::max()) frexp(static_cast<double>(amax), &e);
  return e;
}

// jacobi_eigh's symmetric A is read from its lower triangle (as torch.linalg.eigh) and scaled.
// Where the sweeps on A itself do not resolve its eigenpairs (eigen_residual_ok below), A is
// shifted by r = max(0, max_i sum_{j != i} |a_ij| - a_ii) >= -lambda_min (Gershgorin): A + r I is
// positive semi-definite, so its SVD is its eigendecomposition (U = V) and lambda = S - r, each
// to ~n eps (lambda_max + r) (LAPACK's eigh: ~n eps ||A||). The eigenvalues come out ascending.
//
// Row i's term of r, from its absolute sum and its diagonal entry.
template <typename T>
FUSEDMTL_HOST_DEVICE T gershgorin_shift(T abs_row_sum, T diagonal) {
  return abs_row_sum - abs_of(diagonal) - diagonal;
}

// The round-robin (circle) ordering of the pairs of n_even columns (n rounded up to even; the
// extra column of an odd n is a dummy whose pairs are skipped): in round r < n_even - 1 slot
// k < n_even / 2 pairs columns p < q; the slots of a round are disjoint, and the rounds of a
// sweep pair every two columns exactly once.
FUSEDMTL_HOST_DEVICE void round_robin_pair(int round, int slot, int n_even, int& p, int& q) {
  const int fixed = n_even - 1;
  const int a = slot == 0 ? round : (round + slot) % fixed;
  const int b = slot == 0 ? fixed : (round - slot + fixed) % fixed;
  p = a < b ? a : b;
  q = a < b ? b : a;
}

// The rotation that makes columns p and q orthogonal, from alpha = |a_p|^2, beta = |a_q|^2 and
// gamma = <a_p, a_q>: a_p <- c a_p - s a_q, a_q <- s a_p + c a_q. False (no rotation) when the
// columns are already orthogonal to tol: |gamma| <= tol |a_p| |a_q| (also for a zero column, and
// for NaN, which then stays in A). zeta = cot(2 theta); t = tan(theta) is the smaller root
// (|theta| <= pi / 4), which converges; zeta^2 overflowing to inf gives t = 0, its limit.
template <typename T>
FUSEDMTL_HOST_DEVICE bool jacobi_rotation(T alpha, T beta, T gamma, T tol, T& c, T& s) {
  if (!(abs_of(gamma) > tol * sqrt_of(alpha) * sqrt_of(beta))) return false;
  const T zeta = (beta - alpha) / (T(2) * gamma);
  const T t = (zeta >= T(0) ? T(1) : T(-1)) / (abs_of(zeta) + sqrt_of(T(1) + zeta * zeta));
  c = T(1) / sqrt_of(T(1) + t * t);
  s = c * t;
  return true;
}

// The working accuracy columns are orthogonalised to: sqrt(m) eps, as LAPACK's dgesvj.
template <typename T>
FUSEDMTL_HOST_DEVICE T orthogonality_tolerance(int m, T eps) {
  return sqrt_of(T(m)) * eps;
}

// Where value j lands when the n values are sorted descending (the singular values) or ascending
// (the eigenvalues), ties in column order: the number of values before it. NaN (from a
// non-finite A) ranks as +inf, so the ranks are always a permutation and every output is written.
template <typename T>
FUSEDMTL_HOST_DEVICE T rank_key(T x) {
  return x == x ? x : std::numeric_limits<T>::infinity();
}

template <bool kDescending, typename T>
FUSEDMTL_HOST_DEVICE int sorted_rank(const T* values, int n, int j) {
  const T own = rank_key(values[j]);
  int rank = 0;
  for (int k = 0; k < n; ++k) {
    const T other = rank_key(values[k]);
    rank += (kDescending ? other > own : other < own) || (other == own && k < j);
  }
  return rank;
}

// jacobi_eigh first sweeps A itself: for a semi-definite A its SVD is its eigendecomposition, to
// relative accuracy (Demmel & Veselic), and for any symmetric A each a_j = A v_j is +-sigma_j v_j
// up to rounding, unless eigenvalues of opposite signs have (nearly) the same magnitude, where V
// mixes their eigenvectors. The residual |a_j - s sigma_j v_j| (s the sign of <a_j, v_j>) tells:
// within 8 n eps sigma_max for every column (semi-definite matrices measure below 1.1 n eps),
// lambda_j = s sigma_j; otherwise the sweeps run again on A + r I.
template <typename T>
FUSEDMTL_HOST_DEVICE bool eigen_residual_ok(T residual, T sigma_max, int n) {
  return !(residual > T(8) * T(n) * std::numeric_limits<T>::epsilon() * sigma_max);
}

}  // namespace fusedmtl::linalg
