"""What the build contains: `make cuda-check` sets FUSEDMTL_EXPECT_CUDA=1 to prove that the CUDA
kernels were compiled, linked and registered (they import and register without a GPU)."""

from __future__ import annotations

import os

import pytest
import torch

import fusedmtl

OPS = (
    "regression_loss",
    "regression_loss_with_grad",
    "regression_loss_backward",
    "heteroscedastic_loss",
    "heteroscedastic_loss_with_grad",
    "heteroscedastic_loss_backward",
    "multi_tensor_gramian",
    "multi_tensor_combine",
    "multi_tensor_normalized_sum",
    "multi_tensor_add_l1_l2_penalty",
    "multi_tensor_trim_",
    "multi_tensor_sign_dropout_",
)
CUDA_OPS = OPS


def test_every_op_has_a_cpu_kernel():
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedmtl::{op}", "CPU"), op


@pytest.mark.skipif(os.environ.get("FUSEDMTL_EXPECT_CUDA") != "1", reason="not a CUDA build check")
def test_cuda_kernels_are_built_and_registered():
    info = fusedmtl.backend.info()
    assert info["extension"] and info["extension_cuda"], info
    assert torch.version.cuda is not None
    for op in CUDA_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedmtl::{op}", "CUDA"), op
