// Fused regression-loss kernels over a contiguous range, compiled once per CPU capability.
//
// One pass reads input and target (and log_var for the heteroscedastic losses) and writes any
// subset of: the element-wise loss, the sum of the losses, the gradient w.r.t. input, the gradient
// w.r.t. target (regression losses) or w.r.t. log_var (heteroscedastic losses). The inner loop
// handles kLanes elements with independent accumulators so that it vectorizes without reassociating
// float sums (no -ffast-math) and keeps enough additions in flight to hide their latency.
#include "losses/cpu/loss_kernels.h"

#include <cmath>
#include <cstdint>

namespace fusedmtl::losses::cpu::FUSEDMTL_CPU_NS {
namespace {

constexpr int kLanes = 32;

// What a specialisation computes, as bits of its template argument.
enum Mode : unsigned {
  kReduce = 1u,  // sum of the losses
  kLoss = 2u,    // element-wise loss
  kGradInput = 4u,
  kGradTarget = 8u,
  kGradTensor = 16u,  // grad_output is element-wise rather than one scalar
  kGradLogVar = 32u,  // heteroscedastic losses only
};

template <typename C>
C pairwise_sum(C* values, int count) {
  for (int width = count / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) values[j] += values[j + width];
  }
  return values[0];
}

// kLogVar: the heteroscedastic loss of K (heteroscedastic_math.h) rather than K itself.
template <LossKind K, ParamDivision kDivision, bool kLogVar, typename S, unsigned kMode>
double loss_range(const LossKernelArgs& args, int64_t begin, int64_t end) {
  using C = compute_t<S>;
  const S* __restrict__ input = static_cast<const S*>(args.input);
  const S* __restrict__ target = static_cast<const S*>(args.target);
  const S* __restrict__ log_var = static_cast<const S*>(args.log_var);
  S* __restrict__ loss = static_cast<S*>(args.loss);
  S* __restrict__ grad_input = static_cast<S*>(args.grad_input);
  S* __restrict__ grad_target = static_cast<S*>(args.grad_target);
  S* __restrict__ grad_log_var = static_cast<S*>(args.grad_log_var);
  const S* __restrict__ grad_output = static_cast<const S*>(args.grad_output);
  LossParams<C> params;
  params.param = static_cast<C>(args.param);
  params.inv_param = static_cast<C>(1.0 / args.param);
  params.norm = static_cast<C>(args.norm);
  params.grad_scale = static_cast<C>(args.grad_scale);

  C acc[kLanes] = {};
  auto element = [&](int64_t i, C& sum) __attribute__((always_inline)) {
    const C d = to_compute(input[i]) - to_compute(target[i]);
    C s = C(0);
    if constexpr (kLogVar) s = to_compute(log_var[i]);
    if constexpr ((kMode & (kReduce | kLoss)) != 0) {
      C value;
      if constexpr (kLogVar) {
        value = heteroscedastic_value<K, kDivision>(d, s, params);
      } else {
        value = loss_value<K, kDivision>(d, params);
      }
      if constexpr ((kMode & kReduce) != 0) sum += value;
      if constexpr ((kMode & kLoss) != 0) loss[i] = from_compute<S>(value);
    }
    if constexpr ((kMode & (kGradInput | kGradTarget | kGradLogVar)) != 0) {
      C g = params.grad_scale;
      if constexpr ((kMode & kGradTensor) != 0) g = to_compute(grad_output[i]);
      if constexpr (kLogVar) {
        const HeteroscedasticGrad<C> grad = heteroscedastic_grad<K, kDivision>(d, s, g, params);
        if constexpr ((kMode & kGradInput) != 0) grad_input[i] = from_compute<S>(grad.input);
        if constexpr ((kMode & kGradLogVar) != 0) grad_log_var[i] = from_compute<S>(grad.log_var);
      } else {
        const C grad = loss_grad<K, kDivision>(d, g, params);
        if constexpr ((kMode & kGradInput) != 0) grad_input[i] = from_compute<S>(grad);
        if constexpr ((kMode & kGradTarget) != 0) grad_target[i] = from_compute<S>(-grad);
      }
    }
  };

  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    // omp simd (-fopenmp-simd, no threads): the lanes are independent, so vectorize them whatever
    // the cost model thinks. Left to the SLP vectorizer, one instantiation (Huber, bfloat16,
    // AVX-512) fell back to branchy scalar code, 25x slower, when unrelated ones were added.
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) element(i + j, acc[j]);
  }
  for (int j = 0; i < end; ++i, ++j) element(i, acc[j]);
  if constexpr ((kMode & kReduce) != 0) {
    return static_cast<double>(pairwise_sum(acc, kLanes));
  } else {
    return 0.0;
  }
}

// Runtime arguments -> template arguments. The two gradients besides the input's are the target's
// (regression losses) or log_var's (heteroscedastic losses), so each family has as many
// specialisations as the other.
template <LossKind K, ParamDivision kDivision, bool kLogVar, typename S>
double with_mode(const LossKernelArgs& args, int64_t begin, int64_t end) {
  constexpr unsigned kGradOther = kLogVar ? kGradLogVar : kGradTarget;
  const unsigned mode =
      (args.reduce ? kReduce : 0u) | (args.loss ? kLoss : 0u) |
      (args.grad_input ? kGradInput : 0u) | (args.grad_target ? kGradTarget : 0u) |
      (args.grad_log_var ? kGradLogVar : 0u) | (args.grad_output ? kGradTensor : 0u);
  switch (mode) {
#define FUSEDMTL_MODE_CASE(m) \
  case (m):                   \
    return loss_range<K, kDivision, kLogVar, S, (m)>(args, begin, end);
    // forward: sum, element-wise loss, sum fused with the gradients
    FUSEDMTL_MODE_CASE(kReduce)
    FUSEDMTL_MODE_CASE(kLoss)
    FUSEDMTL_MODE_CASE(kReduce | kGradInput)
    FUSEDMTL_MODE_CASE(kReduce | kGradOther)
    FUSEDMTL_MODE_CASE(kReduce | kGradInput | kGradOther)
    // backward with a scalar or an element-wise grad_output
    FUSEDMTL_MODE_CASE(kGradInput)
    FUSEDMTL_MODE_CASE(kGradOther)
    FUSEDMTL_MODE_CASE(kGradInput | kGradOther)
    FUSEDMTL_MODE_CASE(kGradInput | kGradTensor)
    FUSEDMTL_MODE_CASE(kGradOther | kGradTensor)
    FUSEDMTL_MODE_CASE(kGradInput | kGradOther | kGradTensor)
#undef FUSEDMTL_MODE_CASE
    default:
      return 0.0;  // nothing asked for
  }
}

// The cheapest exact way to divide by a smooth-L1 beta (see ParamDivision).
ParamDivision param_division(double beta) {
  int exponent;
  if (beta == 1.0) return ParamDivision::kByOne;
  return std::frexp(beta, &exponent) == 0.5 ? ParamDivision::kMultiplyByInverse
                                            : ParamDivision::kDivide;
}

template <bool kLogVar, typename S>
double with_kind(const LossKernelArgs& args, int64_t begin, int64_t end) {
  return dispatch_kind(args.kind, [&](auto kind_tag) -> double {
    constexpr LossKind K = decltype(kind_tag)::value;
    if constexpr (kLogVar && !has_heteroscedastic_form(K)) {
      return 0.0;  // rejected by the argument checks
    } else if constexpr (uses_param_division(K)) {
      // The division, the slowest instruction of the loop, only where it is needed.
      switch (param_division(args.param)) {
        case ParamDivision::kByOne:
          return with_mode<K, ParamDivision::kByOne, kLogVar, S>(args, begin, end);
        case ParamDivision::kMultiplyByInverse:
          return with_mode<K, ParamDivision::kMultiplyByInverse, kLogVar, S>(args, begin, end);
        case ParamDivision::kDivide:
          return with_mode<K, ParamDivision::kDivide, kLogVar, S>(args, begin, end);
      }
      return 0.0;
    } else {
      return with_mode<K, ParamDivision::kMultiplyByInverse, kLogVar, S>(args, begin, end);
    }
  });
}

template <typename S>
double with_family(const LossKernelArgs& args, int64_t begin, int64_t end) {
  return args.log_var != nullptr ? with_kind<true, S>(args, begin, end)
                                 : with_kind<false, S>(args, begin, end);
}

}  // namespace

double loss_block(const LossKernelArgs& args, int64_t begin, int64_t end) {
  switch (args.dtype) {
    case ScalarKind::Float:
      return with_family<float>(args, begin, end);
    case ScalarKind::Double:
      return with_family<double>(args, begin, end);
    case ScalarKind::Half:
      return with_family<_Float16>(args, begin, end);
    case ScalarKind::BFloat16:
      return with_family<BFloat16Bits>(args, begin, end);
  }
  return 0.0;
}

}  // namespace fusedmtl::losses::cpu::FUSEDMTL_CPU_NS
