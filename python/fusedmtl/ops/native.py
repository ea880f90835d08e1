"""The compiled loss ops (torch.ops.fusedmtl.*) made ready for autograd and torch.compile.

The schemas and kernels are in csrc/torch_bindings.cpp; this module adds their fake (meta)
implementations and autograd formulas, and the eager fast path:

- ``regression_loss`` is the op torch.compile and GPUs see: backward recomputes the gradient from
  input and target in one pass with grad_output folded in (``regression_loss_backward``; 5N elements
  moved in forward + backward).
- ``regression_loss_eager``, used in eager mode on CPU when a gradient is needed, computes the
  gradient in the forward pass itself (``regression_loss_with_grad``) and hands that buffer to
  autograd as it is when grad_output is 1 (``loss.backward()``): 3N elements moved, the minimum.
  Its autograd is a C++ function (csrc/losses/cpu/loss_autograd_cpu.cpp): no Python in the step.
- Under create_graph=True both fall back to the differentiable formula of ``naive`` (see
  loss_autograd.py), so double backward gives torch's results.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedmtl.ops.loss_autograd import register_loss_autograd


def _new_grad(input: Tensor, wanted: bool) -> Tensor:
    return input.new_empty(input.shape) if wanted else input.new_empty(0)


@torch.library.register_fake("fusedmtl::regression_loss")
def _regression_loss_fake(input, target, kind, param, reduction):
    return input.new_empty(input.shape if reduction == 0 else ())


@torch.library.register_fake("fusedmtl::regression_loss_with_grad")
def _regression_loss_with_grad_fake(input, target, kind, param, reduction, input_grad, target_grad):
    return input.new_empty(()), _new_grad(input, input_grad), _new_grad(input, target_grad)


@torch.library.register_fake("fusedmtl::regression_loss_backward")
def _regression_loss_backward_fake(
    grad_output, input, target, kind, param, reduction, input_grad, target_grad
):
    return _new_grad(input, input_grad), _new_grad(input, target_grad)


register_loss_autograd("fusedmtl::regression_loss", torch.ops.fusedmtl.regression_loss_backward)
