// Every op of fusedmtl: its schema, and its implementation per dispatch key.
// Fake (meta) and autograd registrations live in python/fusedmtl/losses/native.py.
#include <torch/library.h>

#include "linalg/linalg.h"
#include "losses/losses.h"
#include "multi_tensor/multi_tensor.h"

TORCH_LIBRARY(fusedmtl, m) {
  // Regression losses. kind: 'l1' | 'mse' | 'smooth_l1' | 'huber'; param: beta (smooth_l1) or
  // delta (huber); reduction: 0 none, 1 mean, 2 sum. input and target: same shape and dtype.
  m.def(
      "regression_loss(Tensor input, Tensor target, str kind, float param, int reduction)"
      " -> Tensor");
  m.def(
      "regression_loss_with_grad(Tensor input, Tensor target, str kind, float param,"
      " int reduction, bool input_grad, bool target_grad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "regression_loss_backward(Tensor grad_output, Tensor input, Tensor target, str kind,"
      " float param, int reduction, bool input_grad, bool target_grad) -> (Tensor, Tensor)");
  // The eager CPU fast path of a reduced loss: the gradient is computed in forward and handed to
  // autograd as it is (its autograd kernel is in C++); below autograd it is regression_loss.
  m.def(
      "regression_loss_eager(Tensor input, Tensor target, str kind, float param, int reduction)"
      " -> Tensor");

  // Heteroscedastic regression losses (Kendall & Gal 2017): log_var = s = log sigma^2 per element.
  // kind: 'l2' (0.5 exp(-s) d^2 + 0.5 s) | 'l1' (exp(-s) |d| + s) | 'smooth_l1' (exp(-s)
  // smooth_l1(d; beta) + s); input, target and log_var: same shape and dtype. The backward ops
  // return grad_input and grad_log_var; the target's gradient is -grad_input.
  m.def(
      "heteroscedastic_loss(Tensor input, Tensor target, Tensor log_var, str kind, float beta,"
      " int reduction) -> Tensor");
  m.def(
      "heteroscedastic_loss_with_grad(Tensor input, Tensor target, Tensor log_var, str kind,"
      " float beta, int reduction, bool input_grad, bool log_var_grad) -> (Tensor, Tensor, "
      "Tensor)");
  m.def(
      "heteroscedastic_loss_backward(Tensor grad_output, Tensor input, Tensor target,"
      " Tensor log_var, str kind, float beta, int reduction, bool input_grad,"
      " bool log_var_grad) -> (Tensor, Tensor)");

  // Multi-tensor kernels over task gradients: grads holds K lists of P optional tensors, task i's
  // gradient of parameter p at index i * P + p (None: the task does not reach the parameter).
  m.def("multi_tensor_gramian(Tensor?[] grads, int num_tasks, bool diagonal_only) -> Tensor");
  m.def(
      "multi_tensor_combine(Tensor?[] grads, int num_tasks, Tensor coeffs, Tensor(a!)[] out,"
      " bool accumulate) -> ()");
  m.def(
      "multi_tensor_normalized_sum(Tensor?[] grads, int num_tasks, float eps, Tensor(a!)[] out,"
      " bool accumulate) -> Tensor");
  m.def(
      "multi_tensor_add_l1_l2_penalty(Tensor[] params, Tensor(a!)[] grads, bool overwrite,"
      " float l1, float l2) -> Tensor");
  // TrimmedMean's masks, in place: each gradient element kept where its value ranks in
  // [trim, K - trim) among the K tasks' values at its coordinate, zeroed (times 0) elsewhere.
  // Every one of the K * P gradients is given (a mutable list of optional tensors is not
  // functionalized by torch.compile): the caller passes zeros for a task that does not reach p.
  m.def("multi_tensor_trim_(Tensor(a!)[] grads, int num_tasks, int trim) -> ()");
  // GradDrop's sign dropout, in place (f the identity): per coordinate, with P the sign purity
  // and U uniforms[p] there, g_i *= leak_i + (1 - leak_i) [P > U and g_i > 0 or P < U and
  // g_i < 0]. grads as for trim_; uniforms: P tensors of the gradients' dtype, one per parameter;
  // leak: K floats.
  m.def(
      "multi_tensor_sign_dropout_(Tensor(a!)[] grads, int num_tasks, Tensor[] uniforms,"
      " Tensor leak) -> ()");

  // The weighting solvers' small dense linear algebra, without a host sync (torch.linalg's
  // eigh, svd and pinv read LAPACK's error code on the host). The thin SVD of A [..., m, n]
  // (float32 | float64, n <= m <= 128, n <= 64) by one-sided Jacobi: U [..., m, n], S [..., n]
  // descending, V [..., n, n] (not V^T); U's column of a zero singular value is 0.
  m.def("jacobi_svd(Tensor A) -> (Tensor U, Tensor S, Tensor V)");
  // The eigenvalues (ascending) and eigenvectors (columns) of the symmetric A [..., n, n] (its
  // lower triangle; n <= 64), by the same sweeps on A + r I, r >= its spectral radius.
  m.def("jacobi_eigh(Tensor A) -> (Tensor eigenvalues, Tensor eigenvectors)");
}

TORCH_LIBRARY_IMPL(fusedmtl, CPU, m) {
  m.impl("regression_loss", &fusedmtl::losses::regression_loss_cpu);
  m.impl("regression_loss_with_grad", &fusedmtl::losses::regression_loss_with_grad_cpu);
  m.impl("regression_loss_backward", &fusedmtl::losses::regression_loss_backward_cpu);
  m.impl("regression_loss_eager", &fusedmtl::losses::regression_loss_cpu);
  m.impl("heteroscedastic_loss", &fusedmtl::losses::heteroscedastic_loss_cpu);
  m.impl("heteroscedastic_loss_with_grad", &fusedmtl::losses::heteroscedastic_loss_with_grad_cpu);
  m.impl("heteroscedastic_loss_backward", &fusedmtl::losses::heteroscedastic_loss_backward_cpu);
  m.impl("multi_tensor_gramian", &fusedmtl::multi_tensor::gramian_cpu);
  m.impl("multi_tensor_combine", &fusedmtl::multi_tensor::combine_cpu);
  m.impl("multi_tensor_normalized_sum", &fusedmtl::multi_tensor::normalized_sum_cpu);
  m.impl("multi_tensor_add_l1_l2_penalty", &fusedmtl::multi_tensor::l1_l2_penalty_cpu);
  m.impl("multi_tensor_trim_", &fusedmtl::multi_tensor::trim_cpu);
  m.impl("multi_tensor_sign_dropout_", &fusedmtl::multi_tensor::sign_dropout_cpu);
  m.impl("jacobi_svd", &fusedmtl::linalg::jacobi_svd_cpu);
  m.impl("jacobi_eigh", &fusedmtl::linalg::jacobi_eigh_cpu);
}

TORCH_LIBRARY_IMPL(fusedmtl, AutogradCPU, m) {
  m.impl("regression_loss_eager", &fusedmtl::losses::regression_loss_eager_autograd_cpu);
}

#ifdef FUSEDMTL_WITH_CUDA
TORCH_LIBRARY_IMPL(fusedmtl, CUDA, m) {
  m.impl("regression_loss", &fusedmtl::losses::regression_loss_cuda);
  m.impl("regression_loss_with_grad", &fusedmtl::losses::regression_loss_with_grad_cuda);
  m.impl("regression_loss_backward", &fusedmtl::losses::regression_loss_backward_cuda);
  m.impl("heteroscedastic_loss", &fusedmtl::losses::heteroscedastic_loss_cuda);
  m.impl("heteroscedastic_loss_with_grad", &fusedmtl::losses::heteroscedastic_loss_with_grad_cuda);
  m.impl("heteroscedastic_loss_backward", &fusedmtl::losses::heteroscedastic_loss_backward_cuda);
  m.impl("multi_tensor_gramian", &fusedmtl::multi_tensor::gramian_cuda);
  m.impl("multi_tensor_combine", &fusedmtl::multi_tensor::combine_cuda);
  m.impl("multi_tensor_normalized_sum", &fusedmtl::multi_tensor::normalized_sum_cuda);
  m.impl("multi_tensor_add_l1_l2_penalty", &fusedmtl::multi_tensor::l1_l2_penalty_cuda);
  m.impl("multi_tensor_trim_", &fusedmtl::multi_tensor::trim_cuda);
  m.impl("multi_tensor_sign_dropout_", &fusedmtl::multi_tensor::sign_dropout_cuda);
  m.impl("jacobi_svd", &fusedmtl::linalg::jacobi_svd_cuda);
  m.impl("jacobi_eigh", &fusedmtl::linalg::jacobi_eigh_cuda);
}
#endif
