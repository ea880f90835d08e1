"""Fake (meta) implementations of the compiled multi-tensor ops, for torch.compile and opcheck.
The schemas and kernels are in csrc/torch_bindings.cpp and csrc/multi_tensor/."""

from __future__ import annotations

import torch

from fusedmtl.multi_tensor.reference import accumulate_dtype


def _first_defined(grads):
    for g in grads:
        if g is not None:
            return g
    return None


@torch.library.register_fake("fusedmtl::multi_tensor_gramian")
def _gramian_fake(grads, num_tasks, diagonal_only):
    first = _first_defined(grads)
    dtype = accumulate_dtype(first.dtype) if first is not None else torch.float32
    device = first.device if first is not None else None
    shape = (num_tasks,) if diagonal_only else (num_tasks, num_tasks)
    return torch.empty(shape, dtype=dtype, device=device)


@torch.library.register_fake("fusedmtl::multi_tensor_combine")
def _combine_fake(grads, num_tasks, coeffs, out, accumulate):
    return None


@torch.library.register_fake("fusedmtl::multi_tensor_normalized_sum")
def _normalized_sum_fake(grads, num_tasks, eps, out, accumulate):
    return _gramian_fake(grads, num_tasks, True)


@torch.library.register_fake("fusedmtl::multi_tensor_trim_")
def _trim_fake(grads, num_tasks, trim):
    return None


@torch.library.register_fake("fusedmtl::multi_tensor_sign_dropout_")
def _sign_dropout_fake(grads, num_tasks, uniforms, leak):
    return None


@torch.library.register_fake("fusedmtl::multi_tensor_add_l1_l2_penalty")
def _penalty_fake(params, grads, overwrite, l1, l2):
    dtype = accumulate_dtype(params[0].dtype) if params else torch.float32
    return torch.empty((), dtype=dtype, device=params[0].device if params else None)
