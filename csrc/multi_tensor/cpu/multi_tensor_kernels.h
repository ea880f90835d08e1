// Interface of the per-instruction-set CPU multi-tensor kernels (no torch types, see
// common/cpu_capability.h). Each call handles one contiguous range of one parameter for the k tasks
// whose gradient reaches it; the caller passes only those (no null pointers).
#pragma once

#include <cstdint>

#include "common/cpu_capability.h"
#include "common/cpu_scalar.h"

namespace fusedmtl::multi_tensor::cpu {

// Adds to out[i * k + j] (i <= j; only the upper triangle, or only the diagonal when
// diagonal_only) the inner products of grads[i][0:n] and grads[j][0:n], accumulated in the
// compute type (fp32 for fp32/fp16/bf16, fp64 for fp64) before being added in double.
using GramianBlockFn = void(ScalarKind dtype, const void* const* grads, int k, int64_t n,
                            bool diagonal_only, double* out);

// out[0:n] (+)= sum_i coeffs[i] * grads[i][0:n], summed in the compute type in task order.
using CombineBlockFn = void(ScalarKind dtype, const void* const* grads, const double* coeffs, int k,
                            int64_t n, void* out, bool accumulate);

// Returns l1 * sum |w| + l2 * sum w^2 over w[0:n] and writes (overwrite) or adds into grad[0:n]
// l1 * sign(w) + 2 * l2 * w.
using PenaltyBlockFn = double(ScalarKind dtype, const void* w, void* grad, bool overwrite,
                              int64_t n, double l1, double l2);

// Masks grads[i][0:n] in place (i < k) to the elements whose value ranks in [trim, k - trim)
// among the k values of their coordinate (multi_tensor_math.h, sorts_before), times 0 elsewhere.
using TrimBlockFn = void(ScalarKind dtype, void* const* grads, int k, int64_t n, int trim);

// GradDrop's masks in place over grads[i][0:n] (i < k), with uniform[0:n] (the gradients' dtype)
// and the k leaks: g_i *= leak_i + (1 - leak_i) M_i (multi_tensor_math.h, sign_purity).
using SignDropoutBlockFn = void(ScalarKind dtype, void* const* grads, int k, int64_t n,
                                const void* uniform, const double* leak);

}  // namespace fusedmtl::multi_tensor::cpu
