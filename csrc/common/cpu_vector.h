// A fixed number of lanes of the compute type as one GCC vector (GCC/Clang vector extensions), for
// CPU kernels whose loop nests the auto-vectorizer handles for some dtypes and task counts and not
// for others. Lane l always holds the same element, so results are bitwise the same on every
// instruction set: the compiler maps a vector to one zmm register, two ymm or four xmm.
//
// Include only from per-capability kernel translation units (see cpu_capability.h): everything here
// lives in FUSEDMTL_CPU_NS.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/cpu_capability.h"
#include "common/cpu_scalar.h"

namespace fusedmtl::simd::FUSEDMTL_CPU_NS {

// 16 lanes: 64 bytes of float (one AVX-512 register), and enough independent additions in flight
// to hide their latency.
constexpr int kLanes = 16;

template <typename T, int kWidth = kLanes>
struct VectorOf {
  typedef T type __attribute__((vector_size(kWidth * sizeof(T))));
};
// kWidth (kLanes) values of the compute type of the storage type S (fp32 for fp32/fp16/bf16, fp64
// for fp64).
template <typename S, int kWidth = kLanes>
using Vec = typename VectorOf<compute_t<S>, kWidth>::type;

// The bytes of this instruction set's widest registers, and the lanes of S's compute type one holds
// (at most kLanes). A kernel that keeps many vectors live across a loop holds each as
// kLanes / kPartLanes parts of that width: GCC lowers a wider vector type than the registers
// through the stack once it cannot keep all of it in registers (AVX2 has 16 ymm, and 16 lanes of
// float are two). Lane l of the parts is still lane l: the same arithmetic, bitwise.
#if defined(__AVX512F__)
constexpr int kRegisterBytes = 64;
#elif defined(__AVX__)
constexpr int kRegisterBytes = 32;
#else
constexpr int kRegisterBytes = 16;
#endif
template <typename S>
constexpr int kPartLanes = kRegisterBytes / static_cast<int>(sizeof(compute_t<S>)) < kLanes
                               ? kRegisterBytes / static_cast<int>(sizeof(compute_t<S>))
                               : kLanes;

#define FUSEDMTL_VEC_INLINE inline __attribute__((always_inline))

// Loads p[0:kWidth] converted to the compute type.
template <typename S, int kWidth = kLanes>
FUSEDMTL_VEC_INLINE Vec<S, kWidth> load(const S* p) {
  if constexpr (__is_same(S, BFloat16Bits)) {
    // The bits of a bfloat16 are the high half of the float's.
    typename VectorOf<uint16_t, kWidth>::type bits;
    std::memcpy(&bits, p, sizeof bits);
    return reinterpret_cast<Vec<S, kWidth>>(
        __builtin_convertvector(bits, typename VectorOf<uint32_t, kWidth>::type) << 16);
  } else {
    typename VectorOf<S, kWidth>::type raw;
    std::memcpy(&raw, p, sizeof raw);
    if constexpr (__is_same(S, compute_t<S>)) {
      return raw;
    } else {
      return __builtin_convertvector(raw, Vec<S, kWidth>);
    }
  }
}

// Stores v to p[0:kWidth] rounded to S (to nearest even, as from_compute does).
template <typename S, int kWidth = kLanes>
FUSEDMTL_VEC_INLINE void store(S* p, Vec<S, kWidth> v) {
  if constexpr (__is_same(S, BFloat16Bits)) {
    using U32 = typename VectorOf<uint32_t, kWidth>::type;
    const U32 u = reinterpret_cast<U32>(v);
    const U32 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const U32 is_nan = reinterpret_cast<U32>(v != v);           // all ones where NaN
    const U32 bits = (is_nan & 0x7FC0u) | (~is_nan & rounded);  // NaN stays a quiet NaN
    const auto narrow = __builtin_convertvector(bits, typename VectorOf<uint16_t, kWidth>::type);
    std::memcpy(p, &narrow, sizeof narrow);
  } else if constexpr (__is_same(S, compute_t<S>)) {
    std::memcpy(p, &v, sizeof v);
  } else {
    const auto narrow = __builtin_convertvector(v, typename VectorOf<S, kWidth>::type);
    std::memcpy(p, &narrow, sizeof narrow);
  }
}

// The first n < kWidth elements of p, zero-padded (+0.0 in every dtype), for a range's tail.
template <typename S, int kWidth = kLanes>
FUSEDMTL_VEC_INLINE Vec<S, kWidth> load_partial(const S* p, int n) {
  S padded[kWidth];
  std::memset(padded, 0, sizeof padded);
  std::memcpy(padded, p, n * sizeof(S));
  return load<S, kWidth>(padded);
}

template <typename S, int kWidth = kLanes>
FUSEDMTL_VEC_INLINE void store_partial(S* p, Vec<S, kWidth> v, int n) {
  S lanes[kWidth];
  store<S, kWidth>(lanes, v);
  std::memcpy(p, lanes, n * sizeof(S));
}

// The lanes added pairwise (lane l + lane l + width, halving the width): a fixed order.
template <typename V>
FUSEDMTL_VEC_INLINE auto pairwise_sum(const V& v) {
  using C = decltype(v[0] + 0);
  C lanes[kLanes];
  std::memcpy(lanes, &v, sizeof lanes);
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  }
  return lanes[0];
}

#undef FUSEDMTL_VEC_INLINE

}  // namespace fusedmtl::simd::FUSEDMTL_CPU_NS
