// Multi-tensor kernels over one contiguous range, compiled once per CPU capability.
//
// The Gramian reads each element of the k gradients once and updates all k(k+1)/2 products from
// registers; for k <= kMaxUnrolledTasks the task count is a template argument so that the
// accumulators (kLanes wide per pair) stay in vector registers.
#include <cmath>
#include <cstdint>

#include "multi_tensor/cpu/multi_tensor_kernels.h"

namespace fusedmtl::multi_tensor::cpu::FUSEDMTL_CPU_NS {
namespace {

constexpr int kLanes = 16;
constexpr int kMaxUnrolledTasks = 8;
constexpr int kMaxTasks = 64;

template <typename S>
compute_t<S> load(const void* p, int64_t e) {
  return to_compute(static_cast<const S*>(p)[e]);
}

// kK > 0: the task count at compile time; kK == 0: k at run time (up to kMaxTasks).
template <int kK, typename S>
void gramian_range(const void* const* grads, int k_runtime, int64_t n, bool diagonal_only,
                   double* out) {
  using C = compute_t<S>;
  const int k = kK > 0 ? kK : k_runtime;
  constexpr int kSlots = kK > 0 ? kK * (kK + 1) / 2 : kMaxTasks * (kMaxTasks + 1) / 2;
  const int pairs = diagonal_only ? k : k * (k + 1) / 2;
  C acc[kSlots][kLanes];
  for (int q = 0; q < pairs; ++q) {
    for (int l = 0; l < kLanes; ++l) acc[q][l] = C(0);
  }
  const S* g[kK > 0 ? kK : kMaxTasks];
  for (int i = 0; i < k; ++i) g[i] = static_cast<const S*>(grads[i]);

  int64_t e = 0;
  for (; e + kLanes <= n; e += kLanes) {
    C v[kK > 0 ? kK : kMaxTasks][kLanes];
    for (int i = 0; i < k; ++i) {
      for (int l = 0; l < kLanes; ++l) v[i][l] = to_compute(g[i][e + l]);
    }
    if (diagonal_only) {
      for (int i = 0; i < k; ++i) {
        for (int l = 0; l < kLanes; ++l) acc[i][l] += v[i][l] * v[i][l];
      }
    } else {
      int q = 0;
      for (int i = 0; i < k; ++i) {
        for (int j = i; j < k; ++j, ++q) {
          for (int l = 0; l < kLanes; ++l) acc[q][l] += v[i][l] * v[j][l];
        }
      }
    }
  }
  for (int l = 0; e < n; ++e, ++l) {
    int q = 0;
    for (int i = 0; i < k; ++i) {
      const C vi = to_compute(g[i][e]);
      if (diagonal_only) {
        acc[i][l] += vi * vi;
        continue;
      }
      for (int j = i; j < k; ++j, ++q) acc[q][l] += vi * to_compute(g[j][e]);
    }
  }
  // Lanes are added pairwise, a fixed order: the result depends only on the range.
  int q = 0;
  for (int i = 0; i < k; ++i) {
    for (int j = i; j < (diagonal_only ? i + 1 : k); ++j, ++q) {
      for (int width = kLanes / 2; width > 0; width /= 2) {
        for (int l = 0; l < width; ++l) acc[q][l] += acc[q][l + width];
      }
      out[i * k + j] += static_cast<double>(acc[q][0]);
    }
  }
}

template <int kK, typename S>
void combine_range(const void* const* grads, const double* coeffs, int k_runtime, int64_t n,
                   void* out_, bool accumulate) {
  using C = compute_t<S>;
  const int k = kK > 0 ? kK : k_runtime;
  S* __restrict__ out = static_cast<S*>(out_);
  const S* g[kK > 0 ? kK : kMaxTasks];
  C c[kK > 0 ? kK : kMaxTasks];
  for (int i = 0; i < k; ++i) {
    g[i] = static_cast<const S*>(grads[i]);
    c[i] = static_cast<C>(coeffs[i]);
  }
  for (int64_t e = 0; e < n; ++e) {
    C sum = accumulate ? to_compute(out[e]) : C(0);
    for (int i = 0; i < k; ++i) sum += c[i] * to_compute(g[i][e]);
    out[e] = from_compute<S>(sum);
  }
}

template <typename S>
double penalty_range(const void* w_, void* grad_, bool overwrite, int64_t n, double l1_,
                     double l2_) {
  using C = compute_t<S>;
  const S* __restrict__ w = static_cast<const S*>(w_);
  S* __restrict__ grad = static_cast<S*>(grad_);
  const C l1 = static_cast<C>(l1_);
  const C two_l2 = static_cast<C>(2 * l2_);
  C abs_acc[kLanes] = {};
  C sq_acc[kLanes] = {};
  auto element = [&](int64_t e, int l) __attribute__((always_inline)) {
    const C x = to_compute(w[e]);
    const C sign = x > C(0) ? C(1) : (x < C(0) ? C(-1) : C(0));
    abs_acc[l] += x < C(0) ? -x : x;
    sq_acc[l] += x * x;
    const C g = l1 * sign + two_l2 * x;
    grad[e] = from_compute<S>(overwrite ? g : to_compute(grad[e]) + g);
  };
  int64_t e = 0;
  for (; e + kLanes <= n; e += kLanes) {
    for (int l = 0; l < kLanes; ++l) element(e + l, l);
  }
  for (int l = 0; e < n; ++e, ++l) element(e, l);
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) {
      abs_acc[l] += abs_acc[l + width];
      sq_acc[l] += sq_acc[l + width];
    }
  }
  return l1_ * static_cast<double>(abs_acc[0]) + l2_ * static_cast<double>(sq_acc[0]);
}

template <typename S, typename Visitor>
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
    with_task_count<S>(k, [&](auto tasks) {
      gramian_range<decltype(tasks)::value, S>(grads, k, n, diagonal_only, out);
    });
  });
}

void combine_block(ScalarKind dtype, const void* const* grads, const double* coeffs, int k,
                   int64_t n, void* out, bool accumulate) {
  with_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    with_task_count<S>(k, [&](auto tasks) {
      combine_range<decltype(tasks)::value, S>(grads, coeffs, k, n, out, accumulate);
    });
  });
}

double penalty_block(ScalarKind dtype, const void* w, void* grad, bool overwrite, int64_t n,
                     double l1, double l2) {
  return with_dtype(dtype, [&](auto tag) {
    return penalty_range<decltype(tag)>(w, grad, overwrite, n, l1, l2);
  });
}

}  // namespace fusedmtl::multi_tensor::cpu::FUSEDMTL_CPU_NS
