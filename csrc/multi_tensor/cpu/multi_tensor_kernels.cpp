// Multi-tensor kernels over one contiguous range, compiled once per CPU capability.
//
// The Gramian reads each element of the k gradients from memory once (a tile at a time, then from
// L1 for each group of pairs) and keeps the accumulators of a group in registers; for k <= 8
// (with_task_count) the task count is a template argument. Element e of a range goes to lane
// e % kLanes (a zero-padded tail to lanes 0, 1, ...) and the lanes are summed pairwise at the end:
// every capability, and the run-time-k path, gives bitwise the same sums.
#include "multi_tensor/cpu/multi_tensor_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/cpu_vector.h"
#include "multi_tensor/multi_tensor_math.h"

namespace fusedmtl::multi_tensor::cpu::FUSEDMTL_CPU_NS {
namespace {

using namespace ::fusedmtl::simd::FUSEDMTL_CPU_NS;

constexpr int kMaxTasks = 64;

// kK > 0: the task count at compile time; kK == 0: k at run time (up to kMaxTasks).
template <int kK>
constexpr int task_capacity = kK > 0 ? kK : kMaxTasks;

// Calls block(offset, lanes) for every kWidth-element block of [0, n), the last one partial.
template <int kWidth = kLanes, typename Block>
__attribute__((always_inline)) inline void for_each_block(int64_t n, const Block& block) {
  int64_t e = 0;
  for (; e + kWidth <= n; e += kWidth) block(e, kWidth);
  if (e < n) block(e, static_cast<int>(n - e));
}

template <int kWidth = kLanes, typename S>
__attribute__((always_inline)) inline Vec<S, kWidth> load_block(const S* p, int lanes) {
  return lanes == kWidth ? load<S, kWidth>(p) : load_partial<S, kWidth>(p, lanes);
}

template <int kWidth = kLanes, typename S>
__attribute__((always_inline)) inline void store_block(S* p, Vec<S, kWidth> v, int lanes) {
  if (lanes == kWidth) {
    store<S, kWidth>(p, v);
  } else {
    store_partial<S, kWidth>(p, v, lanes);
  }
}

// The Gramian goes over a range one tile (L1-resident) at a time, and within a tile one row i at a
// time, a group of its pairs (i, j) per sweep, each accumulator held as register-wide parts
// (kPartLanes): all k(k+1)/2 accumulators of k = 4 in 16 lanes would need 20 of AVX2's 16 ymm
// registers, and GCC then kept every one on the stack. Each pair still adds the same blocks in the
// same order, lane by lane, so the sums are bitwise those of a single sweep on any capability.
constexpr int64_t kTile = 64 * kLanes;  // a whole number of blocks: the same blocks as one sweep

// The pairs of a sweep: about 8 registers of accumulators (4 on AVX2 in fp32, 2 in fp64).
template <typename S>
constexpr int kPairGroup = 8 * kPartLanes<S> / kLanes > 1 ? 8 * kPartLanes<S> / kLanes : 1;

// acc[b] += gi * gj[b] over the blocks of [0, n), for kCount pairs of one row (kSquares: the
// diagonal, acc[b] += gj[b] * gj[b]).
template <int kCount, bool kSquares, typename S>
__attribute__((always_inline)) inline void accumulate_pairs(const S* gi, const S* const* gj,
                                                            Vec<S>* acc, int64_t n) {
  constexpr int kWidth = kPartLanes<S>;
  constexpr int kParts = kLanes / kWidth;
  using Part = Vec<S, kWidth>;
  Part a[kCount][kParts];
  std::memcpy(a, acc, sizeof a);  // (kParts parts of kWidth lanes: the same bytes as kCount Vecs)
  int64_t e = 0;
  for (; e + kLanes <= n; e += kLanes) {
    for (int p = 0; p < kParts; ++p) {
      const Part vi = kSquares ? Part{} : load<S, kWidth>(gi + e + p * kWidth);
      for (int b = 0; b < kCount; ++b) {
        const Part vj = load<S, kWidth>(gj[b] + e + p * kWidth);
        a[b][p] += (kSquares ? vj : vi) * vj;
      }
    }
  }
  std::memcpy(acc, a, sizeof a);
  if (e < n) {  // the zero-padded tail, whole vectors
    const int lanes = static_cast<int>(n - e);
    const Vec<S> vi = kSquares ? Vec<S>{} : load_partial(gi + e, lanes);
    for (int b = 0; b < kCount; ++b) {
      const Vec<S> vj = load_partial(gj[b] + e, lanes);
      acc[b] += (kSquares ? vj : vi) * vj;
    }
  }
}

// accumulate_pairs for a run-time count in [1, kCount].
template <int kCount, bool kSquares, typename S>
void accumulate_group(int count, const S* gi, const S* const* gj, Vec<S>* acc, int64_t n) {
  if constexpr (kCount > 1) {
    if (count < kCount) return accumulate_group<kCount - 1, kSquares>(count, gi, gj, acc, n);
  }
  accumulate_pairs<kCount, kSquares>(gi, gj, acc, n);
}

template <int kK, bool kDiagonal, typename S>
void gramian_range(const void* const* grads, int k_runtime, int64_t n, double* out) {
  constexpr int kCapacity = task_capacity<kK>;
  const int k = kK > 0 ? kK : k_runtime;
  const S* g[kCapacity];
  Vec<S> acc[kDiagonal ? kCapacity : kCapacity * (kCapacity + 1) / 2];
  const int pairs = kDiagonal ? k : k * (k + 1) / 2;
  for (int q = 0; q < pairs; ++q) acc[q] = Vec<S>{};

  for (int64_t tile = 0; tile < n; tile += kTile) {
    const int64_t length = std::min(kTile, n - tile);
    for (int i = 0; i < k; ++i) g[i] = static_cast<const S*>(grads[i]) + tile;
    if constexpr (kDiagonal) {
      for (int j = 0; j < k; j += kPairGroup<S>) {
        accumulate_group<kPairGroup<S>, true>(std::min(kPairGroup<S>, k - j), g[j], g + j, acc + j,
                                              length);
      }
    } else {
      int q = 0;  // the pair (i, i)
      for (int i = 0; i < k; ++i) {
        for (int j = i; j < k; j += kPairGroup<S>) {
          accumulate_group<kPairGroup<S>, false>(std::min(kPairGroup<S>, k - j), g[i], g + j,
                                                 acc + q + (j - i), length);
        }
        q += k - i;
      }
    }
  }
  int q = 0;
  for (int i = 0; i < k; ++i) {
    for (int j = i; j < (kDiagonal ? i + 1 : k); ++j, ++q) {
      out[i * k + j] += static_cast<double>(pairwise_sum(acc[q]));
    }
  }
}

template <int kK, bool kAccumulate, typename S>
void combine_range(const void* const* grads, const double* coeffs, int k_runtime, int64_t n,
                   void* out_) {
  using C = compute_t<S>;
  constexpr int kCapacity = task_capacity<kK>;
  const int k = kK > 0 ? kK : k_runtime;
  S* out = static_cast<S*>(out_);
  const S* g[kCapacity];
  C c[kCapacity];
  for (int i = 0; i < k; ++i) {
    g[i] = static_cast<const S*>(grads[i]);
    c[i] = static_cast<C>(coeffs[i]);
  }
  constexpr int kWidth = kPartLanes<S>;  // (each coordinate on its own: any width, the same bits)
  for_each_block<kWidth>(n, [&](int64_t e, int lanes) __attribute__((always_inline)) {
    Vec<S, kWidth> sum = kAccumulate ? load_block<kWidth>(out + e, lanes) : Vec<S, kWidth>{};
    for (int i = 0; i < k; ++i) sum = add_scaled(sum, c[i], load_block<kWidth>(g[i] + e, lanes));
    store_block<kWidth>(out + e, sum, lanes);
  });
}

// The sums of |w| and w^2 are kept per lane of kLanes (a block's element e in lane e % kLanes, as
// the Gramian's), stepping kWidth register-wide lanes at a time with part p = the lanes
// [p kWidth, (p + 1) kWidth) of a block.
template <bool kOverwrite, typename S>
double penalty_range(const void* w_, void* grad_, int64_t n, double l1_, double l2_) {
  using C = compute_t<S>;
  constexpr int kWidth = kPartLanes<S>;
  constexpr int kParts = kLanes / kWidth;
  using V = Vec<S, kWidth>;
  const S* w = static_cast<const S*>(w_);
  S* grad = static_cast<S*>(grad_);
  const C l1 = static_cast<C>(l1_);
  const C two_l2 = static_cast<C>(2 * l2_);
  const V zero{};
  V abs_acc[kParts] = {};
  V sq_acc[kParts] = {};
  const auto part = [&](int64_t e, int lanes, int p) __attribute__((always_inline)) {
    const V x = load_block<kWidth>(w + e, lanes);
    // Comparisons give all-ones lanes (-1 as an integer): sign = (x > 0) - (x < 0).
    const V sign = __builtin_convertvector((x < zero) - (x > zero), V);
    abs_acc[p] += x < zero ? -x : x;
    sq_acc[p] += x * x;
    const V update = penalty_gradient(x, sign, l1, two_l2);
    const V result = kOverwrite ? update : load_block<kWidth>(grad + e, lanes) + update;
    store_block<kWidth>(grad + e, result, lanes);
  };
  int64_t e = 0;
  for (; e + kLanes <= n; e += kLanes) {
    for (int p = 0; p < kParts; ++p) part(e + p * kWidth, kWidth, p);
  }
  for (int p = 0; e < n; e += kWidth, ++p) {  // the tail (the parts past it would add zeros)
    part(e, static_cast<int>(std::min<int64_t>(kWidth, n - e)), p);
  }
  Vec<S> abs_sum, sq_sum;
  std::memcpy(&abs_sum, abs_acc, sizeof abs_sum);
  std::memcpy(&sq_sum, sq_acc, sizeof sq_sum);
  return l1_ * static_cast<double>(pairwise_sum(abs_sum)) +
         l2_ * static_cast<double>(pairwise_sum(sq_sum));
}

// k values per lane in registers (a block of kLanes coordinates at a time), each ranked against
// the other k - 1 with lane masks (-1 where true, so subtracting a mask counts), then every
// present gradient multiplied by its 0/1 keep factor: exact in every dtype (a dropped inf or NaN
// becomes NaN, as in the reference).
template <typename S>
void trim_range(void* const* grads, int k, int64_t n, int trim) {
  S* g[kMaxTasks];
  for (int i = 0; i < k; ++i) g[i] = static_cast<S*>(grads[i]);
  constexpr int kWidth = kPartLanes<S>;  // (each coordinate on its own: any width, the same bits)
  using V = Vec<S, kWidth>;
  for_each_block<kWidth>(n, [&](int64_t e, int lanes) __attribute__((always_inline)) {
    V v[kMaxTasks];
    for (int i = 0; i < k; ++i) v[i] = load_block<kWidth>(g[i] + e, lanes);
    for (int i = 0; i < k; ++i) {
      using Mask = decltype(v[0] < v[0]);
      Mask rank{};
      for (int j = 0; j < i; ++j) rank -= ~sorts_before(v[i], v[j]);
      for (int j = i + 1; j < k; ++j) rank -= sorts_before(v[j], v[i]);
      const Mask keep = (rank >= Mask{} + trim) & (rank < Mask{} + (k - trim));
      store_block<kWidth>(g[i] + e, v[i] * __builtin_convertvector(keep & 1, V), lanes);
    }
  });
}

// The k values per lane loaded once; the purity from their sums in task order, then each value
// times its factor (compute-type arithmetic, each operation rounded: the reference's bits).
template <typename S>
void sign_dropout_range(void* const* grads, int k, int64_t n, const void* uniform_,
                        const double* leak) {
  using C = compute_t<S>;
  S* g[kMaxTasks];
  C keep_leak[kMaxTasks], drop_rest[kMaxTasks];
  for (int i = 0; i < k; ++i) {
    g[i] = static_cast<S*>(grads[i]);
    keep_leak[i] = static_cast<C>(leak[i]);
    drop_rest[i] = C(1) - keep_leak[i];
  }
  const S* uniform = static_cast<const S*>(uniform_);
  constexpr int kWidth = kPartLanes<S>;  // (each coordinate on its own: any width, the same bits)
  using V = Vec<S, kWidth>;
  const V zero{};
  for_each_block<kWidth>(n, [&](int64_t e, int lanes) __attribute__((always_inline)) {
    V v[kMaxTasks];
    V total{}, magnitude{};
    for (int i = 0; i < k; ++i) {
      v[i] = load_block<kWidth>(g[i] + e, lanes);
      total += v[i];
      magnitude += v[i] < zero ? -v[i] : v[i];
    }
    const V purity = sign_purity<V, C>(total, magnitude);
    const V draw = load_block<kWidth>(uniform + e, lanes);
    const auto up = purity > draw;
    const auto down = purity < draw;
    for (int i = 0; i < k; ++i) {
      const auto kept = (up & (v[i] > zero)) | (down & (v[i] < zero));
      const V factor =
          sign_dropout_factor(keep_leak[i], drop_rest[i], __builtin_convertvector(kept & 1, V));
      store_block<kWidth>(g[i] + e, v[i] * factor, lanes);
    }
  });
}

template <typename Visitor>
auto with_flag(bool flag, Visitor&& visit) {
  return flag ? visit(std::true_type{}) : visit(std::false_type{});
}

template <typename Visitor>
void with_task_count(int k, Visitor&& visit) {
  switch (k) {
#define FUSEDMTL_TASKS_CASE(K) \
  case K:                      \
    return visit(std::integral_constant<int, K>{});
    FUSEDMTL_TASKS_CASE(1)
    FUSEDMTL_TASKS_CASE(2)
    FUSEDMTL_TASKS_CASE(3)
    FUSEDMTL_TASKS_CASE(4)
    FUSEDMTL_TASKS_CASE(5)
    FUSEDMTL_TASKS_CASE(6)
    FUSEDMTL_TASKS_CASE(7)
    FUSEDMTL_TASKS_CASE(8)
#undef FUSEDMTL_TASKS_CASE
    default:
      return visit(std::integral_constant<int, 0>{});
  }
}

template <typename Visitor>
auto with_dtype(ScalarKind dtype, Visitor&& visit) {
  switch (dtype) {
    case ScalarKind::Double:
      return visit(double{});
    case ScalarKind::Half:
      return visit(_Float16{});
    case ScalarKind::BFloat16:
      return visit(BFloat16Bits{});
    default:
      return visit(float{});
  }
}

}  // namespace

void gramian_block(ScalarKind dtype, const void* const* grads, int k, int64_t n, bool diagonal_only,
                   double* out) {
  with_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    with_task_count(k, [&](auto tasks) {
      with_flag(diagonal_only, [&](auto diagonal) {
        gramian_range<decltype(tasks)::value, decltype(diagonal)::value, S>(grads, k, n, out);
      });
    });
  });
}

void combine_block(ScalarKind dtype, const void* const* grads, const double* coeffs, int k,
                   int64_t n, void* out, bool accumulate) {
  with_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    with_task_count(k, [&](auto tasks) {
      with_flag(accumulate, [&](auto add) {
        combine_range<decltype(tasks)::value, decltype(add)::value, S>(grads, coeffs, k, n, out);
      });
    });
  });
}

double penalty_block(ScalarKind dtype, const void* w, void* grad, bool overwrite, int64_t n,
                     double l1, double l2) {
  return with_dtype(dtype, [&](auto tag) {
    return with_flag(overwrite, [&](auto overwriting) {
      return penalty_range<decltype(overwriting)::value, decltype(tag)>(w, grad, n, l1, l2);
    });
  });
}

void trim_block(ScalarKind dtype, void* const* grads, int k, int64_t n, int trim) {
  with_dtype(dtype, [&](auto tag) { trim_range<decltype(tag)>(grads, k, n, trim); });
}

void sign_dropout_block(ScalarKind dtype, void* const* grads, int k, int64_t n, const void* uniform,
                        const double* leak) {
  with_dtype(dtype,
             [&](auto tag) { sign_dropout_range<decltype(tag)>(grads, k, n, uniform, leak); });
}

}  // namespace fusedmtl::multi_tensor::cpu::FUSEDMTL_CPU_NS
