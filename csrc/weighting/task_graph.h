// Walks of the autograd graph behind the task losses, for the gradient-based weightings
// (python/fusedmtl/weighting/task_gradients.py holds the Python walk these mirror, which tests
// compare against). Graph introspection, not an op: no dispatcher, no device work.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <optional>
#include <utility>
#include <vector>

namespace fusedmtl::task_graph {

// The leaves requiring grad that `root`'s graph reaches without passing through the grad_fn of a
// tensor in `stops`, in depth-first order (next edges in order), and whether a stop was reached.
struct Leaves {
  std::vector<at::Tensor> leaves;
  bool stopped = false;
};
Leaves reachable_leaves(const at::Tensor& root, const std::vector<at::Tensor>& stops);

// One backward pass of sum_i L_i that gives the tensors in `shared` the gradient of
// sum_i coeffs[i] L_i and every other leaf the unweighted gradient of the losses reaching it: each
// edge by which a node only losses[i] reaches passes its gradient on to a node that other losses
// reach too (or to a shared leaf, or to a stop) is scaled by coeffs[i], once, by a post hook on
// that node. Possible when every shared leaf and stop lies behind such edges and every other leaf
// in front of them; otherwise nothing is installed and nullopt returned.
//
// The hooks fire once and only while `armed` holds true (Armed's destructor clears it), so a
// retained graph's later backward passes are unweighted.
struct Split {
  std::vector<at::Tensor> specific;  // the other leaves, in depth-first order
  std::shared_ptr<bool> armed;
};
std::optional<Split> split_shared_edges(const std::vector<at::Tensor>& losses,
                                        const at::Tensor& coeffs,
                                        const std::vector<at::Tensor>& shared,
                                        const std::vector<at::Tensor>& stops);

// Reads each gradient the next backward passes gives `leaves` (to .grad or to autograd.grad)
// as it arrives, while it is still in cache, for a non-finite element: a tensor pre hook on each
// leaf (a non-leaf makes finite() nullopt), removed when the watch is destroyed. CPU gradients
// only, dense, of the four float dtypes (an exact test of the exponent bits); `finite()` is nullopt
// once a gradient it could not read arrived (or a hook was cleared: setting a tensor's Python hook
// dict does that), false once a non-finite one did. The hooks run on the engine's thread: the
// caller reads `finite()` after the pass.
class FiniteWatch {
 public:
  struct State {
    bool finite = true;
    bool unread = false;
  };
  explicit FiniteWatch(const std::vector<at::Tensor>& leaves);
  ~FiniteWatch();
  FiniteWatch(const FiniteWatch&) = delete;
  FiniteWatch& operator=(const FiniteWatch&) = delete;
  std::optional<bool> finite() const;

 private:
  std::shared_ptr<State> state_;
  std::vector<at::Tensor> leaves_;
};

}  // namespace fusedmtl::task_graph
