// CUDA implementations of the loss ops: the regression losses and the heteroscedastic ones. The
// per-element math is loss_math.h and heteroscedastic_math.h, the same code the CPU kernels run
// (and the CPU tests cover).
//
// One kernel does every pass: grid-stride over the elements (16-byte vector loads when every
// pointer is aligned), writing what the call asks for. Which outputs are wanted is a uniform
// runtime branch rather than a template argument, to keep the number of instantiations (and the
// compile time) small. Reductions write one partial sum per block (cub::BlockReduce) and a
// one-block kernel adds the partials in a fixed order: no float atomics, so a result is the same
// from run to run. The grid size depends only on the element count, so it is also the same on
// every GPU. No host synchronisation: a scalar grad_output is read by the kernel from device
// memory.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cub/block/block_reduce.cuh>

#include "losses/heteroscedastic_math.h"
#include "losses/loss_checks.h"
#include "losses/loss_math.h"
#include "losses/losses.h"

namespace fusedmtl::losses {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks =
    1024;  // a constant, not the SM count: results must not depend on the GPU
constexpr int kVectorBytes = 16;

template <typename S>
struct LossPointers {
  const S* input;
  const S* target;
  const S* log_var;      // heteroscedastic losses only, else null
  S* loss;               // element-wise loss, or null
  S* grad_input;         // or null
  S* grad_target;        // regression losses only (the heteroscedastic caller negates), or null
  S* grad_log_var;       // heteroscedastic losses only, or null
  const S* grad_output;  // element-wise grad_output, or null
  const S* grad_scalar;  // 0-dim grad_output on the device, or null (then grad_scale is used)
};

template <typename S, int kWidth>
struct alignas(sizeof(S) * kWidth) Packed {
  S values[kWidth];
};

// kLogVar: the heteroscedastic loss of K rather than K itself.
template <LossKind K, bool kLogVar, typename S, int kWidth>
__global__ void __launch_bounds__(kThreads)
    loss_kernel(LossPointers<S> ptr, LossParams<at::opmath_type<S>> params, bool divide,
                bool l1_mean, int64_t n, at::opmath_type<S>* block_sums) {
  using C = at::opmath_type<S>;
  using BlockReduce = cub::BlockReduce<C, kThreads>;
  __shared__ typename BlockReduce::TempStorage reduce_storage;

  if (ptr.grad_scalar != nullptr) {
    params.grad_scale = static_cast<C>(*ptr.grad_scalar);
    // autograd's mean backward divides grad_output by N in the tensor's dtype before sign(d)
    if (l1_mean) params.grad_scale = static_cast<C>(static_cast<S>(params.grad_scale / C(n)));
  }
  const bool want_grad =
      ptr.grad_input != nullptr || ptr.grad_target != nullptr || ptr.grad_log_var != nullptr;

  // smooth-L1's x / beta: a division, or a multiplication by 1 / beta where that is exact.
  constexpr ParamDivision kDivide = ParamDivision::kDivide;
  constexpr ParamDivision kInverse = ParamDivision::kMultiplyByInverse;

  // One element: its loss (added to this thread's sum when reducing) and its two gradients.
  // s: log_var (heteroscedastic losses; 0 otherwise). other: the target's gradient (regression
  // losses) or log_var's (heteroscedastic losses). Returned by value, not written through
  // pointers into the vector packs: a pointer into a pack keeps the pack in local memory (the
  // stack frames and spills ptxas reported for the 4- and 8-wide kernels).
  struct Element {
    C value, grad_input, grad_other;
  };
  const bool want_value = block_sums != nullptr || ptr.loss != nullptr;
  auto element = [&](C x, C y, C s, C g, C& sum) {
    const C d = x - y;
    Element out{C(0), C(0), C(0)};
    if (want_value) {
      if constexpr (kLogVar) {
        out.value = divide ? heteroscedastic_value<K, kDivide>(d, s, params)
                           : heteroscedastic_value<K, kInverse>(d, s, params);
      } else {
        out.value = divide ? loss_value<K, kDivide>(d, params) : loss_value<K, kInverse>(d, params);
      }
      // add_rn: the sum of the element losses as the element kernels round them, never an FMA
      // of the MSE's d * d into the sum (the CPU kernels are built with -ffp-contract=off).
      sum = add_rn(sum, out.value);
    }
    if (want_grad) {
      if constexpr (kLogVar) {
        const HeteroscedasticGrad<C> grad =
            divide ? heteroscedastic_grad<K, kDivide>(d, s, g, params)
                   : heteroscedastic_grad<K, kInverse>(d, s, g, params);
        out.grad_input = grad.input;
        out.grad_other = grad.log_var;
      } else {
        out.grad_input =
            divide ? loss_grad<K, kDivide>(d, g, params) : loss_grad<K, kInverse>(d, g, params);
        out.grad_other = -out.grad_input;
      }
    }
    return out;
  };
  S* const grad_other = kLogVar ? ptr.grad_log_var : ptr.grad_target;

  C sum = C(0);
  // Grid-stride over the whole packs of kWidth elements, then the partial last pack (n % kWidth
  // elements) by the thread whose turn it is next: each thread adds the same elements in the
  // same order as in one loop over all ceil(n / kWidth) packs. The scalar tail stays out of the
  // vector loop: with both in one loop body (and a bounds test per pack), ptxas 13.0 held the
  // 8-wide fp16/bf16 MSE and fp16 Huber kernels at 32 registers on sm_80 and spilled 8-16 B.
  const int64_t threads = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t packs = n / kWidth;
  int64_t pack = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  for (; pack < packs; pack += threads) {
    const int64_t base = pack * kWidth;
    using P = Packed<S, kWidth>;
    const P x = *reinterpret_cast<const P*>(ptr.input + base);
    const P y = *reinterpret_cast<const P*>(ptr.target + base);
    P lv, g_in, l_out, g_out, g_oth;
    if constexpr (kLogVar) lv = *reinterpret_cast<const P*>(ptr.log_var + base);
    if (ptr.grad_output != nullptr) g_in = *reinterpret_cast<const P*>(ptr.grad_output + base);
#pragma unroll
    for (int j = 0; j < kWidth; ++j) {
      const C g = ptr.grad_output != nullptr ? static_cast<C>(g_in.values[j]) : params.grad_scale;
      C s = C(0);
      if constexpr (kLogVar) s = static_cast<C>(lv.values[j]);
      const Element e =
          element(static_cast<C>(x.values[j]), static_cast<C>(y.values[j]), s, g, sum);
      l_out.values[j] = static_cast<S>(e.value);
      g_out.values[j] = static_cast<S>(e.grad_input);
      g_oth.values[j] = static_cast<S>(e.grad_other);
    }
    if (ptr.loss) *reinterpret_cast<P*>(ptr.loss + base) = l_out;
    if (ptr.grad_input) *reinterpret_cast<P*>(ptr.grad_input + base) = g_out;
    if (grad_other) *reinterpret_cast<P*>(grad_other + base) = g_oth;
  }
  if (kWidth > 1 && pack == packs) {
    for (int64_t i = packs * kWidth; i < n; ++i) {
      const C g =
          ptr.grad_output != nullptr ? static_cast<C>(ptr.grad_output[i]) : params.grad_scale;
      C s = C(0);
      if constexpr (kLogVar) s = static_cast<C>(ptr.log_var[i]);
      const Element e =
          element(static_cast<C>(ptr.input[i]), static_cast<C>(ptr.target[i]), s, g, sum);
      if (ptr.loss) ptr.loss[i] = static_cast<S>(e.value);
      if (ptr.grad_input) ptr.grad_input[i] = static_cast<S>(e.grad_input);
      if (grad_other) grad_other[i] = static_cast<S>(e.grad_other);
    }
  }
  if (block_sums != nullptr) {
    const C block_sum = BlockReduce(reduce_storage).Sum(sum);
    if (threadIdx.x == 0) block_sums[blockIdx.x] = block_sum;
  }
}

// Adds the block sums in a fixed order and writes the mean or the sum in the loss's dtype.
template <typename S>
__global__ void __launch_bounds__(kThreads)
    finish_reduction_kernel(const at::opmath_type<S>* block_sums, int num_blocks, bool mean,
                            int64_t n, S* out) {
  using C = at::opmath_type<S>;
  using BlockReduce = cub::BlockReduce<C, kThreads>;
  __shared__ typename BlockReduce::TempStorage reduce_storage;
  C sum = C(0);
  for (int b = threadIdx.x; b < num_blocks; b += kThreads) sum += block_sums[b];
  const C total = BlockReduce(reduce_storage).Sum(sum);
  // mean of an empty tensor is 0 / 0 = nan, as in torch
  if (threadIdx.x == 0) *out = static_cast<S>(mean ? total / static_cast<C>(n) : total);
}

bool is_power_of_two(double x) {
  int exponent;
  return x > 0 && std::frexp(x, &exponent) == 0.5;
}

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVectorBytes == 0; }

template <typename S>
bool all_aligned(const LossPointers<S>& ptr) {
  for (const void* p :
       {static_cast<const void*>(ptr.input), static_cast<const void*>(ptr.target),
        static_cast<const void*>(ptr.log_var), static_cast<const void*>(ptr.loss),
        static_cast<const void*>(ptr.grad_input), static_cast<const void*>(ptr.grad_target),
        static_cast<const void*>(ptr.grad_log_var), static_cast<const void*>(ptr.grad_output)}) {
    if (p != nullptr && !aligned(p)) return false;
  }
  return true;
}

// Launches the kernel for one call; returns the 0-dim reduced loss when `reduced` is defined.
template <typename S>
void launch_loss(const LossConfig& config, const LossPointers<S>& ptr, int64_t n,
                 const at::Tensor& reduced, double grad_scale) {
  using C = at::opmath_type<S>;
  LossParams<C> params;
  params.param = static_cast<C>(config.param);
  params.inv_param = static_cast<C>(1.0 / config.param);
  params.norm = static_cast<C>(loss_norm(config, n));
  params.grad_scale = static_cast<C>(grad_scale);
  const bool divide = config.kind == LossKind::SmoothL1 && !is_power_of_two(config.param);
  const bool l1_mean =
      config.kind == LossKind::L1 && config.reduction == Reduction::Mean && !config.heteroscedastic;
  constexpr int kWidth = kVectorBytes / sizeof(S);
  const bool vectorized = all_aligned(ptr);
  const int64_t per_block = static_cast<int64_t>(kThreads) * (vectorized ? kWidth : 1);
  const int num_blocks = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(kMaxBlocks, (n + per_block - 1) / per_block)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor block_sums;
  C* block_sums_ptr = nullptr;
  if (reduced.defined()) {
    block_sums =
        at::empty({num_blocks}, reduced.options().dtype(c10::CppTypeToScalarType<C>::value));
    block_sums_ptr = block_sums.mutable_data_ptr<C>();
  }
  auto launch = [&](auto kind_tag, auto log_var_tag) {
    constexpr LossKind K = decltype(kind_tag)::value;
    constexpr bool kLogVar = decltype(log_var_tag)::value;
    if (vectorized) {
      loss_kernel<K, kLogVar, S, kWidth>
          <<<num_blocks, kThreads, 0, stream>>>(ptr, params, divide, l1_mean, n, block_sums_ptr);
    } else {
      loss_kernel<K, kLogVar, S, 1>
          <<<num_blocks, kThreads, 0, stream>>>(ptr, params, divide, l1_mean, n, block_sums_ptr);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  dispatch_kind(config.kind, [&](auto kind_tag) {
    if (config.heteroscedastic) {
      // kinds without a heteroscedastic form are rejected by the argument checks
      if constexpr (has_heteroscedastic_form(decltype(kind_tag)::value)) {
        launch(kind_tag, std::true_type{});
      }
    } else {
      launch(kind_tag, std::false_type{});
    }
  });
  if (reduced.defined()) {
    finish_reduction_kernel<S><<<1, kThreads, 0, stream>>>(block_sums_ptr, num_blocks,
                                                           config.reduction == Reduction::Mean, n,
                                                           reduced.mutable_data_ptr<S>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor new_gradient(const at::Tensor& like, bool wanted) {
  return wanted ? at::empty(like.sizes(), like.options()) : at::empty({0}, like.options());
}

template <typename S>
S* optional_ptr(at::Tensor& t, bool wanted) {
  return wanted ? t.mutable_data_ptr<S>() : nullptr;
}

template <typename S>
LossPointers<S> operand_pointers(const LossOperands& op) {
  LossPointers<S> ptr{};
  ptr.input = op.input.const_data_ptr<S>();
  ptr.target = op.target.const_data_ptr<S>();
  if (op.log_var.defined()) ptr.log_var = op.log_var.const_data_ptr<S>();
  return ptr;
}

// The gradient besides the input's: the target's (regression losses) or log_var's
// (heteroscedastic losses, whose target gradient the caller negates).
template <typename S>
void set_second_grad(const LossOperands& op, LossPointers<S>& ptr, at::Tensor& grad, bool wanted) {
  (op.log_var.defined() ? ptr.grad_log_var : ptr.grad_target) = optional_ptr<S>(grad, wanted);
}

at::Tensor forward(const LossOperands& op) {
  const c10::cuda::CUDAGuard guard(op.input.device());
  const LossConfig& config = op.config;
  const at::Tensor& input = op.input;
  const bool reduce = config.reduction != Reduction::None;
  at::Tensor out =
      reduce ? at::empty({}, input.options()) : at::empty(input.sizes(), input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "fusedmtl_loss_cuda", [&] {
        LossPointers<scalar_t> ptr = operand_pointers<scalar_t>(op);
        if (!reduce) ptr.loss = out.mutable_data_ptr<scalar_t>();
        launch_loss<scalar_t>(config, ptr, input.numel(), reduce ? out : at::Tensor(), 1.0);
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_with_grad(const char* name,
                                                                 const LossOperands& op,
                                                                 bool input_grad,
                                                                 bool second_grad) {
  check_reduced(name, op.config);
  const c10::cuda::CUDAGuard guard(op.input.device());
  const at::Tensor& input = op.input;
  at::Tensor out = at::empty({}, input.options());
  at::Tensor grad_input = new_gradient(input, input_grad);
  at::Tensor grad_second = new_gradient(input, second_grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "fusedmtl_loss_with_grad_cuda", [&] {
        LossPointers<scalar_t> ptr = operand_pointers<scalar_t>(op);
        ptr.grad_input = optional_ptr<scalar_t>(grad_input, input_grad);
        set_second_grad(op, ptr, grad_second, second_grad);
        launch_loss<scalar_t>(op.config, ptr, input.numel(), out,
                              loss_grad_scale(op.config, input.numel(), 1.0, input.scalar_type()));
      });
  return {out, grad_input, grad_second};
}

std::tuple<at::Tensor, at::Tensor> backward(const char* name, const LossOperands& op,
                                            const at::Tensor& grad_output_, bool input_grad,
                                            bool second_grad) {
  const at::Tensor& input = op.input;
  check_grad_output(name, op.config, grad_output_, input);
  const c10::cuda::CUDAGuard guard(input.device());
  const bool reduce = op.config.reduction != Reduction::None;
  // Converted on the device: reading the scalar on the host would synchronise.
  const at::Tensor grad_output = grad_output_.to(input.device(), input.scalar_type()).contiguous();
  at::Tensor grad_input = new_gradient(input, input_grad);
  at::Tensor grad_second = new_gradient(input, second_grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "fusedmtl_loss_backward_cuda", [&] {
        const scalar_t* g = grad_output.const_data_ptr<scalar_t>();
        LossPointers<scalar_t> ptr = operand_pointers<scalar_t>(op);
        ptr.grad_input = optional_ptr<scalar_t>(grad_input, input_grad);
        set_second_grad(op, ptr, grad_second, second_grad);
        (reduce ? ptr.grad_scalar : ptr.grad_output) = g;
        launch_loss<scalar_t>(op.config, ptr, input.numel(), at::Tensor(), 1.0);
      });
  return {grad_input, grad_second};
}

}  // namespace

at::Tensor regression_loss_cuda(const at::Tensor& input, const at::Tensor& target,
                                c10::string_view kind, double param, int64_t reduction) {
  return forward(
      regression_operands("fusedmtl::regression_loss", input, target, kind, param, reduction));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> regression_loss_with_grad_cuda(
    const at::Tensor& input, const at::Tensor& target, c10::string_view kind, double param,
    int64_t reduction, bool input_grad, bool target_grad) {
  constexpr const char* name = "fusedmtl::regression_loss_with_grad";
  return forward_with_grad(name, regression_operands(name, input, target, kind, param, reduction),
                           input_grad, target_grad);
}

std::tuple<at::Tensor, at::Tensor> regression_loss_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& target,
    c10::string_view kind, double param, int64_t reduction, bool input_grad, bool target_grad) {
  constexpr const char* name = "fusedmtl::regression_loss_backward";
  return backward(name, regression_operands(name, input, target, kind, param, reduction),
                  grad_output, input_grad, target_grad);
}

at::Tensor heteroscedastic_loss_cuda(const at::Tensor& input, const at::Tensor& target,
                                     const at::Tensor& log_var, c10::string_view kind, double beta,
                                     int64_t reduction) {
  return forward(heteroscedastic_operands("fusedmtl::heteroscedastic_loss", input, target, log_var,
                                          kind, beta, reduction));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> heteroscedastic_loss_with_grad_cuda(
    const at::Tensor& input, const at::Tensor& target, const at::Tensor& log_var,
    c10::string_view kind, double beta, int64_t reduction, bool input_grad, bool log_var_grad) {
  constexpr const char* name = "fusedmtl::heteroscedastic_loss_with_grad";
  return forward_with_grad(
      name, heteroscedastic_operands(name, input, target, log_var, kind, beta, reduction),
      input_grad, log_var_grad);
}

std::tuple<at::Tensor, at::Tensor> heteroscedastic_loss_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& target,
    const at::Tensor& log_var, c10::string_view kind, double beta, int64_t reduction,
    bool input_grad, bool log_var_grad) {
  constexpr const char* name = "fusedmtl::heteroscedastic_loss_backward";
  return backward(name,
                  heteroscedastic_operands(name, input, target, log_var, kind, beta, reduction),
                  grad_output, input_grad, log_var_grad);
}

}  // namespace fusedmtl::losses
