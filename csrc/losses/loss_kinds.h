// The loss kinds, listed once: the LossKind enum, the kind strings the ops parse, and every switch
// over the kinds (CPU kernels, CUDA kernels, the eager path's exact-scaling rule) expand these
// lists. python/fusedmtl/losses/kinds.py is the same table for Python (a test checks they agree).
// Adding a kind: a line here, its element math in loss_math.h, a row in kinds.py.
#pragma once

#include <type_traits>

// X(Enum, "name", code, uses_param_division, scales_exactly_at_any_numel)
// - uses_param_division: the element math divides by the parameter (ParamDivision applies);
// - scales_exactly_at_any_numel: the gradient computed at grad_output 1, scaled by grad_output,
//   is bitwise torch's gradient at grad_output (float32/float64) for every element count; false
//   for L1, whose torch gradient is sign(d) * (grad_output / N): scaling sign(d) * (1 / N) gives
//   the same bits only when 1 / N is exact (reduction sum, or N a power of two).
#define FUSEDMTL_REGRESSION_KINDS(X)      \
  X(L1, "l1", 0, false, false)            \
  X(MSE, "mse", 1, false, true)           \
  X(SmoothL1, "smooth_l1", 2, true, true) \
  X(Huber, "huber", 3, false, true)

// The heteroscedastic losses, by their base loss: X(BaseEnum, "name"). The Gaussian form is named
// 'l2' (0.5 exp(-s) d^2 + 0.5 s is not the mean squared error); Huber has no such form.
#define FUSEDMTL_HETEROSCEDASTIC_KINDS(X) \
  X(MSE, "l2")                            \
  X(L1, "l1")                             \
  X(SmoothL1, "smooth_l1")

namespace fusedmtl::losses {

// The values are part of the op schema contract with Python (python/fusedmtl/losses/kinds.py).
enum class LossKind : int {
#define FUSEDMTL_KIND_ENUM(name, str, code, divides, scales) name = code,
  FUSEDMTL_REGRESSION_KINDS(FUSEDMTL_KIND_ENUM)
#undef FUSEDMTL_KIND_ENUM
};

constexpr bool uses_param_division(LossKind kind) {
#define FUSEDMTL_KIND_DIVIDES(name, str, code, divides, scales) \
  if (kind == LossKind::name) return divides;
  FUSEDMTL_REGRESSION_KINDS(FUSEDMTL_KIND_DIVIDES)
#undef FUSEDMTL_KIND_DIVIDES
  return false;
}

constexpr bool scales_exactly_at_any_numel(LossKind kind) {
#define FUSEDMTL_KIND_SCALES(name, str, code, divides, scales) \
  if (kind == LossKind::name) return scales;
  FUSEDMTL_REGRESSION_KINDS(FUSEDMTL_KIND_SCALES)
#undef FUSEDMTL_KIND_SCALES
  return false;
}

// Whether a heteroscedastic loss has `kind` as its base loss.
constexpr bool has_heteroscedastic_form(LossKind kind) {
#define FUSEDMTL_KIND_HETEROSCEDASTIC(name, str) \
  if (kind == LossKind::name) return true;
  FUSEDMTL_HETEROSCEDASTIC_KINDS(FUSEDMTL_KIND_HETEROSCEDASTIC)
#undef FUSEDMTL_KIND_HETEROSCEDASTIC
  return false;
}

// Calls f(std::integral_constant<LossKind, K>{}) for the K equal to `kind`: the one switch over the
// kinds, which every kernel dispatch goes through.
template <typename F>
decltype(auto) dispatch_kind(LossKind kind, F&& f) {
  switch (kind) {
#define FUSEDMTL_KIND_CASE(name, str, code, divides, scales) \
  case LossKind::name:                                       \
    return f(std::integral_constant<LossKind, LossKind::name>{});
    FUSEDMTL_REGRESSION_KINDS(FUSEDMTL_KIND_CASE)
#undef FUSEDMTL_KIND_CASE
  }
  return f(std::integral_constant<LossKind, LossKind::L1>{});  // unreachable: kinds are parsed
}

}  // namespace fusedmtl::losses
