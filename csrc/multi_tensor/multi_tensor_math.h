// Per-element math of the multi-tensor ops, shared by the CPU kernels (on scalars and on vectors
// of lanes), the CUDA kernels and, as the formulas it mirrors, python/fusedmtl/multi_tensor/
// reference.py. On the device each product and sum is rounded separately (no FMA contraction), as
// the CPU kernels are compiled with -ffp-contract=off: both give the same bits per element.
#pragma once

#include "common/macros.h"

namespace fusedmtl::multi_tensor {

#if defined(__CUDA_ARCH__)
FUSEDMTL_HOST_DEVICE float mul_rn(float a, float b) { return __fmul_rn(a, b); }
FUSEDMTL_HOST_DEVICE double mul_rn(double a, double b) { return __dmul_rn(a, b); }
FUSEDMTL_HOST_DEVICE float add_rn(float a, float b) { return __fadd_rn(a, b); }
FUSEDMTL_HOST_DEVICE double add_rn(double a, double b) { return __dadd_rn(a, b); }
FUSEDMTL_HOST_DEVICE float div_rn(float a, float b) { return __fdiv_rn(a, b); }
FUSEDMTL_HOST_DEVICE double div_rn(double a, double b) { return __ddiv_rn(a, b); }
#else
template <typename A, typename B>
FUSEDMTL_HOST_DEVICE auto mul_rn(A a, B b) {
  return a * b;
}
template <typename A, typename B>
FUSEDMTL_HOST_DEVICE auto add_rn(A a, B b) {
  return a + b;
}
template <typename A, typename B>
FUSEDMTL_HOST_DEVICE auto div_rn(A a, B b) {
  return a / b;
}
#endif

// The gradient of l1 * |w| + l2 * w^2: l1 * sign(w) + 2 l2 * w (two_l2 = 2 * l2), with sign(w) in
// {-1, 0, 1} (0 at 0 and NaN, as torch.sign) computed by the caller. V: a scalar or a vector of
// lanes of the compute type C.
template <typename V, typename C>
FUSEDMTL_HOST_DEVICE V penalty_gradient(V w, V sign, C l1, C two_l2) {
  return add_rn(mul_rn(l1, sign), mul_rn(two_l2, w));
}

// Whether a comes before b in torch.sort's ascending order: NaN after every number, NaNs tied
// (as are -0 and +0). V: a scalar (the result is 0 or 1) or a vector of lanes (a lane mask).
// TrimmedMean's rank of task i's value v_i at a coordinate is the number of j that a stable sort
// puts before it: j < i with !sorts_before(v_i, v_j), or j > i with sorts_before(v_j, v_i).
template <typename V>
FUSEDMTL_HOST_DEVICE auto sorts_before(V a, V b) {
  return (a < b) | ((b != b) & (a == a));
}

// GradDrop's positive sign purity (1 + total / magnitude) / 2 of a coordinate, total = sum_i g_i
// and magnitude = sum_i |g_i| added in task order (NaN where every g_i is 0). C: the compute type.
template <typename V, typename C>
FUSEDMTL_HOST_DEVICE V sign_purity(V total, V magnitude) {
  return mul_rn(C(0.5), add_rn(C(1), div_rn(total, magnitude)));
}

// GradDrop's factor of one value: leak + (1 - leak) * kept, kept 0 or 1 (one_minus_leak given).
template <typename V, typename C>
FUSEDMTL_HOST_DEVICE V sign_dropout_factor(C leak, C one_minus_leak, V kept) {
  return add_rn(leak, mul_rn(one_minus_leak, kept));
}

// One term of a combination: sum + c * g, rounded twice.
template <typename V, typename C>
FUSEDMTL_HOST_DEVICE V add_scaled(V sum, C c, V g) {
  return add_rn(sum, mul_rn(c, g));
}

}  // namespace fusedmtl::multi_tensor
