// Every op of fusedmtl: its schema, and its implementation per dispatch key.
// Fake (meta) and autograd registrations live in python/fusedmtl/ops/native.py.
#include <torch/library.h>

#include "losses/losses.h"

TORCH_LIBRARY(fusedmtl, m) {
  // Regression losses. kind: 'l1' | 'mse' | 'smooth_l1' | 'huber'; param: beta (smooth_l1) or
  // delta (huber); reduction: 0 none, 1 mean, 2 sum. input and target: same shape and dtype.
  m.def("regression_loss(Tensor input, Tensor target, str kind, float param, int reduction)"
        " -> Tensor");
  m.def("regression_loss_with_grad(Tensor input, Tensor target, str kind, float param,"
        " int reduction, bool input_grad, bool target_grad) -> (Tensor, Tensor, Tensor)");
  m.def("regression_loss_backward(Tensor grad_output, Tensor input, Tensor target, str kind,"
        " float param, int reduction, bool input_grad, bool target_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedmtl, CPU, m) {
  m.impl("regression_loss", &fusedmtl::losses::regression_loss_cpu);
  m.impl("regression_loss_with_grad", &fusedmtl::losses::regression_loss_with_grad_cpu);
  m.impl("regression_loss_backward", &fusedmtl::losses::regression_loss_backward_cpu);
}

#ifdef FUSEDMTL_WITH_CUDA
TORCH_LIBRARY_IMPL(fusedmtl, CUDA, m) {
  m.impl("regression_loss", &fusedmtl::losses::regression_loss_cuda);
  m.impl("regression_loss_with_grad", &fusedmtl::losses::regression_loss_with_grad_cuda);
  m.impl("regression_loss_backward", &fusedmtl::losses::regression_loss_backward_cuda);
}
#endif
