// Per-element math of the regression losses, shared by the CPU kernels, the CUDA kernels and (as
// the formulas it mirrors) the pure-PyTorch reference in python/fusedmtl/losses/reference.py.
//
// Every expression is written in the order ATen evaluates it, so that float32 and float64 results
// are bitwise identical to torch.nn.functional, including at |d| == beta, d == 0, NaN and inf.
// Selects are plain ternaries on values, which compilers turn into blends (no branches).
#pragma once

#include <math.h>

#include "common/macros.h"
#include "losses/loss_kinds.h"

namespace fusedmtl::losses {

// Call-wide constants, in the compute type C (float for fp32/fp16/bf16, double for fp64).
template <typename C>
struct LossParams {
  C param;       // beta (smooth-L1) or delta (Huber); unused otherwise
  C inv_param;   // 1 / param (see ParamDivision)
  C norm;        // ATen's "norm": 1/N (2/N for MSE) for reduction='mean', 1 (2) otherwise
  C grad_scale;  // scalar grad_output; for L1 with reduction='mean' already divided by N,
                 // because autograd's mean backward divides grad_output before sign(d) multiplies
                 // it
};

// |x| by clearing the sign bit, as torch.abs does (abs(-0) == +0, NaN stays NaN): one AND where a
// compare-and-select costs three instructions.
template <typename C>
FUSEDMTL_HOST_DEVICE C abs_of(C x) {
  if constexpr (sizeof(C) == sizeof(float)) {
    return ::fabsf(x);
  } else {
    return ::fabs(x);
  }
}

// torch.sign: 0 at 0 and at NaN. Selects rather than bool-to-float conversions, which GCC does
// not vectorize next to a reduction.
template <typename C>
FUSEDMTL_HOST_DEVICE C sign_of(C x) {
  return x > C(0) ? C(1) : (x < C(0) ? C(-1) : C(0));
}

// How x / param is evaluated; each way gives the division's exact result for the params it is
// chosen for: a power of two (x * (1 / param) is exact), 1 (the default beta: x itself), any other.
enum class ParamDivision { kDivide, kMultiplyByInverse, kByOne };

template <ParamDivision kDivision, typename C>
FUSEDMTL_HOST_DEVICE C divide_by_param(C x, const LossParams<C>& p) {
  if constexpr (kDivision == ParamDivision::kDivide) {
    return x / p.param;
  } else if constexpr (kDivision == ParamDivision::kMultiplyByInverse) {
    return x * p.inv_param;
  } else {
    return x;
  }
}

// Loss of one element, d = input - target.
template <LossKind K, ParamDivision kDivision, typename C>
FUSEDMTL_HOST_DEVICE C loss_value(C d, const LossParams<C>& p) {
  if constexpr (K == LossKind::L1) {
    return abs_of(d);
  } else if constexpr (K == LossKind::MSE) {
    return d * d;
  } else if constexpr (K == LossKind::SmoothL1) {
    const C z = abs_of(d);
    const C quadratic = divide_by_param<kDivision>(C(0.5) * z * z, p);
    return z < p.param ? quadratic : z - C(0.5) * p.param;
  } else {
    const C z = abs_of(d);
    return z < p.param ? C(0.5) * z * z : p.param * (z - C(0.5) * p.param);
  }
}

// d loss / d input of one element times its grad_output g (already divided by N for L1 mean).
// The gradient w.r.t. target is its negation.
template <LossKind K, ParamDivision kDivision, typename C>
FUSEDMTL_HOST_DEVICE C loss_grad(C d, C g, const LossParams<C>& p) {
  if constexpr (K == LossKind::L1) {
    return g * sign_of(d);
  } else if constexpr (K == LossKind::MSE) {
    return p.norm * d * g;
  } else if constexpr (K == LossKind::SmoothL1) {
    const C outer = p.norm * g;
    const C inner = divide_by_param<kDivision>(d, p) * p.norm * g;
    return d <= -p.param ? -outer : (d >= p.param ? outer : inner);
  } else {
    // grad_output last, as torch's vectorized kernel: scaling the gradient computed at
    // grad_output 1 then gives the same bits as computing it at grad_output.
    const C outer = p.norm * p.param * g;
    const C inner = p.norm * d * g;
    return d <= -p.param ? -outer : (d >= p.param ? outer : inner);
  }
}

}  // namespace fusedmtl::losses
