// Validation of task-gradient lists, shared by every device's implementation.
#pragma once

#include <vector>

#include "multi_tensor/multi_tensor.h"

namespace fusedmtl::multi_tensor {

// The task gradients checked and made contiguous: tensors[i * num_params + p] is undefined where
// the task does not reach the parameter; numel[p] is 0 for a parameter that no task reaches.
struct TaskGradTable {
  int64_t num_tasks = 0;
  int64_t num_params = 0;
  std::vector<at::Tensor> tensors;
  std::vector<int64_t> numel;
  at::ScalarType dtype = at::kFloat;
  at::Device device = at::kCPU;
  bool any_defined = false;

  const at::Tensor& at(int64_t task, int64_t param) const {
    return tensors[task * num_params + param];
  }
};

// Raises, naming the task and parameter, for mixed dtypes or devices, shapes that differ between
// tasks, non-floating dtypes, or a list whose length is not a multiple of num_tasks.
TaskGradTable check_task_grads(const char* op, const TaskGrads& grads, int64_t num_tasks);

// check_in_place for trim_: also 0 <= trim and 2 * trim < num_tasks.
TaskGradTable check_trim(const char* op, at::TensorList grads, int64_t num_tasks, int64_t trim);

// check_task_grads for the in-place ops (trim_, sign_dropout_): every one of the K * P gradients
// given, contiguous (written in place, not through a copy), at most 64 tasks.
TaskGradTable check_in_place(const char* op, at::TensorList grads, int64_t num_tasks);

// check_in_place for sign_dropout_: also P contiguous uniforms of the gradients' dtype, device and
// element counts, and K leaks.
TaskGradTable check_sign_dropout(const char* op, at::TensorList grads, int64_t num_tasks,
                                 at::TensorList uniforms, const at::Tensor& leak);

// The dtype norms, Gramians and penalties are returned in.
at::ScalarType accumulate_dtype(at::ScalarType dtype);

}  // namespace fusedmtl::multi_tensor
