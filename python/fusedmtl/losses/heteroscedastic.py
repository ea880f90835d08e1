"""Heteroscedastic (per-element uncertainty) regression losses with fused kernels.

Which implementation runs is chosen by :mod:`fusedmtl.backend`, as for the other losses.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import _reduction
from torch.overrides import handle_torch_function, has_torch_function_variadic

from fusedmtl import backend
from fusedmtl.losses import reference
from fusedmtl.losses.functional import _chosen_backend, _device_mismatch, _eager_gradient_wanted
from fusedmtl.losses.kinds import check_heteroscedastic

if backend._C is not None:
    from fusedmtl.losses.native import FusedHeteroscedasticWithGrad

__all__ = ["heteroscedastic_loss"]


def heteroscedastic_loss(
    input: Tensor,
    target: Tensor,
    log_var: Tensor,
    kind: str = "l2",
    beta: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Heteroscedastic regression loss (Kendall & Gal, "What Uncertainties Do We Need in Bayesian
    Deep Learning for Computer Vision?", NeurIPS 2017).

    The network predicts, besides ``input``, the log-variance ``log_var`` = s = log sigma^2 of each
    element: elements it is unsure of are down-weighted by exp(-s) at the price of the penalty s.
    With d = input - target, per element:

    - ``kind='l2'`` (Gaussian likelihood): 0.5 * exp(-s) * d^2 + 0.5 * s. This is
      :class:`torch.nn.GaussianNLLLoss` (``full=False``, ``eps`` -> 0) with var = exp(log_var).
    - ``kind='l1'`` (Laplace likelihood): exp(-s) * |d| + s.
    - ``kind='smooth_l1'``: exp(-s) * smooth_l1(d; beta) + s, smooth_l1 exactly as
      :func:`torch.nn.functional.smooth_l1_loss` (beta == 0 is the L1 form).

    Gradients flow to input, target (the negation of input's) and log_var:
    d/d input = w exp(-s) b'(d), d/d s = w (1 - exp(-s) b(d)) with b the base loss and w = 0.5
    for 'l2', 1 otherwise.

    Args:
        input, target, log_var: tensors broadcastable together (as :func:`torch.broadcast_tensors`)
            of float32, float64, float16 or bfloat16 (mixed dtypes promote as in torch; float16
            and bfloat16 are computed and accumulated in float32, and the result rounded once).
            Gradients of broadcast arguments are summed back to their shapes.
        kind: 'l2' | 'l1' | 'smooth_l1'.
        beta: the smooth-L1 threshold, >= 0 (ignored by the other kinds, but still checked).
        reduction: 'none' (the element-wise loss, of the broadcast shape) | 'mean' | 'sum' (0-dim);
            'mean' of an empty tensor is nan, as in torch.

    Returns:
        The element-wise loss of the broadcast shape (reduction='none') or a 0-dim tensor, of the
        promoted dtype.

    Mean and sum are computed in fixed blocks added in order: the result does not depend on the
    number of threads.
    """
    if has_torch_function_variadic(input, target, log_var):
        return handle_torch_function(
            heteroscedastic_loss,
            (input, target, log_var),
            input,
            target,
            log_var,
            kind=kind,
            beta=beta,
            reduction=reduction,
        )
    reduction_code = _reduction.get_enum(reduction)  # ValueError for an unknown reduction
    check_heteroscedastic(kind, beta)
    if not (input.device == target.device == log_var.device):
        raise _device_mismatch(input=input, target=target, log_var=log_var)
    dtype = torch.promote_types(torch.promote_types(input.dtype, target.dtype), log_var.dtype)
    if not dtype.is_floating_point:
        raise NotImplementedError(
            f"\"heteroscedastic_loss\" not implemented for '{dtype}': input, target and log_var "
            "must include a floating-point tensor"
        )
    input, target, log_var = input.to(dtype), target.to(dtype), log_var.to(dtype)
    if not (input.shape == target.shape == log_var.shape):
        # The kernels take one shape: expand (autograd sums the gradients of a broadcast
        # argument back to its shape, with sum_to_size) and copy into contiguous memory.
        input, target, log_var = (
            t.contiguous() for t in torch.broadcast_tensors(input, target, log_var)
        )

    chosen = _chosen_backend(input.device)
    if chosen == "native":
        if reduction_code != 0 and _eager_gradient_wanted(input, target, log_var):
            return FusedHeteroscedasticWithGrad.apply(
                input, target, log_var, kind, beta, reduction_code
            )
        return torch.ops.fusedmtl.heteroscedastic_loss(
            input, target, log_var, kind, beta, reduction_code
        )
    if chosen == "triton":
        from fusedmtl.losses import triton  # noqa: F401  (registers the op on first use)

        return torch.ops.fusedmtl.triton_heteroscedastic_loss(
            input, target, log_var, kind, beta, reduction_code
        )
    return reference.heteroscedastic_loss(input, target, log_var, kind, beta, reduction)
