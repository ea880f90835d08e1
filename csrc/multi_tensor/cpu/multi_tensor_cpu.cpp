// CPU implementations of the multi-tensor ops: the parameters are cut into work items of at most
// kChunk elements (so that a thousand tiny tensors and one huge one both spread over the threads),
// each item is processed by the per-instruction-set kernels for the tasks that reach it, and
// per-item partial sums are added in item order: results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/cpu_capability.h"
#include "common/tensor_utils.h"
#include "multi_tensor/cpu/multi_tensor_kernels.h"
#include "multi_tensor/multi_tensor.h"
#include "multi_tensor/multi_tensor_checks.h"

FUSEDMTL_CPU_KERNEL(fusedmtl::multi_tensor::cpu, gramian_block,
                    ::fusedmtl::multi_tensor::cpu::GramianBlockFn)
FUSEDMTL_CPU_KERNEL(fusedmtl::multi_tensor::cpu, combine_block,
                    ::fusedmtl::multi_tensor::cpu::CombineBlockFn)
FUSEDMTL_CPU_KERNEL(fusedmtl::multi_tensor::cpu, penalty_block,
                    ::fusedmtl::multi_tensor::cpu::PenaltyBlockFn)
FUSEDMTL_CPU_KERNEL(fusedmtl::multi_tensor::cpu, trim_block,
                    ::fusedmtl::multi_tensor::cpu::TrimBlockFn)
FUSEDMTL_CPU_KERNEL(fusedmtl::multi_tensor::cpu, sign_dropout_block,
                    ::fusedmtl::multi_tensor::cpu::SignDropoutBlockFn)

namespace fusedmtl::multi_tensor {
namespace {

constexpr int64_t kChunk = 16384;
// Below this many elements in all, everything runs on the calling thread.
constexpr int64_t kParallelMinElements = 65536;
constexpr int64_t kMaxTasks = 64;

struct WorkItem {
  int64_t param;
  int64_t begin;
  int64_t length;
};

std::vector<WorkItem> work_items(const std::vector<int64_t>& numel, int64_t* total) {
  std::vector<WorkItem> items;
  *total = 0;
  for (int64_t p = 0; p < static_cast<int64_t>(numel.size()); ++p) {
    for (int64_t begin = 0; begin < numel[p]; begin += kChunk) {
      items.push_back({p, begin, std::min(kChunk, numel[p] - begin)});
    }
    *total += numel[p];
  }
  return items;
}

template <typename F>
void for_each_item(const std::vector<WorkItem>& items, int64_t total, const F& f) {
  const int64_t n = static_cast<int64_t>(items.size());
  at::parallel_for(0, n, total < kParallelMinElements ? n : 1, [&](int64_t first, int64_t last) {
    for (int64_t it = first; it < last; ++it) f(it, items[it]);
  });
}

// Pointers to element `begin` of the tasks that reach `param`, and those tasks' indices.
int reaching_tasks(const TaskGradTable& table, const WorkItem& item, const void** ptrs,
                   int64_t* tasks) {
  int k = 0;
  for (int64_t i = 0; i < table.num_tasks; ++i) {
    const at::Tensor& g = table.at(i, item.param);
    if (!g.defined()) continue;
    ptrs[k] = static_cast<const char*>(g.const_data_ptr()) + item.begin * g.element_size();
    tasks[k++] = i;
  }
  return k;
}

// Every task's writable pointer to element `begin` of `param` (nullptr where the task has no
// gradient): the in-place kernels take all K rows.
void task_pointers(const TaskGradTable& table, const WorkItem& item, void** ptrs) {
  for (int64_t i = 0; i < table.num_tasks; ++i) {
    const at::Tensor& g = table.at(i, item.param);
    ptrs[i] = g.defined() ? static_cast<char*>(g.mutable_data_ptr()) + item.begin * g.element_size()
                          : nullptr;
  }
}

void check_supported_dtype(const char* op, at::ScalarType dtype) {
  TORCH_CHECK_NOT_IMPLEMENTED(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      "\"", op, "\" not implemented for '", dtype, "'");
}

}  // namespace

at::Tensor gramian_cpu(const TaskGrads& grads, int64_t num_tasks, bool diagonal_only) {
  const char* op = "fusedmtl::multi_tensor_gramian";
  const TaskGradTable table = check_task_grads(op, grads, num_tasks);
  TORCH_CHECK(num_tasks <= kMaxTasks, op, ": at most ", kMaxTasks, " tasks, got ", num_tasks);
  check_supported_dtype(op, table.dtype);
  const int64_t K = num_tasks;
  int64_t total = 0;
  const std::vector<WorkItem> items = work_items(table.numel, &total);
  std::vector<double> partial(items.size() * K * K, 0.0);
  auto* kernel = cpu::gramian_block_kernel.get();
  const ScalarKind dtype = scalar_kind(table.dtype);
  for_each_item(items, total, [&](int64_t it, const WorkItem& item) {
    const void* ptrs[kMaxTasks];
    int64_t tasks[kMaxTasks];
    const int k = reaching_tasks(table, item, ptrs, tasks);
    if (k == 0) return;
    double local[kMaxTasks * kMaxTasks];
    std::fill_n(local, k * k, 0.0);  // (the k x k the kernel adds to, not all 64 x 64)
    kernel(dtype, ptrs, k, item.length, diagonal_only, local);
    double* out = partial.data() + it * K * K;
    for (int a = 0; a < k; ++a) {
      for (int b = a; b < k; ++b) out[tasks[a] * K + tasks[b]] = local[a * k + b];
    }
  });
  std::vector<double> sum(K * K, 0.0);
  for (size_t it = 0; it < items.size(); ++it) {
    for (int64_t q = 0; q < K * K; ++q) sum[q] += partial[it * K * K + q];
  }
  const at::ScalarType result_dtype = accumulate_dtype(table.dtype);
  at::Tensor result =
      at::empty(diagonal_only ? std::vector<int64_t>{K} : std::vector<int64_t>{K, K},
                at::TensorOptions().dtype(result_dtype));
  AT_DISPATCH_FLOATING_TYPES(result_dtype, "multi_tensor_gramian_cpu", [&] {
    scalar_t* out = result.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < K; ++i) {
      if (diagonal_only) {
        out[i] = static_cast<scalar_t>(sum[i * K + i]);
        continue;
      }
      for (int64_t j = i; j < K; ++j) {
        out[i * K + j] = out[j * K + i] = static_cast<scalar_t>(sum[i * K + j]);
      }
    }
  });
  return result;
}

void combine_cpu(const TaskGrads& grads, int64_t num_tasks, const at::Tensor& coeffs,
                 at::TensorList out, bool accumulate) {
  const char* op = "fusedmtl::multi_tensor_combine";
  const TaskGradTable table = check_task_grads(op, grads, num_tasks);
  TORCH_CHECK(num_tasks <= kMaxTasks, op, ": at most ", kMaxTasks, " tasks, got ", num_tasks);
  TORCH_CHECK(coeffs.numel() == num_tasks, op, ": expected ", num_tasks, " coefficients, got ",
              coeffs.numel());
  TORCH_CHECK(static_cast<int64_t>(out.size()) == table.num_params, op, ": expected ",
              table.num_params, " output tensors, got ", out.size());
  std::vector<int64_t> numel(table.num_params);
  for (int64_t p = 0; p < table.num_params; ++p) {
    const at::Tensor& o = out[p];
    TORCH_CHECK(o.is_contiguous() && o.device().is_cpu(), op, ": output ", p,
                " must be a contiguous CPU tensor");
    TORCH_CHECK(!table.any_defined || o.scalar_type() == table.dtype, op, ": output ", p,
                " has dtype ", o.scalar_type(), " but the gradients have ", table.dtype);
    TORCH_CHECK(table.numel[p] == 0 || o.numel() == table.numel[p], op, ": output ", p, " has ",
                o.numel(), " elements but the gradients of parameter ", p, " have ",
                table.numel[p]);
    numel[p] = o.numel();
    check_supported_dtype(op, o.scalar_type());
  }
  const at::Tensor c = coeffs.to(at::kCPU, at::kDouble).contiguous();
  const double* coefficient = c.const_data_ptr<double>();
  int64_t total = 0;
  const std::vector<WorkItem> items = work_items(numel, &total);
  auto* kernel = cpu::combine_block_kernel.get();
  for_each_item(items, total, [&](int64_t, const WorkItem& item) {
    const at::Tensor& o = out[item.param];
    void* dst = static_cast<char*>(o.mutable_data_ptr()) + item.begin * o.element_size();
    const void* ptrs[kMaxTasks];
    int64_t tasks[kMaxTasks];
    const int k = table.numel[item.param] == 0 ? 0 : reaching_tasks(table, item, ptrs, tasks);
    if (k == 0) {
      if (!accumulate) std::memset(dst, 0, item.length * o.element_size());  // +0.0 in every dtype
      return;
    }
    double coeff[kMaxTasks];
    for (int a = 0; a < k; ++a) coeff[a] = coefficient[tasks[a]];
    kernel(scalar_kind(o.scalar_type()), ptrs, coeff, k, item.length, dst, accumulate);
  });
}

at::Tensor normalized_sum_cpu(const TaskGrads& grads, int64_t num_tasks, double eps,
                              at::TensorList out, bool accumulate) {
  // Two passes: the norms, then the combination with coefficients 1 / (norm + eps).
  const at::Tensor norms = gramian_cpu(grads, num_tasks, /*diagonal_only=*/true).sqrt_();
  combine_cpu(grads, num_tasks, norms.to(at::kDouble).add(eps).reciprocal(), out, accumulate);
  return norms;
}

at::Tensor l1_l2_penalty_cpu(at::TensorList params, at::TensorList grads, bool overwrite, double l1,
                             double l2) {
  const char* op = "fusedmtl::multi_tensor_l1_l2_penalty_";
  TORCH_CHECK(params.size() == grads.size(), op, ": ", params.size(), " parameters but ",
              grads.size(), " gradients");
  std::vector<int64_t> numel(params.size());
  at::ScalarType dtype = params.empty() ? at::kFloat : params[0].scalar_type();
  for (size_t p = 0; p < params.size(); ++p) {
    TORCH_CHECK(params[p].scalar_type() == dtype && grads[p].scalar_type() == dtype, op,
                ": parameter ", p, " and its gradient must have dtype ", dtype);
    TORCH_CHECK(params[p].is_contiguous() && grads[p].is_contiguous() &&
                    params[p].sizes() == grads[p].sizes(),
                op, ": parameter ", p,
                " and its gradient must be contiguous and of the same shape");
    numel[p] = params[p].numel();
  }
  check_supported_dtype(op, dtype);
  int64_t total = 0;
  const std::vector<WorkItem> items = work_items(numel, &total);
  std::vector<double> partial(items.size(), 0.0);
  auto* kernel = cpu::penalty_block_kernel.get();
  for_each_item(items, total, [&](int64_t it, const WorkItem& item) {
    const at::Tensor& w = params[item.param];
    const at::Tensor& g = grads[item.param];
    const int64_t offset = item.begin * w.element_size();
    partial[it] =
        kernel(scalar_kind(dtype), static_cast<const char*>(w.const_data_ptr()) + offset,
               static_cast<char*>(g.mutable_data_ptr()) + offset, overwrite, item.length, l1, l2);
  });
  double sum = 0.0;
  for (double s : partial) sum += s;
  return at::scalar_tensor(sum, at::TensorOptions().dtype(accumulate_dtype(dtype)));
}

void trim_cpu(at::TensorList grads, int64_t num_tasks, int64_t trim) {
  const char* op = "fusedmtl::multi_tensor_trim_";
  const TaskGradTable table = check_trim(op, grads, num_tasks, trim);
  if (!table.any_defined) return;
  check_supported_dtype(op, table.dtype);
  int64_t total = 0;
  const std::vector<WorkItem> items = work_items(table.numel, &total);
  auto* kernel = cpu::trim_block_kernel.get();
  for_each_item(items, total, [&](int64_t, const WorkItem& item) {
    void* ptrs[kMaxTasks];
    task_pointers(table, item, ptrs);
    kernel(scalar_kind(table.dtype), ptrs, static_cast<int>(num_tasks), item.length,
           static_cast<int>(trim));
  });
}

void sign_dropout_cpu(at::TensorList grads, int64_t num_tasks, at::TensorList uniforms,
                      const at::Tensor& leak) {
  const char* op = "fusedmtl::multi_tensor_sign_dropout_";
  const TaskGradTable table = check_sign_dropout(op, grads, num_tasks, uniforms, leak);
  if (!table.any_defined) return;
  check_supported_dtype(op, table.dtype);
  const at::Tensor leaks = leak.to(at::kCPU, at::kDouble).contiguous();
  int64_t total = 0;
  const std::vector<WorkItem> items = work_items(table.numel, &total);
  auto* kernel = cpu::sign_dropout_block_kernel.get();
  for_each_item(items, total, [&](int64_t, const WorkItem& item) {
    void* ptrs[kMaxTasks];
    task_pointers(table, item, ptrs);
    const at::Tensor& u = uniforms[item.param];
    kernel(scalar_kind(table.dtype), ptrs, static_cast<int>(num_tasks), item.length,
           static_cast<const char*>(u.const_data_ptr()) + item.begin * u.element_size(),
           leaks.const_data_ptr<double>());
  });
}

}  // namespace fusedmtl::multi_tensor
