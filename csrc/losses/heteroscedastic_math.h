// Per-element math of the heteroscedastic regression losses (Kendall & Gal 2017), shared by the
// CPU kernels and the CUDA kernels like loss_math.h, whose base losses it reuses. Bitwise the same
// on both (and in the Triton kernel, python/fusedmtl/losses/triton.py): the same exp, and no FMA.
//
// The network predicts s = log sigma^2 per element besides the prediction; with d = input - target
// and the base loss b(d):
//   'l2'        (b = d^2, LossKind::MSE):        0.5 * (exp(-s) * b + s)
//   'l1'        (b = |d|, LossKind::L1):               exp(-s) * b + s
//   'smooth_l1' (b = smooth_l1(d; beta)):              exp(-s) * b + s
// d loss / d input = w exp(-s) b'(d) (the target's gradient is its negation) and
// d loss / d s = w (1 - exp(-s) b), w being the leading 0.5 of 'l2' and 1 otherwise.
#pragma once

#include <cstdint>

#include "losses/loss_math.h"

namespace fusedmtl::losses {

// a * b, a + b and a - b rounded once each and never contracted into an FMA. The CPU kernels are
// built with -ffp-contract=off; nvcc contracts a * b + c by default, so on the device the _rn
// intrinsics (which it never contracts) keep the CUDA kernels bitwise equal to the CPU ones.
template <typename C>
FUSEDMTL_HOST_DEVICE C mul_rn(C a, C b) {
#ifdef __CUDA_ARCH__
  if constexpr (sizeof(C) == sizeof(float)) {
    return __fmul_rn(a, b);
  } else {
    return __dmul_rn(a, b);
  }
#else
  return a * b;
#endif
}

template <typename C>
FUSEDMTL_HOST_DEVICE C add_rn(C a, C b) {
#ifdef __CUDA_ARCH__
  if constexpr (sizeof(C) == sizeof(float)) {
    return __fadd_rn(a, b);
  } else {
    return __dadd_rn(a, b);
  }
#else
  return a + b;
#endif
}

template <typename C>
FUSEDMTL_HOST_DEVICE C sub_rn(C a, C b) {
#ifdef __CUDA_ARCH__
  if constexpr (sizeof(C) == sizeof(float)) {
    return __fsub_rn(a, b);
  } else {
    return __dsub_rn(a, b);
  }
#else
  return a - b;
#endif
}

FUSEDMTL_HOST_DEVICE uint32_t bits_of(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  return __builtin_bit_cast(uint32_t, x);
#endif
}
FUSEDMTL_HOST_DEVICE uint64_t bits_of(double x) {
#ifdef __CUDA_ARCH__
  return static_cast<uint64_t>(__double_as_longlong(x));
#else
  return __builtin_bit_cast(uint64_t, x);
#endif
}
FUSEDMTL_HOST_DEVICE float float_of(uint32_t bits) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(bits);
#else
  return __builtin_bit_cast(float, bits);
#endif
}
FUSEDMTL_HOST_DEVICE double double_of(uint64_t bits) {
#ifdef __CUDA_ARCH__
  return __longlong_as_double(static_cast<long long>(bits));
#else
  return __builtin_bit_cast(double, bits);
#endif
}

// exp(x), the same branch-free polynomial on the CPU and the GPU (bitwise equal results) instead of
// libm or the CUDA math library:
// without -ffast-math GCC never vectorizes a call to std::exp, which would make the loop scalar and
// several times slower; and plain arithmetic rounds identically on every instruction set (the
// kernels are built with -ffp-contract=off), so the per-ISA builds stay bitwise equal.
// float: Cephes' expf (within 1 ulp); double: Taylor series to degree 13, whose truncation error
// on |r| <= ln(2)/2 is 4e-18 (within 1 ulp). Overflow gives inf, underflow 0 (via subnormals), NaN
// stays NaN.
FUSEDMTL_HOST_DEVICE float exp_of(float x) {
  // Beyond these, exp(x) is inf (above log(FLT_MAX) = 88.72) or rounds to 0: clamping keeps n in
  // range. Comparisons with NaN are false, so a NaN passes through.
  x = x > 89.0f ? 89.0f : (x < -104.0f ? -104.0f : x);
  // n = round(x / ln 2) by the add-and-subtract trick: the low bits of `shifted` hold n.
  constexpr float kShift = 0x1.8p23f;
  const float shifted = add_rn(mul_rn(x, 1.44269504088896341f), kShift);
  const float n = sub_rn(shifted, kShift);
  // x - n ln 2 (Cody-Waite)
  const float r = sub_rn(sub_rn(x, mul_rn(n, 0.693359375f)), mul_rn(n, -2.12194440e-4f));
  float p = 1.9875691500e-4f;
  p = add_rn(mul_rn(p, r), 1.3981999507e-3f);
  p = add_rn(mul_rn(p, r), 8.3334519073e-3f);
  p = add_rn(mul_rn(p, r), 4.1665795894e-2f);
  p = add_rn(mul_rn(p, r), 1.6666665459e-1f);
  p = add_rn(mul_rn(p, r), 5.0000001201e-1f);
  const float exp_r = add_rn(add_rn(mul_rn(p, mul_rn(r, r)), r), 1.0f);
  // times 2^n in two halves, each a normal power of two even where the result is subnormal or
  // overflows, so that the result is rounded once.
  const int32_t n_int = static_cast<int32_t>(bits_of(shifted) - bits_of(kShift));
  const int32_t half = n_int >> 1;
  const float scale_a = float_of(static_cast<uint32_t>(half + 127) << 23);
  const float scale_b = float_of(static_cast<uint32_t>(n_int - half + 127) << 23);
  return mul_rn(mul_rn(exp_r, scale_a), scale_b);
}

FUSEDMTL_HOST_DEVICE double exp_of(double x) {
  x = x > 710.0 ? 710.0 : (x < -746.0 ? -746.0 : x);
  constexpr double kShift = 0x1.8p52;
  const double shifted = add_rn(mul_rn(x, 1.4426950408889634074), kShift);
  const double n = sub_rn(shifted, kShift);
  // ln 2 = kLn2Hi + kLn2Lo, kLn2Hi with trailing zero bits so that n * kLn2Hi is exact
  const double r =
      sub_rn(sub_rn(x, mul_rn(n, 0x1.62e42fee00000p-1)), mul_rn(n, 0x1.a39ef35793c76p-33));
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = add_rn(mul_rn(p, r), 1.0 / 479001600.0);
  p = add_rn(mul_rn(p, r), 1.0 / 39916800.0);
  p = add_rn(mul_rn(p, r), 1.0 / 3628800.0);
  p = add_rn(mul_rn(p, r), 1.0 / 362880.0);
  p = add_rn(mul_rn(p, r), 1.0 / 40320.0);
  p = add_rn(mul_rn(p, r), 1.0 / 5040.0);
  p = add_rn(mul_rn(p, r), 1.0 / 720.0);
  p = add_rn(mul_rn(p, r), 1.0 / 120.0);
  p = add_rn(mul_rn(p, r), 1.0 / 24.0);
  p = add_rn(mul_rn(p, r), 1.0 / 6.0);
  p = add_rn(mul_rn(p, r), 0.5);
  const double exp_r = add_rn(add_rn(mul_rn(p, mul_rn(r, r)), r), 1.0);
  const int64_t n_int = static_cast<int64_t>(bits_of(shifted) - bits_of(kShift));
  // floor(n / 2) by a logical shift of the biased value: AVX2 has no 64-bit arithmetic shift
  const int64_t half = static_cast<int64_t>(static_cast<uint64_t>(n_int + 2048) >> 1) - 1024;
  const double scale_a = double_of(static_cast<uint64_t>(half + 1023) << 52);
  const double scale_b = double_of(static_cast<uint64_t>(n_int - half + 1023) << 52);
  return mul_rn(mul_rn(exp_r, scale_a), scale_b);
}

// The leading factor w: 0.5 for 'l2' (Gaussian likelihood), 1 for 'l1' and 'smooth_l1'.
template <LossKind K, typename C>
FUSEDMTL_HOST_DEVICE C heteroscedastic_weight() {
  return K == LossKind::MSE ? C(0.5) : C(1);
}

// w * d b / d d: sign(d) (0 at 0 and NaN, as torch), 0.5 * 2d = d, and smooth-L1's slope d / beta
// clamped to [-1, 1]. The clamp gives torch's branches exactly (d / beta is >= 1 in magnitude
// exactly when |d| >= beta, as rounding is monotonic and beta / beta == 1; a NaN passes through);
// comparing d with beta instead, as torch does, makes GCC fold the comparisons against those of
// the loss value in different forms per unrolled lane, and the loop no longer vectorizes.
template <LossKind K, ParamDivision kDivision, typename C>
FUSEDMTL_HOST_DEVICE C heteroscedastic_slope(C d, const LossParams<C>& p) {
  static_assert(K != LossKind::Huber, "no heteroscedastic Huber loss");
  if constexpr (K == LossKind::L1) {
    return sign_of(d);
  } else if constexpr (K == LossKind::MSE) {
    return d;
  } else {
    const C inner = divide_by_param<kDivision>(d, p);
    return inner > C(1) ? C(1) : (inner < C(-1) ? C(-1) : inner);
  }
}

// The base loss b(d): loss_value's, with smooth-L1's z - 0.5 beta kept from FMA contraction on
// the device (|d| and d * d have nothing to contract).
template <LossKind K, ParamDivision kDivision, typename C>
FUSEDMTL_HOST_DEVICE C heteroscedastic_base(C d, const LossParams<C>& p) {
  if constexpr (K == LossKind::SmoothL1) {
    const C z = abs_of(d);
    const C quadratic = divide_by_param<kDivision>(mul_rn(mul_rn(C(0.5), z), z), p);
    return z < p.param ? quadratic : sub_rn(z, mul_rn(C(0.5), p.param));
  } else {
    return loss_value<K, kDivision>(d, p);
  }
}

// Loss of one element; d = input - target, s = log_var.
template <LossKind K, ParamDivision kDivision, typename C>
FUSEDMTL_HOST_DEVICE C heteroscedastic_value(C d, C s, const LossParams<C>& p) {
  const C base = heteroscedastic_base<K, kDivision>(d, p);
  return mul_rn(heteroscedastic_weight<K, C>(), add_rn(mul_rn(exp_of(-s), base), s));
}

template <typename C>
struct HeteroscedasticGrad {
  C input;    // d loss / d input times grad_output; the target's is its negation
  C log_var;  // d loss / d log_var times grad_output
};

// Gradients of one element times its grad_output g; p.norm is 1/N for reduction='mean', else 1.
// Shares exp(-s) and b(d) with heteroscedastic_value: inlined side by side, the compiler computes
// them once.
template <LossKind K, ParamDivision kDivision, typename C>
FUSEDMTL_HOST_DEVICE HeteroscedasticGrad<C> heteroscedastic_grad(C d, C s, C g,
                                                                 const LossParams<C>& p) {
  const C precision = exp_of(-s);
  const C scale = mul_rn(g, p.norm);
  const C base = heteroscedastic_base<K, kDivision>(d, p);
  const C weight = heteroscedastic_weight<K, C>();
  return {mul_rn(scale, mul_rn(precision, heteroscedastic_slope<K, kDivision>(d, p))),
          mul_rn(scale, mul_rn(weight, sub_rn(C(1), mul_rn(precision, base))))};
}

}  // namespace fusedmtl::losses
