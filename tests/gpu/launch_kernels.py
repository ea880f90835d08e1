"""Launches every compiled and Triton kernel of fusedmtl once, small, for compute-sanitizer.

`make gpu-check` runs this under compute-sanitizer's memcheck, racecheck, synccheck and initcheck:
each op of the schema list in csrc/torch_bindings.cpp at least once per dtype family, the Gramian
at K = 2, 8, 9, 40 and 64 (the register-resident, tiled and largest task counts), normalized_sum
through the cooperative launch and through the two-launch fallback, the in-place trim_ and
sign_dropout_, jacobi_svd at 4 x 4, 9 x 8 (an odd pair count) and 65 x 64 (above 48 KB of
dynamic shared memory in float64) and in a batch of 3, jacobi_eigh with and without its shifted
second pass, and the Triton kernels of every layer. It
checks no values (the test suite does that); it only has to touch every kernel.

    python tests/gpu/launch_kernels.py --device cuda     # what gpu-check runs
    python tests/gpu/launch_kernels.py --device cpu      # CI: the same calls on the CPU kernels

Sizes are small (a few thousand elements, plus one tensor above a CUDA work item of 64K elements)
so that a sanitizer run takes seconds per tool, not minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext

import torch

LOSS_KINDS = (("l1", 0.0), ("mse", 0.0), ("smooth_l1", 1.0), ("smooth_l1", 0.3), ("huber", 0.7))
HETEROSCEDASTIC_KINDS = (("l2", 1.0), ("l1", 1.0), ("smooth_l1", 0.5))
TASK_COUNTS = (2, 8, 9, 40, 64)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# jacobi_svd's matrices: square, an odd column count, two over 48 KB of shared memory in float64
# (m * 64 + 64 * 64 + 64 doubles: the launch opts in), and a batch of 3.
JACOBI_SHAPES = ((4, 4), (9, 8), (64, 64), (65, 64), (3, 9, 8))
JACOBI_DTYPES = (torch.float32, torch.float64)


def launch_losses(device: str, n: int) -> int:
    ops = torch.ops.fusedmtl
    launches = 0
    for dtype in DTYPES:
        x = torch.randn(n, device=device, dtype=dtype)
        t = torch.randn(n, device=device, dtype=dtype)
        s = torch.randn(n, device=device, dtype=dtype) * 0.5
        for kind, param in LOSS_KINDS:
            for reduction in (0, 1, 2):
                ops.regression_loss(x, t, kind, param, reduction)
                grad_out = torch.ones((n,) if reduction == 0 else (), device=device, dtype=dtype)
                ops.regression_loss_backward(grad_out, x, t, kind, param, reduction, True, True)
                launches += 2
                if reduction:  # the fused forward + gradient exists for reduced losses only
                    ops.regression_loss_with_grad(x, t, kind, param, reduction, True, True)
                    launches += 1
        for kind, beta in HETEROSCEDASTIC_KINDS:
            for reduction in (0, 1, 2):
                ops.heteroscedastic_loss(x, t, s, kind, beta, reduction)
                grad_out = torch.ones((n,) if reduction == 0 else (), device=device, dtype=dtype)
                ops.heteroscedastic_loss_backward(
                    grad_out, x, t, s, kind, beta, reduction, True, True
                )
                launches += 2
                if reduction:
                    ops.heteroscedastic_loss_with_grad(x, t, s, kind, beta, reduction, True, True)
                    launches += 1
    return launches


def _task_grads(k: int, shapes, device: str, dtype: torch.dtype):
    return [[torch.randn(shape, device=device, dtype=dtype) for shape in shapes] for _ in range(k)]


def launch_multi_tensor(device: str) -> int:
    ops = torch.ops.fusedmtl
    # One tensor larger than a CUDA work item (64K elements), odd sizes, a scalar.
    shapes = [(300, 257), (17,), (), (64, 3, 3, 3)]
    launches = 0
    for dtype in DTYPES:
        for k in TASK_COUNTS:
            grads = _task_grads(k, shapes, device, dtype)
            flat = [g for task in grads for g in task]
            ops.multi_tensor_gramian(flat, k, False)
            ops.multi_tensor_gramian(flat, k, True)
            out = [torch.zeros(shape, device=device, dtype=dtype) for shape in shapes]
            coeffs = torch.rand(k, device=device, dtype=torch.float32)
            ops.multi_tensor_combine(flat, k, coeffs, out, False)
            ops.multi_tensor_combine(flat, k, coeffs, out, True)
            launches += 4
            # The cooperative one-launch path, then the two-launch fallback (read per call).
            for disabled in ("0", "1"):
                os.environ["FUSEDMTL_NO_COOPERATIVE"] = disabled
                ops.multi_tensor_normalized_sum(flat, k, 1e-8, out, False)
                ops.multi_tensor_normalized_sum(flat, k, 1e-8, out, True)
                launches += 2
            os.environ.pop("FUSEDMTL_NO_COOPERATIVE")
        for k in (3, 64):  # the in-place ops: a median of 3, and 64 tasks
            flat = [g for task in _task_grads(k, shapes, device, dtype) for g in task]
            ops.multi_tensor_trim_(flat, k, (k - 1) // 2)
            uniforms = [torch.rand(shape, device=device, dtype=dtype) for shape in shapes]
            leak = torch.linspace(0, 0.5, k, device=device)
            ops.multi_tensor_sign_dropout_(flat, k, uniforms, leak)
            launches += 2
        params = [torch.randn(shape, device=device, dtype=dtype) for shape in shapes]
        grads = [torch.randn(shape, device=device, dtype=dtype) for shape in shapes]
        ops.multi_tensor_add_l1_l2_penalty(params, grads, False, 1e-3, 1e-2)
        ops.multi_tensor_add_l1_l2_penalty(params, grads, True, 1e-3, 1e-2)
        launches += 2
    return launches


def launch_linalg(device: str) -> int:
    ops = torch.ops.fusedmtl
    launches = 0
    for dtype in JACOBI_DTYPES:
        for shape in JACOBI_SHAPES:
            A = torch.randn(shape, device=device, dtype=dtype)
            ops.jacobi_svd(A)
            launches += 1
            if shape[-1] == shape[-2]:  # both of its passes: the second on a +- pair
                ops.jacobi_eigh(A)
                ops.jacobi_eigh(torch.tensor([[0.0, 1.0], [1.0, 0.0]], device=device, dtype=dtype))
                launches += 2
    return launches


def launch_triton(device: str, n: int) -> int:
    """The Triton kernels, through the public API with the Triton backend forced."""
    import fusedmtl
    import fusedmtl.linalg
    import fusedmtl.multi_tensor as mt

    launches = 0
    with fusedmtl.backend.use("triton"):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
            t = torch.randn(n, device=device, dtype=dtype)
            s = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
            for loss in (
                fusedmtl.l1_loss,
                fusedmtl.mse_loss,
                fusedmtl.smooth_l1_loss,
                fusedmtl.huber_loss,
            ):
                loss(x, t).backward()
                launches += 2
            fusedmtl.heteroscedastic_loss(x, t, s).backward()
            launches += 2
            for k in TASK_COUNTS:
                grads = _task_grads(k, [(300, 257), (17,)], device, dtype)
                mt.gramian(grads)
                out = [torch.zeros_like(g) for g in grads[0]]
                mt.combine(grads, torch.rand(k, device=device), out=out)
                mt.normalized_sum(grads, out=out)
                mt.trim_(grads, (k - 1) // 2)
                mt.sign_dropout_(grads, [torch.rand_like(g) for g in grads[0]], torch.zeros(k))
                launches += 5
        for dtype in JACOBI_DTYPES:
            for shape in JACOBI_SHAPES:
                A = torch.randn(shape, device=device, dtype=dtype)
                fusedmtl.linalg.jacobi_svd(A)
                fusedmtl.linalg.eigh(A.mT @ A)
                launches += 2
    return launches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument(
        "--elements",
        type=int,
        default=4099,
        help="elements per loss tensor (odd: exercises the vector tails)",
    )
    parser.add_argument("--skip-triton", action="store_true")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import fusedmtl  # noqa: F401  (registers the ops)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("launch_kernels: no CUDA device", file=sys.stderr)
        return 2
    with torch.cuda.device(args.device) if args.device.startswith("cuda") else nullcontext():
        launches = launch_losses(args.device, args.elements)
        launches += launch_multi_tensor(args.device)
        launches += launch_linalg(args.device)
        if not args.skip_triton and fusedmtl.backend.triton_runs_on(args.device):
            launches += launch_triton(args.device, args.elements)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    print(f"launch_kernels: {launches} op calls on {args.device}, no error")
    return 0


if __name__ == "__main__":
    sys.exit(main())
