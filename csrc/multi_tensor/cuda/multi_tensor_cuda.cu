// CUDA implementations of the multi-tensor ops, in the style of a multi-tensor apply.
//
// The parameters are cut into work items of at most kChunk elements. A table of items (length,
// output address, and the address of the item's first element in each task's gradient, 0 where
// the task does not reach the parameter) is built on the host and copied to the device from pinned
// memory, asynchronously: it is always a device-side table, so lists of any length fit (no 4 KB
// kernel-argument limit) and the launch count does not depend on the number of parameters.
//
// Reductions are deterministic: a block reduces each item to per-item partial sums, and the last
// block to finish (an integer atomic counter, not float atomics) adds the partials in item order.
// normalized_sum runs in ONE cooperative launch: the norm phase, a grid-wide sync, then every block
// derives the same coefficients from the partials and runs the combine phase. Where cooperative
// launch is unavailable it falls back to two launches (norms, then combine reading them from
// device memory). Nothing reads device memory on the host.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>

#include <cub/block/block_reduce.cuh>

#include <vector>

#include "multi_tensor/multi_tensor.h"
#include "multi_tensor/multi_tensor_checks.h"

namespace fusedmtl::multi_tensor {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 65536;
constexpr int kMaxBlocks = 1024;
constexpr int kUnrolledTasks = 8;  // up to this many tasks, accumulators live in registers

// One row of the device-side table: [length, out, grad_0 .. grad_{K-1}] as int64.
struct Table {
  const int64_t* rows;
  int64_t num_items;
  int num_tasks;
  __host__ __device__ int64_t row_size() const { return 2 + num_tasks; }
};

Table upload_table(const TaskGradTable& grads, at::TensorList out, at::Tensor* storage) {
  const int64_t k = grads.num_tasks;
  std::vector<int64_t> rows;
  int64_t items = 0;
  for (int64_t p = 0; p < grads.num_params; ++p) {
    const int64_t numel = grads.numel[p];
    if (numel == 0) continue;
    int64_t size = 0;
    for (int64_t i = 0; i < k && size == 0; ++i) {
      if (grads.at(i, p).defined()) size = grads.at(i, p).element_size();
    }
    for (int64_t begin = 0; begin < numel; begin += kChunk, ++items) {
      rows.push_back(std::min(kChunk, numel - begin));
      rows.push_back(out.empty() ? 0
                                 : reinterpret_cast<int64_t>(out[p].data_ptr()) + begin * size);
      for (int64_t i = 0; i < k; ++i) {
        const at::Tensor& g = grads.at(i, p);
        rows.push_back(g.defined() ? reinterpret_cast<int64_t>(g.const_data_ptr()) + begin * size : 0);
      }
    }
  }
  at::Tensor host = at::empty({static_cast<int64_t>(rows.size())},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(rows.begin(), rows.end(), host.mutable_data_ptr<int64_t>());
  // From pinned memory the copy is asynchronous: no host synchronisation.
  *storage = host.to(at::TensorOptions().device(grads.device).dtype(at::kLong), /*non_blocking=*/true);
  return Table{storage->const_data_ptr<int64_t>(), items, static_cast<int>(k)};
}

template <typename S>
__device__ const S* grad_of(const int64_t* row, int i) {
  return reinterpret_cast<const S*>(row[2 + i]);
}

// Squared norms (kDiagonal) or the upper triangle of the Gramian, accumulated by each thread over
// the item, then reduced over the block into partials[item * K * K + i * K + j].
template <typename S, int kMaxK, bool kDiagonal>
__device__ void gramian_item(const Table& table, int64_t item, at::opmath_type<S>* partials) {
  using C = at::opmath_type<S>;
  using BlockReduce = cub::BlockReduce<C, kThreads>;
  __shared__ typename BlockReduce::TempStorage storage;
  const int k = table.num_tasks;
  const int64_t* row = table.rows + item * table.row_size();
  const int64_t n = row[0];
  constexpr int kSlots = kDiagonal ? kMaxK : kMaxK * (kMaxK + 1) / 2;
  C acc[kSlots];
#pragma unroll
  for (int q = 0; q < kSlots; ++q) acc[q] = C(0);
  for (int64_t e = threadIdx.x; e < n; e += kThreads) {
    C v[kMaxK];
#pragma unroll
    for (int i = 0; i < kMaxK; ++i) {
      const S* g = i < k ? grad_of<S>(row, i) : nullptr;
      v[i] = g != nullptr ? static_cast<C>(g[e]) : C(0);
    }
    if constexpr (kDiagonal) {
#pragma unroll
      for (int i = 0; i < kMaxK; ++i) acc[i] += v[i] * v[i];
    } else {
      int q = 0;
#pragma unroll
      for (int i = 0; i < kMaxK; ++i) {
#pragma unroll
        for (int j = i; j < kMaxK; ++j, ++q) acc[q] += v[i] * v[j];
      }
    }
  }
  int q = 0;
  for (int i = 0; i < kMaxK; ++i) {
    for (int j = i; j < (kDiagonal ? i + 1 : kMaxK); ++j, ++q) {
      const C total = BlockReduce(storage).Sum(acc[kDiagonal ? i : q]);
      __syncthreads();  // storage is reused by the next reduction
      if (threadIdx.x == 0 && i < k && j < k) partials[item * k * k + i * k + j] = total;
    }
  }
}

// Adds the per-item partials in item order into result (K x K, symmetric, or the K diagonal
// entries when kDiagonal). Called by one block.
template <typename C, bool kDiagonal>
__device__ void finish_gramian(const C* partials, int64_t items, int k, C* result) {
  for (int q = threadIdx.x; q < k * k; q += blockDim.x) {
    const int i = q / k, j = q % k;
    if (j < i || (kDiagonal && j != i)) continue;
    C sum = C(0);
    for (int64_t it = 0; it < items; ++it) sum += partials[it * k * k + q];
    if (kDiagonal) {
      result[i] = sum;
    } else {
      result[i * k + j] = sum;
      result[j * k + i] = sum;
    }
  }
}

// True in exactly one block: the last to finish its share (threadfence reduction).
__device__ bool is_last_block(unsigned int* counter) {
  __shared__ bool last;
  __threadfence();
  if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == gridDim.x - 1;
  __syncthreads();
  return last;
}

template <typename S, int kMaxK, bool kDiagonal>
__global__ void __launch_bounds__(kThreads)
    gramian_kernel(Table table, at::opmath_type<S>* partials, unsigned int* counter,
                   at::opmath_type<S>* result) {
  for (int64_t item = blockIdx.x; item < table.num_items; item += gridDim.x) {
    gramian_item<S, kMaxK, kDiagonal>(table, item, partials);
  }
  if (is_last_block(counter)) {
    __threadfence();
    finish_gramian<at::opmath_type<S>, kDiagonal>(partials, table.num_items, table.num_tasks, result);
  }
}

template <typename S, int kMaxK>
__device__ void combine_item(const Table& table, int64_t item, const at::opmath_type<S>* coeffs,
                             bool accumulate) {
  using C = at::opmath_type<S>;
  const int k = table.num_tasks;
  const int64_t* row = table.rows + item * table.row_size();
  const int64_t n = row[0];
  S* out = reinterpret_cast<S*>(row[1]);
  for (int64_t e = threadIdx.x; e < n; e += kThreads) {
    C sum = accumulate ? static_cast<C>(out[e]) : C(0);
#pragma unroll
    for (int i = 0; i < kMaxK; ++i) {
      const S* g = i < k ? grad_of<S>(row, i) : nullptr;
      if (g != nullptr) sum += coeffs[i] * static_cast<C>(g[e]);
    }
    out[e] = static_cast<S>(sum);
  }
}

template <typename S, int kMaxK>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(Table table, const at::opmath_type<S>* coeffs, bool accumulate) {
  for (int64_t item = blockIdx.x; item < table.num_items; item += gridDim.x) {
    combine_item<S, kMaxK>(table, item, coeffs, accumulate);
  }
}

// coeffs[i] = 1 / (sqrt(squared_norms[i]) + eps), computed identically by every block; block 0
// also writes the norms.
template <typename C>
__device__ void normalized_coefficients(const C* squared_norms, int k, double eps, C* coeffs,
                                        C* norms_out) {
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    const C norm = sqrt(squared_norms[i]);
    coeffs[i] = C(1) / (norm + static_cast<C>(eps));
    if (blockIdx.x == 0) norms_out[i] = norm;
  }
  __syncthreads();
}

// normalized_sum in one cooperative launch: norms, grid-wide sync, combine.
template <typename S, int kMaxK>
__global__ void __launch_bounds__(kThreads)
    normalized_sum_kernel(Table table, at::opmath_type<S>* partials, at::opmath_type<S>* norms_out,
                          double eps, bool accumulate) {
  using C = at::opmath_type<S>;
  __shared__ C squared[64];
  __shared__ C coeffs[64];
  for (int64_t item = blockIdx.x; item < table.num_items; item += gridDim.x) {
    gramian_item<S, kMaxK, true>(table, item, partials);
  }
  cooperative_groups::this_grid().sync();
  finish_gramian<C, true>(partials, table.num_items, table.num_tasks, squared);
  __syncthreads();
  normalized_coefficients(squared, table.num_tasks, eps, coeffs, norms_out);
  for (int64_t item = blockIdx.x; item < table.num_items; item += gridDim.x) {
    combine_item<S, kMaxK>(table, item, coeffs, accumulate);
  }
}

// The second launch of the fallback: coefficients from the squared norms the first one wrote.
template <typename S, int kMaxK>
__global__ void __launch_bounds__(kThreads)
    normalized_combine_kernel(Table table, const at::opmath_type<S>* squared_norms,
                              at::opmath_type<S>* norms_out, double eps, bool accumulate) {
  using C = at::opmath_type<S>;
  __shared__ C coeffs[64];
  normalized_coefficients(squared_norms, table.num_tasks, eps, coeffs, norms_out);
  for (int64_t item = blockIdx.x; item < table.num_items; item += gridDim.x) {
    combine_item<S, kMaxK>(table, item, coeffs, accumulate);
  }
}

int grid_for(int64_t items) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(items, kMaxBlocks)));
}

// Calls f with the register-resident task bound: kUnrolledTasks, or the general maximum.
template <typename F>
void with_task_bound(int64_t k, F&& f) {
  if (k <= kUnrolledTasks) {
    f(std::integral_constant<int, kUnrolledTasks>{});
  } else {
    f(std::integral_constant<int, 64>{});
  }
}

void check_cuda_outputs(const char* op, const TaskGradTable& table, at::TensorList out) {
  TORCH_CHECK(static_cast<int64_t>(out.size()) == table.num_params, op, ": expected ",
              table.num_params, " output tensors, got ", out.size());
  for (int64_t p = 0; p < table.num_params; ++p) {
    TORCH_CHECK(out[p].is_contiguous() && out[p].device() == table.device, op, ": output ", p,
                " must be a contiguous tensor on ", table.device);
    TORCH_CHECK(!table.any_defined || out[p].scalar_type() == table.dtype, op, ": output ", p,
                " has dtype ", out[p].scalar_type(), " but the gradients have ", table.dtype);
    TORCH_CHECK(table.numel[p] == 0 || out[p].numel() == table.numel[p], op, ": output ", p,
                " has ", out[p].numel(), " elements but the gradients have ", table.numel[p]);
  }
}

}  // namespace

at::Tensor gramian_cuda(const TaskGrads& grads, int64_t num_tasks, bool diagonal_only) {
  const char* op = "fusedmtl::multi_tensor_gramian";
  const TaskGradTable table = check_task_grads(op, grads, num_tasks);
  TORCH_CHECK(num_tasks <= 64, op, ": at most 64 tasks, got ", num_tasks);
  const c10::cuda::CUDAGuard guard(table.device);
  const at::ScalarType acc = accumulate_dtype(table.dtype);
  const auto options = at::TensorOptions().device(table.device).dtype(acc);
  at::Tensor result = diagonal_only ? at::zeros({num_tasks}, options) : at::zeros({num_tasks, num_tasks}, options);
  at::Tensor storage;
  const Table device_table = upload_table(table, {}, &storage);
  if (device_table.num_items == 0) return result;
  at::Tensor partials = at::empty({device_table.num_items * num_tasks * num_tasks}, options);
  at::Tensor counter = at::zeros({1}, options.dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, table.dtype, "multi_tensor_gramian_cuda", [&] {
    using C = at::opmath_type<scalar_t>;
    with_task_bound(num_tasks, [&](auto bound) {
      constexpr int kMaxK = decltype(bound)::value;
      auto kernel = diagonal_only ? gramian_kernel<scalar_t, kMaxK, true> : gramian_kernel<scalar_t, kMaxK, false>;
      kernel<<<grid_for(device_table.num_items), kThreads, 0, stream>>>(
          device_table, partials.mutable_data_ptr<C>(),
          reinterpret_cast<unsigned int*>(counter.mutable_data_ptr<int>()), result.mutable_data_ptr<C>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return result;
}

void combine_cuda(const TaskGrads& grads, int64_t num_tasks, const at::Tensor& coeffs,
                  at::TensorList out, bool accumulate) {
  const char* op = "fusedmtl::multi_tensor_combine";
  const TaskGradTable table = check_task_grads(op, grads, num_tasks);
  TORCH_CHECK(num_tasks <= 64, op, ": at most 64 tasks, got ", num_tasks);
  TORCH_CHECK(coeffs.numel() == num_tasks, op, ": expected ", num_tasks, " coefficients, got ",
              coeffs.numel());
  check_cuda_outputs(op, table, out);
  const c10::cuda::CUDAGuard guard(table.device);
  for (int64_t p = 0; p < table.num_params; ++p) {
    if (table.numel[p] == 0 && !accumulate) out[p].zero_();  // no task reaches it
  }
  at::Tensor storage;
  const Table device_table = upload_table(table, out, &storage);
  if (device_table.num_items == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, table.dtype, "multi_tensor_combine_cuda", [&] {
    using C = at::opmath_type<scalar_t>;
    const at::Tensor c = coeffs.to(table.device, c10::CppTypeToScalarType<C>::value).contiguous();
    with_task_bound(num_tasks, [&](auto bound) {
      combine_kernel<scalar_t, decltype(bound)::value><<<grid_for(device_table.num_items), kThreads, 0, stream>>>(
          device_table, c.const_data_ptr<C>(), accumulate);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor normalized_sum_cuda(const TaskGrads& grads, int64_t num_tasks, double eps,
                               at::TensorList out, bool accumulate) {
  const char* op = "fusedmtl::multi_tensor_normalized_sum";
  const TaskGradTable table = check_task_grads(op, grads, num_tasks);
  TORCH_CHECK(num_tasks <= 64, op, ": at most 64 tasks, got ", num_tasks);
  check_cuda_outputs(op, table, out);
  const c10::cuda::CUDAGuard guard(table.device);
  const at::ScalarType acc = accumulate_dtype(table.dtype);
  const auto options = at::TensorOptions().device(table.device).dtype(acc);
  at::Tensor norms = at::zeros({num_tasks}, options);
  for (int64_t p = 0; p < table.num_params; ++p) {
    if (table.numel[p] == 0 && !accumulate) out[p].zero_();
  }
  at::Tensor storage;
  const Table device_table = upload_table(table, out, &storage);
  if (device_table.num_items == 0) return norms;
  at::Tensor partials = at::empty({device_table.num_items * num_tasks * num_tasks}, options);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int cooperative = 0;
  cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, table.device.index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, table.dtype, "multi_tensor_normalized_sum_cuda", [&] {
    using C = at::opmath_type<scalar_t>;
    with_task_bound(num_tasks, [&](auto bound) {
      constexpr int kMaxK = decltype(bound)::value;
      C* partials_ptr = partials.mutable_data_ptr<C>();
      C* norms_ptr = norms.mutable_data_ptr<C>();
      if (cooperative) {
        // At most as many blocks as can be resident at once, which a grid-wide sync requires.
        int per_sm = 0, sms = 0;
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, normalized_sum_kernel<scalar_t, kMaxK>, kThreads, 0);
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, table.device.index());
        const int grid = std::max(1, std::min(grid_for(device_table.num_items), per_sm * sms));
        Table table_arg = device_table;
        bool accumulate_arg = accumulate;
        void* args[] = {&table_arg, &partials_ptr, &norms_ptr, &eps, &accumulate_arg};
        C10_CUDA_CHECK(cudaLaunchCooperativeKernel(
            reinterpret_cast<void*>(normalized_sum_kernel<scalar_t, kMaxK>), grid, kThreads, args, 0, stream));
        return;
      }
      // Fallback without cooperative launch: two launches.
      at::Tensor squared = at::zeros({num_tasks}, options);
      at::Tensor counter = at::zeros({1}, options.dtype(at::kInt));
      gramian_kernel<scalar_t, kMaxK, true><<<grid_for(device_table.num_items), kThreads, 0, stream>>>(
          device_table, partials_ptr, reinterpret_cast<unsigned int*>(counter.mutable_data_ptr<int>()),
          squared.mutable_data_ptr<C>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      normalized_combine_kernel<scalar_t, kMaxK><<<grid_for(device_table.num_items), kThreads, 0, stream>>>(
          device_table, squared.const_data_ptr<C>(), norms_ptr, eps, accumulate);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return norms;
}

}  // namespace fusedmtl::multi_tensor
