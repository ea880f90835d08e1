// Per-element math of the heteroscedastic regression losses (Kendall & Gal 2017), shared by the
// CPU kernels and the CUDA kernels like loss_math.h, whose base losses it reuses.
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

// exp(x). On the GPU the CUDA math library's. On the CPU a branch-free polynomial instead of libm:
// without -ffast-math GCC never vectorizes a call to std::exp, which would make the loop scalar and
// several times slower; and plain arithmetic rounds identically on every instruction set (the
// kernels are built with -ffp-contract=off), so the per-ISA builds stay bitwise equal.
// float: Cephes' expf (within 1 ulp); double: Taylor series to degree 13, whose truncation error
// on |r| <= ln(2)/2 is 4e-18 (within 1 ulp). Overflow gives inf, underflow 0 (via subnormals), NaN
// stays NaN.
FUSEDMTL_HOST_DEVICE float exp_of(float x) {
#ifdef __CUDA_ARCH__
  return ::expf(x);
#else
  // Beyond these, exp(x) is inf (above log(FLT_MAX) = 88.72) or rounds to 0: clamping keeps n in
  // range. Comparisons with NaN are false, so a NaN passes through.
  x = x > 89.0f ? 89.0f : (x < -104.0f ? -104.0f : x);
  // n = round(x / ln 2) by the add-and-subtract trick: the low bits of `shifted` hold n.
  constexpr float kShift = 0x1.8p23f;
  const float shifted = x * 1.44269504088896341f + kShift;
  const float n = shifted - kShift;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;  // x - n ln 2 (Cody-Waite)
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float exp_r = p * (r * r) + r + 1.0f;
  // times 2^n in two halves, each a normal power of two even where the result is subnormal or
  // overflows, so that the result is rounded once.
  const int32_t n_int = static_cast<int32_t>(__builtin_bit_cast(uint32_t, shifted) -
                                             __builtin_bit_cast(uint32_t, kShift));
  const int32_t half = n_int >> 1;
  const float scale_a = __builtin_bit_cast(float, static_cast<uint32_t>(half + 127) << 23);
  const float scale_b = __builtin_bit_cast(float, static_cast<uint32_t>(n_int - half + 127) << 23);
  return exp_r * scale_a * scale_b;
#endif
}

FUSEDMTL_HOST_DEVICE double exp_of(double x) {
#ifdef __CUDA_ARCH__
  return ::exp(x);
#else
  x = x > 710.0 ? 710.0 : (x < -746.0 ? -746.0 : x);
  constexpr double kShift = 0x1.8p52;
  const double shifted = x * 1.4426950408889634074 + kShift;
  const double n = shifted - kShift;
  // ln 2 = kLn2Hi + kLn2Lo, kLn2Hi with trailing zero bits so that n * kLn2Hi is exact
  const double r = (x - n * 0x1.62e42fee00000p-1) - n * 0x1.a39ef35793c76p-33;
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  const double exp_r = p * (r * r) + r + 1.0;
  const int64_t n_int = static_cast<int64_t>(__builtin_bit_cast(uint64_t, shifted) -
                                             __builtin_bit_cast(uint64_t, kShift));
  // floor(n / 2) by a logical shift of the biased value: AVX2 has no 64-bit arithmetic shift
  const int64_t half = static_cast<int64_t>(static_cast<uint64_t>(n_int + 2048) >> 1) - 1024;
  const double scale_a = __builtin_bit_cast(double, static_cast<uint64_t>(half + 1023) << 52);
  const double scale_b = __builtin_bit_cast(double, static_cast<uint64_t>(n_int - half + 1023) << 52);
  return exp_r * scale_a * scale_b;
#endif
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

// Loss of one element; d = input - target, s = log_var.
template <LossKind K, ParamDivision kDivision, typename C>
FUSEDMTL_HOST_DEVICE C heteroscedastic_value(C d, C s, const LossParams<C>& p) {
  return heteroscedastic_weight<K, C>() * (exp_of(-s) * loss_value<K, kDivision>(d, p) + s);
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
  const C scale = g * p.norm;
  const C base = loss_value<K, kDivision>(d, p);
  return {scale * (precision * heteroscedastic_slope<K, kDivision>(d, p)),
          scale * (heteroscedastic_weight<K, C>() * (C(1) - precision * base))};
}

}  // namespace fusedmtl::losses
