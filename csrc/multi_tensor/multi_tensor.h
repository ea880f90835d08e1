// The multi-tensor ops' implementations; schemas in csrc/torch_bindings.cpp.
//
// Task gradients arrive as one list of K * P optional tensors, row-major: task i's gradient of
// parameter p at index i * P + p; None means the task does not reach the parameter (zeros).
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <optional>

namespace fusedmtl::multi_tensor {

using TaskGrads = c10::List<std::optional<at::Tensor>>;

// K x K Gramian of the task gradients (diagonal_only: the K squared norms), float32 for
// float32/float16/bfloat16 gradients, float64 for float64.
at::Tensor gramian_cpu(const TaskGrads& grads, int64_t num_tasks, bool diagonal_only);

// out[p] (+)= sum_i coeffs[i] * grads[i * P + p], for P contiguous out tensors of the grads' dtype.
void combine_cpu(const TaskGrads& grads, int64_t num_tasks, const at::Tensor& coeffs,
                 at::TensorList out, bool accumulate);

// sum_i grads_i / (norm(grads_i) + eps) into out (as combine_cpu); returns the K norms.
at::Tensor normalized_sum_cpu(const TaskGrads& grads, int64_t num_tasks, double eps,
                              at::TensorList out, bool accumulate);

// l1 * sum |w| + l2 * sum w^2 over params; writes (overwrite) or adds l1 sign(w) + 2 l2 w into
// grads.
at::Tensor l1_l2_penalty_cpu(at::TensorList params, at::TensorList grads, bool overwrite, double l1,
                             double l2);

// Masks every gradient in place to the coordinates where its value ranks in [trim, K - trim)
// among the K tasks' values there (a stable ascending sort, NaN last): the coordinate-wise
// trimmed mean is then their sum / (K - 2 trim). grads: all K * P of them, contiguous.
void trim_cpu(at::TensorList grads, int64_t num_tasks, int64_t trim);

// GradDrop's masks with f the identity, in place: g_i *= leak_i + (1 - leak_i) M_i per element
// (docs/METHODS.md, section 4), U from uniforms[p]. grads: all K * P, contiguous.
void sign_dropout_cpu(at::TensorList grads, int64_t num_tasks, at::TensorList uniforms,
                      const at::Tensor& leak);

#ifdef FUSEDMTL_WITH_CUDA
at::Tensor gramian_cuda(const TaskGrads& grads, int64_t num_tasks, bool diagonal_only);
void combine_cuda(const TaskGrads& grads, int64_t num_tasks, const at::Tensor& coeffs,
                  at::TensorList out, bool accumulate);
at::Tensor normalized_sum_cuda(const TaskGrads& grads, int64_t num_tasks, double eps,
                               at::TensorList out, bool accumulate);
at::Tensor l1_l2_penalty_cuda(at::TensorList params, at::TensorList grads, bool overwrite,
                              double l1, double l2);
void trim_cuda(at::TensorList grads, int64_t num_tasks, int64_t trim);
void sign_dropout_cuda(at::TensorList grads, int64_t num_tasks, at::TensorList uniforms,
                       const at::Tensor& leak);
#endif

}  // namespace fusedmtl::multi_tensor
