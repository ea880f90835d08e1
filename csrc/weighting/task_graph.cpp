#include "weighting/task_graph.h"

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <utility>

namespace fusedmtl::task_graph {
namespace {

using torch::autograd::AccumulateGrad;
using torch::autograd::Node;
using torch::autograd::variable_list;

std::unordered_set<const Node*> grad_fns(const std::vector<at::Tensor>& tensors) {
  std::unordered_set<const Node*> nodes;
  for (const auto& t : tensors) {
    if (t.defined() && t.grad_fn()) nodes.insert(t.grad_fn().get());
  }
  return nodes;
}

const at::Tensor* leaf_of(Node* node) {
  auto* accumulate = dynamic_cast<AccumulateGrad*>(node);
  return accumulate != nullptr ? &accumulate->variable : nullptr;
}

// Preorder depth-first walk from `start` (next edges in order, as the Python walk), calling
// visit(node) once per node; visit returns whether to descend.
template <typename Visit>
void walk(Node* start, Visit&& visit) {
  std::unordered_set<Node*> seen;
  std::vector<Node*> stack{start};
  while (!stack.empty()) {
    Node* node = stack.back();
    stack.pop_back();
    if (node == nullptr || !seen.insert(node).second || !visit(node)) continue;
    const auto& edges = node->next_edges();
    for (auto it = edges.rbegin(); it != edges.rend(); ++it) stack.push_back(it->function.get());
  }
}

// Scales the gradients a node passes on along some of its edges by one coefficient, the first
// time it runs while armed.
struct ScaleEdges final : torch::autograd::FunctionPostHook {
  ScaleEdges(std::vector<size_t> edges, at::Tensor coeff, std::shared_ptr<bool> armed)
      : edges_(std::move(edges)), coeff_(std::move(coeff)), armed_(std::move(armed)) {}

  variable_list operator()(const variable_list& grad_inputs,
                           const variable_list& /*grad_outputs*/) override {
    if (!*armed_ || fired_) return grad_inputs;
    fired_ = true;
    variable_list scaled = grad_inputs;
    for (size_t e : edges_) {
      if (e < scaled.size() && scaled[e].defined()) scaled[e] = scaled[e] * coeff_;
    }
    return scaled;
  }

 private:
  std::vector<size_t> edges_;
  at::Tensor coeff_;
  std::shared_ptr<bool> armed_;
  bool fired_ = false;
};

// Whether none of n elements has its exponent bits all ones (inf or NaN): integer ops over the
// raw bits, which the compiler vectorises, and no early exit to break that.
template <typename Bits>
bool exponents_finite(const void* data, int64_t n, Bits exponent) {
  const auto* bits = static_cast<const Bits*>(data);
  Bits bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<Bits>((bits[i] & exponent) == exponent);
  return bad == 0;
}

// Whether every element of g is finite; nullopt where g cannot be read here.
std::optional<bool> all_finite(const at::Tensor& g) {
  if (g._is_zerotensor()) return true;
  // (dense and non-overlapping: the elements fill [data, data + numel) in some order)
  if (!g.is_cpu() || g.layout() != at::kStrided || !g.has_storage() ||
      !g.is_non_overlapping_and_dense()) {
    return std::nullopt;
  }
  const void* data = g.const_data_ptr();
  const int64_t n = g.numel();
  switch (g.scalar_type()) {
    case at::kFloat:
      return exponents_finite<uint32_t>(data, n, 0x7f800000u);
    case at::kDouble:
      return exponents_finite<uint64_t>(data, n, 0x7ff0000000000000ull);
    case at::kHalf:
      return exponents_finite<uint16_t>(data, n, 0x7c00u);
    case at::kBFloat16:
      return exponents_finite<uint16_t>(data, n, 0x7f80u);
    default:
      return std::nullopt;
  }
}

struct WatchFinite final : torch::autograd::FunctionPreHook {
  explicit WatchFinite(std::shared_ptr<FiniteWatch::State> state) : state_(std::move(state)) {}

  variable_list operator()(const variable_list& grads) override {
    for (const auto& g : grads) {
      if (!g.defined()) continue;
      const std::optional<bool> finite = all_finite(g);
      if (!finite) {
        state_->unread = true;
      } else if (!*finite) {
        state_->finite = false;
      }
    }
    return grads;
  }

  const FiniteWatch::State* state() const { return state_.get(); }

 private:
  std::shared_ptr<FiniteWatch::State> state_;
};

// This watch's hook among a leaf's, or end(): found by what it is, not by its address (setting a
// tensor's Python hook dict clears its hooks, and a freed hook's address may be reused).
auto watch_hook(const at::Tensor& leaf, const FiniteWatch::State* state) {
  auto& hooks = torch::autograd::impl::hooks(leaf);
  return std::find_if(hooks.begin(), hooks.end(), [state](const auto& hook) {
    const auto* watch = dynamic_cast<const WatchFinite*>(hook.get());
    return watch != nullptr && watch->state() == state;
  });
}

}  // namespace

FiniteWatch::FiniteWatch(const std::vector<at::Tensor>& leaves)
    : state_(std::make_shared<State>()) {
  std::unordered_set<const void*> watched;
  for (const auto& leaf : leaves) {
    if (!leaf.defined() || !leaf.requires_grad()) continue;
    if (!leaf.is_leaf()) {  // (its gradient is captured at its grad_fn: not watched)
      state_->unread = true;
      continue;
    }
    if (!watched.insert(leaf.unsafeGetTensorImpl()).second) continue;
    // A leaf's hooks live on the tensor, not on its AccumulateGrad node (which reads them from
    // there: the node may die while the tensor lives); the engine also runs them on gradients
    // that autograd.grad captures.
    torch::autograd::impl::hooks(leaf).push_back(std::make_unique<WatchFinite>(state_));
    leaves_.push_back(leaf);
  }
}

FiniteWatch::~FiniteWatch() {
  for (const auto& leaf : leaves_) {
    auto hook = watch_hook(leaf, state_.get());
    if (hook != torch::autograd::impl::hooks(leaf).end()) {
      torch::autograd::impl::hooks(leaf).erase(hook);
    }
  }
}

std::optional<bool> FiniteWatch::finite() const {
  for (const auto& leaf : leaves_) {  // (a hook cleared before the pass read nothing)
    if (watch_hook(leaf, state_.get()) == torch::autograd::impl::hooks(leaf).end()) {
      return std::nullopt;
    }
  }
  if (state_->unread) return std::nullopt;
  return state_->finite;
}

Leaves reachable_leaves(const at::Tensor& root, const std::vector<at::Tensor>& stops) {
  Leaves result;
  if (!root.grad_fn()) {
    if (root.requires_grad()) result.leaves.push_back(root);
    return result;
  }
  const auto stop_nodes = grad_fns(stops);
  walk(root.grad_fn().get(), [&](Node* node) {
    if (stop_nodes.count(node)) {
      result.stopped = true;
      return false;
    }
    if (const at::Tensor* leaf = leaf_of(node)) {
      result.leaves.push_back(*leaf);
      return false;
    }
    return true;
  });
  return result;
}

std::optional<Split> split_shared_edges(const std::vector<at::Tensor>& losses,
                                        const at::Tensor& coeffs,
                                        const std::vector<at::Tensor>& shared,
                                        const std::vector<at::Tensor>& stops) {
  const size_t k = losses.size();
  if (k == 0 || k > 64 || coeffs.dim() != 1 || static_cast<size_t>(coeffs.size(0)) != k) {
    return std::nullopt;
  }
  const auto stop_nodes = grad_fns(stops);
  std::unordered_set<const c10::TensorImpl*> shared_leaves;
  for (const auto& t : shared) shared_leaves.insert(t.unsafeGetTensorImpl());

  // Per node reached: which losses reach it (bit i: losses[i]), its leaf (AccumulateGrad) and
  // whether it is a stop; the nodes in the order first reached. One walk per loss, the masks its
  // "seen" set.
  struct Reached {
    uint64_t mask = 0;
    const at::Tensor* leaf = nullptr;
    bool stop = false;
  };
  std::unordered_map<Node*, Reached> reached;
  reached.reserve(256);
  std::vector<Node*> order, stack;
  for (size_t i = 0; i < k; ++i) {
    Node* root = losses[i].grad_fn().get();
    if (root == nullptr || stop_nodes.count(root) || leaf_of(root) != nullptr) return std::nullopt;
    const uint64_t bit = uint64_t{1} << i;
    stack.assign(1, root);
    while (!stack.empty()) {
      Node* node = stack.back();
      stack.pop_back();
      if (node == nullptr) continue;
      auto [entry, fresh] = reached.try_emplace(node);
      Reached& info = entry->second;
      if (fresh) {
        order.push_back(node);
        info.leaf = leaf_of(node);
        info.stop = stop_nodes.count(node) > 0;
      }
      if (info.mask & bit) continue;
      info.mask |= bit;
      if (info.leaf != nullptr || info.stop) continue;
      for (const auto& edge : node->next_edges()) stack.push_back(edge.function.get());
    }
  }
  for (size_t i = 0; i < k; ++i) {  // a loss whose node another loss reaches: not separable
    if (reached.at(losses[i].grad_fn().get()).mask != uint64_t{1} << i) return std::nullopt;
  }
  auto is_shared_leaf = [&](const Reached& info) {
    return info.leaf != nullptr && shared_leaves.count(info.leaf->unsafeGetTensorImpl()) > 0;
  };

  Split split;
  std::vector<std::tuple<Node*, int64_t, std::vector<size_t>>> hooks;
  for (Node* node : order) {
    const Reached& info = reached.at(node);
    const bool several = std::popcount(info.mask) > 1;
    if (info.leaf != nullptr) {
      if (is_shared_leaf(info)) continue;
      if (several) return std::nullopt;  // another leaf behind the shared part
      split.specific.push_back(*info.leaf);
      continue;
    }
    if (several || info.stop) continue;
    // Where the shared part begins: a node more than one loss reaches, a stop, a shared leaf.
    std::vector<size_t> edges;
    const auto& next = node->next_edges();
    for (size_t e = 0; e < next.size(); ++e) {
      Node* target = next[e].function.get();
      if (target == nullptr) continue;
      const Reached& to = reached.at(target);
      if (std::popcount(to.mask) > 1 || to.stop || is_shared_leaf(to)) edges.push_back(e);
    }
    if (!edges.empty()) {
      hooks.emplace_back(node, std::countr_zero(info.mask), std::move(edges));
    }
  }
  split.armed = std::make_shared<bool>(true);
  for (auto& [node, task, edges] : hooks) {
    node->add_post_hook(
        std::make_unique<ScaleEdges>(std::move(edges), coeffs.select(0, task), split.armed));
  }
  return split;
}

}  // namespace fusedmtl::task_graph
