#include "multi_tensor/multi_tensor_checks.h"

#include <c10/util/Exception.h>

namespace fusedmtl::multi_tensor {

at::ScalarType accumulate_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

TaskGradTable check_task_grads(const char* op, const TaskGrads& grads, int64_t num_tasks) {
  TORCH_CHECK(num_tasks >= 1, op, ": expected at least one task, got ", num_tasks);
  const int64_t total = static_cast<int64_t>(grads.size());
  TORCH_CHECK(total % num_tasks == 0, op, ": ", total, " gradients are not ", num_tasks,
              " equal task lists");
  TaskGradTable table;
  table.num_tasks = num_tasks;
  table.num_params = total / num_tasks;
  table.tensors.resize(total);
  table.numel.assign(table.num_params, 0);
  std::vector<int64_t> first_task(table.num_params, -1);
  for (int64_t i = 0; i < num_tasks; ++i) {
    for (int64_t p = 0; p < table.num_params; ++p) {
      const std::optional<at::Tensor> entry = grads.get(i * table.num_params + p);
      if (!entry.has_value() || !entry->defined()) continue;
      const at::Tensor& g = *entry;
      if (!table.any_defined) {
        TORCH_CHECK(at::isFloatingType(g.scalar_type()), op, ": task ", i, " parameter ", p,
                    ": gradients must be floating point, got ", g.scalar_type());
        table.dtype = g.scalar_type();
        table.device = g.device();
        table.any_defined = true;
      }
      TORCH_CHECK(g.scalar_type() == table.dtype, op, ": task ", i, " parameter ", p, " has dtype ",
                  g.scalar_type(), " but the other gradients have ", table.dtype);
      TORCH_CHECK(g.device() == table.device, op, ": task ", i, " parameter ", p, " is on ",
                  g.device(), " but the other gradients are on ", table.device);
      if (first_task[p] < 0) {
        first_task[p] = i;
        table.numel[p] = g.numel();
      } else {
        const at::Tensor& first = table.at(first_task[p], p);
        TORCH_CHECK(g.sizes() == first.sizes(), op, ": task ", i, " parameter ", p, " has shape ",
                    g.sizes(), " but task ", first_task[p], " has ", first.sizes());
      }
      table.tensors[i * table.num_params + p] = g.contiguous();
    }
  }
  return table;
}

TaskGradTable check_in_place(const char* op, at::TensorList grads, int64_t num_tasks) {
  TaskGrads entries;
  entries.reserve(grads.size());
  for (const at::Tensor& g : grads) entries.push_back(g);
  TaskGradTable table = check_task_grads(op, entries, num_tasks);
  TORCH_CHECK(num_tasks <= 64, op, ": at most 64 tasks, got ", num_tasks);
  for (int64_t q = 0; q < static_cast<int64_t>(grads.size()); ++q) {
    TORCH_CHECK(grads[q].is_contiguous(), op, ": task ", q / table.num_params, " parameter ",
                q % table.num_params, " must be contiguous (it is masked in place)");
  }
  return table;
}

TaskGradTable check_trim(const char* op, at::TensorList grads, int64_t num_tasks, int64_t trim) {
  TaskGradTable table = check_in_place(op, grads, num_tasks);
  TORCH_CHECK(trim >= 0 && 2 * trim < num_tasks, op,
              ": needs 0 <= trim < num_tasks / 2, got trim=", trim, " for ", num_tasks, " tasks");
  return table;
}

TaskGradTable check_sign_dropout(const char* op, at::TensorList grads, int64_t num_tasks,
                                 at::TensorList uniforms, const at::Tensor& leak) {
  TaskGradTable table = check_in_place(op, grads, num_tasks);
  TORCH_CHECK(static_cast<int64_t>(uniforms.size()) == table.num_params, op, ": ", uniforms.size(),
              " uniform tensors for ", table.num_params, " parameters");
  for (int64_t p = 0; p < table.num_params; ++p) {
    const at::Tensor& u = uniforms[p];
    TORCH_CHECK(
        u.is_contiguous() && u.numel() == table.numel[p] &&
            (!table.any_defined || (u.scalar_type() == table.dtype && u.device() == table.device)),
        op, ": uniforms ", p, " must be a contiguous ", table.dtype, " tensor on ", table.device,
        " of ", table.numel[p], " elements");
  }
  TORCH_CHECK(leak.numel() == num_tasks, op, ": expected ", num_tasks, " leaks, got ",
              leak.numel());
  return table;
}

}  // namespace fusedmtl::multi_tensor
