// Storage types of the CPU kernels and their conversions to the compute type, free of torch
// headers (see cpu_capability.h). fp16 uses the compiler's _Float16 (F16C instructions where the
// capability has them); bf16 is converted by bit manipulation with round-to-nearest-even, as
// c10::BFloat16 does.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace fusedmtl {

enum class ScalarKind : int { Float = 0, Double = 1, Half = 2, BFloat16 = 3 };

struct BFloat16Bits {
  uint16_t bits;
};

template <typename S>
struct ComputeTypeOf {
  using type = float;  // fp32, fp16 and bf16 compute and accumulate in fp32
};
template <>
struct ComputeTypeOf<double> {
  using type = double;
};
template <typename S>
using compute_t = typename ComputeTypeOf<S>::type;

template <typename S>
FUSEDMTL_HOST_DEVICE compute_t<S> to_compute(S value) {
  if constexpr (__is_same(S, BFloat16Bits)) {
    return __builtin_bit_cast(float, static_cast<uint32_t>(value.bits) << 16);
  } else {
    return static_cast<compute_t<S>>(value);
  }
}

template <typename S>
FUSEDMTL_HOST_DEVICE S from_compute(compute_t<S> value) {
  if constexpr (__is_same(S, BFloat16Bits)) {
    const uint32_t u = __builtin_bit_cast(uint32_t, value);
    const uint32_t rounded = (u + UINT32_C(0x7FFF) + ((u >> 16) & 1u)) >> 16;
    return BFloat16Bits{static_cast<uint16_t>(value != value ? UINT32_C(0x7FC0) : rounded)};
  } else {
    return static_cast<S>(value);
  }
}

}  // namespace fusedmtl
