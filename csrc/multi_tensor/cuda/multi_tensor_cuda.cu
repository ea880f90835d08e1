// CUDA implementations of the multi-tensor ops, in the style of a multi-tensor apply.
//
// The parameters are cut into work items of at most kChunk elements. A table of items (length,
// output address, and the address of the item's first element in each task's gradient, 0 where
// the task does not reach the parameter) is built on the host and copied to the device from pinned
// memory, asynchronously: it is always a device-side table, so lists of any length fit (no 4 KB
// kernel-argument limit) and the launch count does not depend on the number of parameters.
//
// Gramians (and norms) of up to kUnrolledTasks tasks keep their K(K+1)/2 accumulators in registers
// (the task count a template argument); above that, a block stages kTileElements elements of all K
// gradients in shared memory and each thread owns at most kSlots (i, j) pairs, each with its own
// register accumulator: no run-time-indexed per-thread array (no stack, no spills) for any K <= 64,
// and one shared-memory sum per pair instead of a block reduction per pair.
//
// Reductions are deterministic: each block adds its items' sums in item order, in double (as the
// CPU does), into one row of partials (grid x pairs, not items x K x K), and the last block to
// finish (an integer atomic counter, not float atomics) adds the rows in a fixed tree order.
// normalized_sum runs in ONE cooperative launch: the norm phase, a grid-wide sync, block 0 adds
// the rows, a second grid-wide sync, then every block derives the coefficients and combines. Where
// cooperative launch is unavailable or refused (MPS, a grid too large) it falls back to two
// launches with the same grid, so both paths give the same bits. Nothing reads device memory on
// the host.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>

#include <cstdlib>
#include <cub/block/block_reduce.cuh>
#include <vector>

#include "multi_tensor/multi_tensor.h"
#include "multi_tensor/multi_tensor_checks.h"
#include "multi_tensor/multi_tensor_math.h"

namespace fusedmtl::multi_tensor {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 65536;
constexpr int kMaxBlocks = 1024;
constexpr int kMaxTasks = 64;
constexpr int kUnrolledTasks = 8;  // up to this many tasks, accumulators live in registers
constexpr int kMaxPairs = kMaxTasks * (kMaxTasks + 1) / 2;
// The tiled path: elements per shared-memory tile (rows padded by one against bank conflicts),
// and the pairs one thread owns at most.
constexpr int kTileElements = 32;
constexpr int kTileStride = kTileElements + 1;
constexpr int kSlots = (kMaxPairs + kThreads - 1) / kThreads;
constexpr int kTileSize =
    kMaxTasks * kTileStride > kSlots* kThreads ? kMaxTasks * kTileStride : kSlots * kThreads;

// One row of the device-side table: [length, out, grad_0 .. grad_{K-1}] as int64.
struct Table {
  const int64_t* rows;
  int64_t num_items;
  int num_tasks;
  __host__ __device__ int64_t row_size() const { return 2 + num_tasks; }
};

Table upload_rows(const std::vector<int64_t>& rows, int64_t items, int num_tasks, at::Device device,
                  at::Tensor* storage) {
  at::Tensor host = at::empty({static_cast<int64_t>(rows.size())},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(rows.begin(), rows.end(), host.mutable_data_ptr<int64_t>());
  // From pinned memory the copy is asynchronous: no host synchronisation.
  *storage = host.to(at::TensorOptions().device(device).dtype(at::kLong), /*non_blocking=*/true);
  return Table{storage->const_data_ptr<int64_t>(), items, num_tasks};
}

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
      rows.push_back(out.empty() ? 0 : reinterpret_cast<int64_t>(out[p].data_ptr()) + begin * size);
      for (int64_t i = 0; i < k; ++i) {
        const at::Tensor& g = grads.at(i, p);
        rows.push_back(g.defined() ? reinterpret_cast<int64_t>(g.const_data_ptr()) + begin * size
                                   : 0);
      }
    }
  }
  return upload_rows(rows, items, static_cast<int>(k), grads.device, storage);
}

template <typename S>
__device__ const S* grad_of(const int64_t* row, int i) {
  return reinterpret_cast<const S*>(row[2 + i]);
}

// The pairs a Gramian sums: the K diagonal entries, or the upper triangle row by row.
__host__ __device__ int num_pairs(int k, bool diagonal) { return diagonal ? k : k * (k + 1) / 2; }

__device__ __forceinline__ int pair_index(int i, int j, int k) {
  return i * k - i * (i - 1) / 2 + (j - i);
}

struct Pair {
  int i, j;
};

// Returned by value (an address taken would put i and j on the stack where not inlined).
__device__ __forceinline__ Pair pair_tasks(int q, int k, bool diagonal) {
  if (diagonal) return {q, q};
  int row = 0, start = 0;
  while (q >= start + (k - row)) start += k - row++;
  return {row, row + (q - start)};
}

// K <= kMaxK <= kUnrolledTasks: every thread accumulates all pairs of its elements in registers,
// then one block reduction per pair the call needs; thread 0 adds it to block_total[pair].
template <typename S, int kMaxK, bool kDiagonal>
__device__ void gramian_item_registers(const Table& table, int64_t item, double* block_total) {
  using C = at::opmath_type<S>;
  using BlockReduce = cub::BlockReduce<C, kThreads>;
  __shared__ typename BlockReduce::TempStorage storage;
  const int k = table.num_tasks;
  const int64_t* row = table.rows + item * table.row_size();
  const int64_t n = row[0];
  constexpr int kPairs = kDiagonal ? kMaxK : kMaxK * (kMaxK + 1) / 2;
  C acc[kPairs];
#pragma unroll
  for (int q = 0; q < kPairs; ++q) acc[q] = C(0);
  for (int64_t e = threadIdx.x; e < n; e += kThreads) {
    C v[kMaxK];
#pragma unroll
    for (int i = 0; i < kMaxK; ++i) {
      const S* g = i < k ? grad_of<S>(row, i) : nullptr;
      v[i] = g != nullptr ? static_cast<C>(g[e]) : C(0);
    }
    int q = 0;
#pragma unroll
    for (int i = 0; i < kMaxK; ++i) {
#pragma unroll
      for (int j = i; j < (kDiagonal ? i + 1 : kMaxK); ++j, ++q) acc[q] += v[i] * v[j];
    }
  }
  int q = 0;
#pragma unroll
  for (int i = 0; i < kMaxK; ++i) {
#pragma unroll
    for (int j = i; j < (kDiagonal ? i + 1 : kMaxK); ++j, ++q) {
      if (i < k && j < k) {  // the same for the whole block
        const C total = BlockReduce(storage).Sum(acc[q]);
        __syncthreads();  // storage is reused by the next reduction
        if (threadIdx.x == 0) block_total[kDiagonal ? i : pair_index(i, j, k)] += total;
      }
    }
  }
}

// Any K <= kMaxTasks: the block stages kTileElements elements of the K gradients in shared
// memory; thread t owns the work units u = t + s * kThreads (s < kSlots), unit u being pair
// u % pairs over the tile elements e = u / pairs (mod slices). For few pairs, several threads
// (slices) share one pair and their sums are added in slice order at the end.
template <typename S, bool kDiagonal>
__device__ void gramian_item_tiled(const Table& table, int64_t item, double* block_total) {
  using C = at::opmath_type<S>;
  constexpr int kUsedSlots = kDiagonal ? 1 : kSlots;  // K <= 64 <= kThreads diagonal pairs
  __shared__ C tile[kTileSize];
  const int k = table.num_tasks;
  const int64_t* row = table.rows + item * table.row_size();
  const int64_t n = row[0];
  const int pairs = num_pairs(k, kDiagonal);
  const int slices = pairs >= kThreads ? 1 : kThreads / pairs;
  const int units = pairs * slices;
  int first[kUsedSlots], second[kUsedSlots], slice[kUsedSlots];
  C acc[kUsedSlots];
#pragma unroll
  for (int s = 0; s < kUsedSlots; ++s) {
    const int u = threadIdx.x + s * kThreads;
    const Pair pair = pair_tasks(u % pairs, k, kDiagonal);
    first[s] = pair.i;
    second[s] = pair.j;
    slice[s] = u / pairs;
    acc[s] = C(0);
  }
  for (int64_t base = 0; base < n; base += kTileElements) {
    __syncthreads();  // the previous tile is consumed
    for (int idx = threadIdx.x; idx < k * kTileElements; idx += kThreads) {
      const int i = idx / kTileElements, e = idx % kTileElements;
      const S* g = grad_of<S>(row, i);
      tile[i * kTileStride + e] = g != nullptr && base + e < n ? static_cast<C>(g[base + e]) : C(0);
    }
    __syncthreads();
#pragma unroll
    for (int s = 0; s < kUsedSlots; ++s) {
      if (threadIdx.x + s * kThreads < units) {
        const C* a = tile + first[s] * kTileStride;
        const C* b = tile + second[s] * kTileStride;
        for (int e = slice[s]; e < kTileElements; e += slices) acc[s] += a[e] * b[e];
      }
    }
  }
  __syncthreads();
  C* scratch = tile;  // units <= kSlots * kThreads <= kTileSize
#pragma unroll
  for (int s = 0; s < kUsedSlots; ++s) {
    const int u = threadIdx.x + s * kThreads;
    if (u < units) scratch[u] = acc[s];
  }
  __syncthreads();
  for (int q = threadIdx.x; q < pairs; q += kThreads) {
    C total = C(0);
    for (int r = 0; r < slices; ++r) total += scratch[r * pairs + q];
    block_total[q] += total;
  }
  __syncthreads();  // scratch is the next item's tile
}

// Sums this block's items (blockIdx.x, + gridDim.x, ...) in item order, in double, and writes
// them as row blockIdx.x of partials (gridDim.x x pairs).
template <typename S, int kMaxK, bool kDiagonal>
__device__ void block_partials(const Table& table, double* partials) {
  constexpr int kBlockPairs = kDiagonal ? kMaxK : kMaxK * (kMaxK + 1) / 2;
  __shared__ double block_total[kBlockPairs];
  const int pairs = num_pairs(table.num_tasks, kDiagonal);
  for (int q = threadIdx.x; q < pairs; q += kThreads) block_total[q] = 0.0;
  __syncthreads();
  for (int64_t item = blockIdx.x; item < table.num_items; item += gridDim.x) {
    // The norms always take the tiled path: its register path spilled on sm_90 (ptxas 13).
    if constexpr (kMaxK <= kUnrolledTasks && !kDiagonal) {
      gramian_item_registers<S, kMaxK, kDiagonal>(table, item, block_total);
    } else {
      gramian_item_tiled<S, kDiagonal>(table, item, block_total);
    }
  }
  __syncthreads();
  for (int q = threadIdx.x; q < pairs; q += kThreads) {
    partials[blockIdx.x * static_cast<int64_t>(pairs) + q] = block_total[q];
  }
}

// Adds the rows of partials (rows x pairs) in a fixed order into result: K x K symmetric, or the
// K diagonal entries when kDiagonal. Called by one whole block: with few pairs, kThreads / pairs
// threads share each pair (strided over the rows) and are added in thread order.
template <typename C, bool kDiagonal>
__device__ void finish_gramian(const double* partials, int rows, int k, C* result) {
  __shared__ double scratch[kThreads];
  const int pairs = num_pairs(k, kDiagonal);
  const int lanes = pairs >= kThreads ? 1 : kThreads / pairs;
  for (int base = 0; base < pairs * lanes; base += kThreads) {
    const int u = base + threadIdx.x;
    const int q = u / lanes, lane = u % lanes;
    double sum = 0.0;
    if (q < pairs) {
      for (int r = lane; r < rows; r += lanes) sum += partials[static_cast<int64_t>(r) * pairs + q];
    }
    scratch[threadIdx.x] = sum;
    __syncthreads();
    if (q < pairs && lane == 0) {
      double total = 0.0;
      for (int l = 0; l < lanes; ++l) total += scratch[threadIdx.x + l];
      const Pair pair = pair_tasks(q, k, kDiagonal);
      if (kDiagonal) {
        result[pair.i] = static_cast<C>(total);
      } else {
        result[pair.i * k + pair.j] = result[pair.j * k + pair.i] = static_cast<C>(total);
      }
    }
    __syncthreads();
  }
}

// True in exactly one block: the last to finish its share (threadfence reduction).
__device__ __forceinline__ bool is_last_block(unsigned int* counter) {
  __shared__ bool last;
  __threadfence();
  if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == gridDim.x - 1;
  __syncthreads();
  return last;
}

template <typename S, int kMaxK, bool kDiagonal>
__global__ void __launch_bounds__(kThreads)
    gramian_kernel(Table table, double* partials, unsigned int* counter,
                   at::opmath_type<S>* result) {
  block_partials<S, kMaxK, kDiagonal>(table, partials);
  if (is_last_block(counter)) {
    __threadfence();
    finish_gramian<at::opmath_type<S>, kDiagonal>(partials, gridDim.x, table.num_tasks, result);
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
#pragma unroll 16  // fully unrolled, 64 task pointers spill on sm_90
    for (int i = 0; i < kMaxK; ++i) {
      const S* g = i < k ? grad_of<S>(row, i) : nullptr;
      if (g != nullptr) sum = add_scaled(sum, coeffs[i], static_cast<C>(g[e]));
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

// coeffs[i] = 1 / (sqrt(squared_norms[i]) + eps), the division in double as on the CPU; computed
// identically by every block; block 0 also writes the norms.
template <typename C>
__device__ void normalized_coefficients(const C* squared_norms, int k, double eps, C* coeffs,
                                        C* norms_out) {
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    const C norm = sqrt(squared_norms[i]);
    coeffs[i] = static_cast<C>(1.0 / (static_cast<double>(norm) + eps));
    if (blockIdx.x == 0) norms_out[i] = norm;
  }
  __syncthreads();
}

// normalized_sum in one cooperative launch: norms, grid-wide sync, block 0 adds the partials,
// grid-wide sync, combine.
template <typename S, int kMaxK>
__global__ void __launch_bounds__(kThreads)
    normalized_sum_kernel(Table table, double* partials, at::opmath_type<S>* squared_norms,
                          at::opmath_type<S>* norms_out, double eps, bool accumulate) {
  using C = at::opmath_type<S>;
  __shared__ C coeffs[kMaxTasks];
  block_partials<S, kMaxK, true>(table, partials);
  cooperative_groups::this_grid().sync();
  if (blockIdx.x == 0) finish_gramian<C, true>(partials, gridDim.x, table.num_tasks, squared_norms);
  cooperative_groups::this_grid().sync();
  normalized_coefficients(squared_norms, table.num_tasks, eps, coeffs, norms_out);
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
  __shared__ C coeffs[kMaxTasks];
  normalized_coefficients(squared_norms, table.num_tasks, eps, coeffs, norms_out);
  for (int64_t item = blockIdx.x; item < table.num_items; item += gridDim.x) {
    combine_item<S, kMaxK>(table, item, coeffs, accumulate);
  }
}

// sum l1 |w| + l2 w^2 and grad (+)= l1 sign(w) + 2 l2 w. Table rows: [length, grad, w]. Each
// block adds its items' l1 * sum |w| + l2 * sum w^2 (each sum in the compute type, as the CPU's
// items) in double; the last block adds the blocks' sums.
template <typename S, bool kOverwrite>
__global__ void __launch_bounds__(kThreads)
    penalty_kernel(Table table, double l1, double l2, double* partials, unsigned int* counter,
                   at::opmath_type<S>* result) {
  using C = at::opmath_type<S>;
  using BlockReduce = cub::BlockReduce<C, kThreads>;
  __shared__ typename BlockReduce::TempStorage storage;
  const C l1_c = static_cast<C>(l1), two_l2 = static_cast<C>(2 * l2);
  double block_total = 0.0;  // meaningful in thread 0
  for (int64_t item = blockIdx.x; item < table.num_items; item += gridDim.x) {
    const int64_t* row = table.rows + item * table.row_size();
    const int64_t n = row[0];
    S* grad = reinterpret_cast<S*>(row[1]);
    const S* w = grad_of<S>(row, 0);
    C abs_sum = C(0), square_sum = C(0);
    for (int64_t e = threadIdx.x; e < n; e += kThreads) {
      const C x = static_cast<C>(w[e]);
      const C sign = x > C(0) ? C(1) : (x < C(0) ? C(-1) : C(0));
      abs_sum += x < C(0) ? -x : x;
      square_sum += x * x;
      const C update = penalty_gradient(x, sign, l1_c, two_l2);
      grad[e] = static_cast<S>(kOverwrite ? update : add_rn(static_cast<C>(grad[e]), update));
    }
    const C abs_total = BlockReduce(storage).Sum(abs_sum);
    __syncthreads();
    const C square_total = BlockReduce(storage).Sum(square_sum);
    __syncthreads();
    block_total += l1 * static_cast<double>(abs_total) + l2 * static_cast<double>(square_total);
  }
  if (threadIdx.x == 0) partials[blockIdx.x] = block_total;
  if (is_last_block(counter)) {
    __threadfence();
    finish_gramian<C, true>(partials, gridDim.x, 1, result);
  }
}

// TrimmedMean's masks, in place (multi_tensor_math.h, sorts_before). A thread owns one element of
// an item at a time: it ranks each of the K values against the others, reading them again from
// memory (L1) rather than from a run-time-indexed array, keeps the K decisions as bits of one
// register, and only then writes, so in place is safe. The loops stay rolled and the element
// index is 32-bit (an item has at most kChunk elements): unrolled with a 64-bit index, ptxas 13
// spilled 12-28 B on sm_80 and sm_90.
template <typename S>
__global__ void __launch_bounds__(kThreads) trim_kernel(Table table, int trim) {
  using C = at::opmath_type<S>;
  const int k = table.num_tasks;
  for (int64_t item = blockIdx.x; item < table.num_items; item += gridDim.x) {
    const int64_t* row = table.rows + item * table.row_size();
    const int n = static_cast<int>(row[0]);
    for (int e = threadIdx.x; e < n; e += kThreads) {
      uint64_t keep = 0;
#pragma unroll 1
      for (int i = 0; i < k; ++i) {
        const C value = static_cast<C>(grad_of<S>(row, i)[e]);
        int rank = 0;
#pragma unroll 1
        for (int j = 0; j < k; ++j) {
          const C v = static_cast<C>(grad_of<S>(row, j)[e]);
          rank += j < i ? !sorts_before(value, v) : (j > i && sorts_before(v, value));
        }
        if (rank >= trim && rank < k - trim) keep |= uint64_t{1} << i;
      }
#pragma unroll 1
      for (int i = 0; i < k; ++i) {
        S* g = const_cast<S*>(grad_of<S>(row, i));
        g[e] = static_cast<S>(mul_rn(static_cast<C>(g[e]), C((keep >> i) & 1)));
      }
    }
  }
}

// GradDrop's masks in place (multi_tensor_math.h, sign_purity), one element per thread: the sums
// in task order, then each value times its factor, re-reading the K values (no per-thread array).
// Table rows [length, uniforms, grads...]; loops rolled, 32-bit element index, as trim_kernel.
template <typename S>
__global__ void __launch_bounds__(kThreads) sign_dropout_kernel(Table table, const double* leak) {
  using C = at::opmath_type<S>;
  const int k = table.num_tasks;
  for (int64_t item = blockIdx.x; item < table.num_items; item += gridDim.x) {
    const int64_t* row = table.rows + item * table.row_size();
    const int n = static_cast<int>(row[0]);
    const S* uniform = reinterpret_cast<const S*>(row[1]);
    for (int e = threadIdx.x; e < n; e += kThreads) {
      C total = C(0), magnitude = C(0);
#pragma unroll 1
      for (int i = 0; i < k; ++i) {
        const C v = static_cast<C>(grad_of<S>(row, i)[e]);
        total = add_rn(total, v);
        magnitude = add_rn(magnitude, v < C(0) ? -v : v);
      }
      const C purity = sign_purity<C, C>(total, magnitude);
      const C draw = static_cast<C>(uniform[e]);
#pragma unroll 1
      for (int i = 0; i < k; ++i) {
        S* g = const_cast<S*>(grad_of<S>(row, i));
        const C v = static_cast<C>(g[e]);
        const bool kept = (purity > draw && v > C(0)) || (purity < draw && v < C(0));
        const C keep_leak = static_cast<C>(leak[i]);
        const C factor = sign_dropout_factor(keep_leak, C(1) - keep_leak, C(kept));
        g[e] = static_cast<S>(mul_rn(v, factor));
      }
    }
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
    f(std::integral_constant<int, kMaxTasks>{});
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

at::Tensor launch_counter(at::Device device) {
  return at::zeros({1}, at::TensorOptions().device(device).dtype(at::kInt));
}

unsigned int* counter_ptr(at::Tensor& counter) {
  return reinterpret_cast<unsigned int*>(counter.mutable_data_ptr<int>());
}

// The grid of normalized_sum on both of its paths: one block per work item, at most kMaxBlocks,
// and at most as many blocks of the one-launch kernel as can be resident at once (occupancy x
// SMs), which its grid-wide syncs need. The fallback takes the same grid so that its partials
// have the same rows, added in the same order: the two paths give the same bits. Where not even
// one block can be resident, *resident is false and the grid is not capped (the cooperative
// launch is not tried).
template <typename Kernel>
int normalized_sum_grid(Kernel* kernel, int device, int64_t items, bool* resident) {
  int per_sm = 0, sms = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int blocks = per_sm * sms;
  *resident = blocks >= 1;
  return *resident ? std::min(grid_for(items), blocks) : grid_for(items);
}

// The one-launch path of normalized_sum can be switched off (FUSEDMTL_NO_COOPERATIVE=1), so that
// tests exercise the fallback on a GPU that supports cooperative launches.
bool cooperative_disabled() {
  const char* flag = std::getenv("FUSEDMTL_NO_COOPERATIVE");
  return flag != nullptr && flag[0] != '\0' && flag[0] != '0';
}

}  // namespace

at::Tensor gramian_cuda(const TaskGrads& grads, int64_t num_tasks, bool diagonal_only) {
  const char* op = "fusedmtl::multi_tensor_gramian";
  const TaskGradTable table = check_task_grads(op, grads, num_tasks);
  TORCH_CHECK(num_tasks <= kMaxTasks, op, ": at most ", kMaxTasks, " tasks, got ", num_tasks);
  const c10::cuda::CUDAGuard guard(table.device);
  const at::ScalarType acc = accumulate_dtype(table.dtype);
  const auto options = at::TensorOptions().device(table.device).dtype(acc);
  at::Tensor result =
      diagonal_only ? at::zeros({num_tasks}, options) : at::zeros({num_tasks, num_tasks}, options);
  at::Tensor storage;
  const Table device_table = upload_table(table, {}, &storage);
  if (device_table.num_items == 0) return result;
  const int grid = grid_for(device_table.num_items);
  at::Tensor partials = at::empty({grid * num_pairs(static_cast<int>(num_tasks), diagonal_only)},
                                  options.dtype(at::kDouble));
  at::Tensor counter = launch_counter(table.device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, table.dtype, "multi_tensor_gramian_cuda", [&] {
        using C = at::opmath_type<scalar_t>;
        with_task_bound(num_tasks, [&](auto bound) {
          constexpr int kMaxK = decltype(bound)::value;
          auto kernel = diagonal_only ? gramian_kernel<scalar_t, kMaxK, true>
                                      : gramian_kernel<scalar_t, kMaxK, false>;
          kernel<<<grid, kThreads, 0, stream>>>(device_table, partials.mutable_data_ptr<double>(),
                                                counter_ptr(counter), result.mutable_data_ptr<C>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  return result;
}

void combine_cuda(const TaskGrads& grads, int64_t num_tasks, const at::Tensor& coeffs,
                  at::TensorList out, bool accumulate) {
  const char* op = "fusedmtl::multi_tensor_combine";
  const TaskGradTable table = check_task_grads(op, grads, num_tasks);
  TORCH_CHECK(num_tasks <= kMaxTasks, op, ": at most ", kMaxTasks, " tasks, got ", num_tasks);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, table.dtype, "multi_tensor_combine_cuda", [&] {
        using C = at::opmath_type<scalar_t>;
        // The coefficients may be on the CPU or of another dtype: rounded once to C, as on the CPU.
        const at::Tensor c = coeffs.to(at::kDouble)
                                 .to(table.device, c10::CppTypeToScalarType<C>::value)
                                 .contiguous();
        with_task_bound(num_tasks, [&](auto bound) {
          combine_kernel<scalar_t, decltype(bound)::value>
              <<<grid_for(device_table.num_items), kThreads, 0, stream>>>(
                  device_table, c.const_data_ptr<C>(), accumulate);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
}

at::Tensor normalized_sum_cuda(const TaskGrads& grads, int64_t num_tasks, double eps,
                               at::TensorList out, bool accumulate) {
  const char* op = "fusedmtl::multi_tensor_normalized_sum";
  const TaskGradTable table = check_task_grads(op, grads, num_tasks);
  TORCH_CHECK(num_tasks <= kMaxTasks, op, ": at most ", kMaxTasks, " tasks, got ", num_tasks);
  check_cuda_outputs(op, table, out);
  const c10::cuda::CUDAGuard guard(table.device);
  const int device = table.device.index();
  const at::ScalarType acc = accumulate_dtype(table.dtype);
  const auto options = at::TensorOptions().device(table.device).dtype(acc);
  at::Tensor norms = at::zeros({num_tasks}, options);
  for (int64_t p = 0; p < table.num_params; ++p) {
    if (table.numel[p] == 0 && !accumulate) out[p].zero_();
  }
  at::Tensor storage;
  const Table device_table = upload_table(table, out, &storage);
  if (device_table.num_items == 0) return norms;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int cooperative = 0;
  if (!cooperative_disabled()) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  }
  at::Tensor squared = at::zeros({num_tasks}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, table.dtype, "multi_tensor_normalized_sum_cuda", [&] {
        using C = at::opmath_type<scalar_t>;
        with_task_bound(num_tasks, [&](auto bound) {
          constexpr int kMaxK = decltype(bound)::value;
          auto* fused = normalized_sum_kernel<scalar_t, kMaxK>;
          // The same grid on both paths, so that they add the partials alike (whether or not
          // cooperative launch is available, allowed, or refused below).
          bool resident = false;
          const int grid = normalized_sum_grid(fused, device, device_table.num_items, &resident);
          if (!resident) cooperative = 0;
          at::Tensor partials = at::empty({grid * num_tasks}, options.dtype(at::kDouble));
          double* partials_ptr = partials.mutable_data_ptr<double>();
          C* squared_ptr = squared.mutable_data_ptr<C>();
          C* norms_ptr = norms.mutable_data_ptr<C>();
          if (cooperative) {
            Table table_arg = device_table;
            bool accumulate_arg = accumulate;
            void* args[] = {&table_arg, &partials_ptr, &squared_ptr,
                            &norms_ptr, &eps,          &accumulate_arg};
            const cudaError_t launched = cudaLaunchCooperativeKernel(
                reinterpret_cast<void*>(fused), grid, kThreads, args, 0, stream);
            if (launched == cudaSuccess) return;
            // Refused (MPS, a device shared with other work): the launch did not happen, fall back.
            if (launched != cudaErrorCooperativeLaunchTooLarge &&
                launched != cudaErrorNotSupported && launched != cudaErrorNotPermitted) {
              C10_CUDA_CHECK(launched);
            }
            (void)cudaGetLastError();  // clear the refusal
          }
          at::Tensor counter = launch_counter(table.device);
          gramian_kernel<scalar_t, kMaxK, true><<<grid, kThreads, 0, stream>>>(
              device_table, partials_ptr, counter_ptr(counter), squared_ptr);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          // The combine adds no partials: its grid does not change the result.
          normalized_combine_kernel<scalar_t, kMaxK>
              <<<grid_for(device_table.num_items), kThreads, 0, stream>>>(
                  device_table, squared_ptr, norms_ptr, eps, accumulate);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  return norms;
}

at::Tensor l1_l2_penalty_cuda(at::TensorList params, at::TensorList grads, bool overwrite,
                              double l1, double l2) {
  const char* op = "fusedmtl::multi_tensor_add_l1_l2_penalty";
  TORCH_CHECK(params.size() == grads.size(), op, ": ", params.size(), " parameters but ",
              grads.size(), " gradients");
  TORCH_CHECK(!params.empty(), op, ": expected at least one parameter");
  const at::ScalarType dtype = params[0].scalar_type();
  const at::Device device = params[0].device();
  std::vector<int64_t> rows;
  int64_t items = 0;
  for (size_t p = 0; p < params.size(); ++p) {
    const at::Tensor& w = params[p];
    const at::Tensor& g = grads[p];
    TORCH_CHECK(w.scalar_type() == dtype && g.scalar_type() == dtype, op, ": parameter ", p,
                " and its gradient must have dtype ", dtype);
    TORCH_CHECK(w.device() == device && g.device() == device, op, ": parameter ", p,
                " and its gradient must be on ", device);
    TORCH_CHECK(w.is_contiguous() && g.is_contiguous() && w.sizes() == g.sizes(), op,
                ": parameter ", p, " and its gradient must be contiguous and of the same shape");
    const int64_t size = w.element_size();
    for (int64_t begin = 0; begin < w.numel(); begin += kChunk, ++items) {
      rows.push_back(std::min(kChunk, w.numel() - begin));
      rows.push_back(reinterpret_cast<int64_t>(g.data_ptr()) + begin * size);
      rows.push_back(reinterpret_cast<int64_t>(w.const_data_ptr()) + begin * size);
    }
  }
  const c10::cuda::CUDAGuard guard(device);
  const auto options = at::TensorOptions().device(device).dtype(accumulate_dtype(dtype));
  at::Tensor result = at::zeros({}, options);
  if (items == 0) return result;
  at::Tensor storage;
  const Table table = upload_rows(rows, items, 1, device, &storage);
  const int grid = grid_for(items);
  at::Tensor partials = at::empty({grid}, options.dtype(at::kDouble));
  at::Tensor counter = launch_counter(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dtype, "multi_tensor_add_l1_l2_penalty_cuda", [&] {
        using C = at::opmath_type<scalar_t>;
        auto kernel = overwrite ? penalty_kernel<scalar_t, true> : penalty_kernel<scalar_t, false>;
        kernel<<<grid, kThreads, 0, stream>>>(table, l1, l2, partials.mutable_data_ptr<double>(),
                                              counter_ptr(counter), result.mutable_data_ptr<C>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return result;
}

void trim_cuda(at::TensorList grads, int64_t num_tasks, int64_t trim) {
  const char* op = "fusedmtl::multi_tensor_trim_";
  const TaskGradTable table = check_trim(op, grads, num_tasks, trim);
  if (!table.any_defined) return;
  const c10::cuda::CUDAGuard guard(table.device);
  at::Tensor storage;
  const Table device_table = upload_table(table, {}, &storage);
  if (device_table.num_items == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, table.dtype, "multi_tensor_trim_cuda", [&] {
        trim_kernel<scalar_t><<<grid_for(device_table.num_items), kThreads, 0, stream>>>(
            device_table, static_cast<int>(trim));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void sign_dropout_cuda(at::TensorList grads, int64_t num_tasks, at::TensorList uniforms,
                       const at::Tensor& leak) {
  const char* op = "fusedmtl::multi_tensor_sign_dropout_";
  const TaskGradTable table = check_sign_dropout(op, grads, num_tasks, uniforms, leak);
  if (!table.any_defined) return;
  const c10::cuda::CUDAGuard guard(table.device);
  const at::Tensor leaks = leak.to(table.device, at::kDouble).contiguous();
  at::Tensor storage;
  const Table device_table = upload_table(table, uniforms, &storage);
  if (device_table.num_items == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, table.dtype, "multi_tensor_sign_dropout_cuda", [&] {
        sign_dropout_kernel<scalar_t><<<grid_for(device_table.num_items), kThreads, 0, stream>>>(
            device_table, leaks.const_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace fusedmtl::multi_tensor
