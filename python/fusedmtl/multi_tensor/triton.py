"""Triton kernels of the multi-tensor ops: one launch for the Gramian (or norms) phase and one for
the combine phase, whatever the number of parameters.

The parameters are cut into work items of at most CHUNK elements; a table on the device holds, per
item, its length and the addresses of the item's first element in each task's gradient (0 where the
task does not reach the parameter), plus the output's address for combine. A program walks its item
in K x BLOCK tiles, so every element is read once for all K(K+1)/2 products (a tl.dot of the tile
with itself, in IEEE fp32). The tile is sized by K and the dtype (:func:`gramian_block`) so that
the shared memory tl.dot stages its operands in fits an A100 (163 KB) and an H100 (227 KB) for every
K <= 64. Per-item partial Gramians are added with torch.sum in float64 (no atomics: the same result
every run, and as the CPU adds its items). Values are upcast to the accumulation dtype right after
loading (the interpreter mis-computes bf16 arithmetic).

Each entry is a torch custom op (``fusedmtl::triton_multi_tensor_*``, the schemas of the native
ops) with a fake, so torch.compile and torch.library.opcheck see through it. ``COMPILE_CASES``
lists every kernel with the signatures and constants it is launched with, for the check that
compiles them for real GPUs (tests/test_gpu_resources.py).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusedmtl.backend import device_guard
from fusedmtl.multi_tensor.reference import accumulate_dtype

# The interpreter costs about 1 ms per program whatever its size: give it large items in one tile.
# On a GPU a program walks its item in tiles small enough to stay in registers.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CHUNK = 65536 if INTERPRETED else 16384
BLOCK = 65536 if INTERPRETED else 512
MAX_TASKS = 64
# Shared memory the Gramian's tl.dot may stage its two K x BLOCK operands in, per program: below
# the A100's 163 KB with room for the layout conversions Triton adds.
GRAMIAN_SHARED_BUDGET = 64 * 1024

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


def padded_tasks(k: int, diagonal_only: bool) -> int:
    """The task count rounded up to a power of two (tl.dot needs at least 16 rows)."""
    return max(2 if diagonal_only else 16, triton.next_power_of_2(k))


def tile_block(kp2: int) -> int:
    """Elements per kp2 x block tile of the K gradients: BLOCK, or less where the tile would be
    larger than the largest tensor Triton allows (2**20 elements: K > 16 under the interpreter)."""
    return min(BLOCK, tl.TRITON_MAX_TENSOR_NUMEL // kp2)


def partials_width(k: int, diagonal_only: bool) -> int:
    """Entries per item in the Gramian's partials: the padded task count for the norms (at most
    2K), and for the full Gramian the K(K+1)/2 entries of the upper triangle (the lower one is
    its mirror) padded to a multiple of 16, not the KP2 x KP2 tile (16 times as many at K = 2, 5
    times at K = 40). The padding keeps the result's bits: torch.sum over the items adds the
    columns of whole groups of 16 in another order than the rest (ATen's CPU reduction, measured
    with torch 2.13 on the default, AVX2 and AVX-512 kernels), and the tile's width was a multiple
    of 256."""
    if diagonal_only:
        return padded_tasks(k, True)
    pairs = k * (k + 1) // 2
    return (pairs + 15) // 16 * 16


def gramian_block(kp2: int, acc: torch.dtype, diagonal_only: bool) -> int:
    """Elements per tile of the Gramian: BLOCK, or for the full Gramian on a GPU the largest power
    of two whose two kp2 x block operands fit GRAMIAN_SHARED_BUDGET."""
    if INTERPRETED or diagonal_only:
        return tile_block(kp2) if INTERPRETED else min(BLOCK, 8192 // kp2)
    element = torch.empty((), dtype=acc).element_size()
    block = GRAMIAN_SHARED_BUDGET // (2 * kp2 * element)
    return max(16, min(BLOCK, 1 << (block.bit_length() - 1)))


@triton.jit
def _load_tile(
    row,
    start,
    n,
    FIRST: tl.constexpr,
    K: tl.constexpr,
    KP2: tl.constexpr,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Elements [start, start + BLOCK) of the item's K gradients as a KP2 x BLOCK tile (zeros past
    its length n and for absent tasks)."""
    tasks = tl.arange(0, KP2)
    base = tl.load(row + FIRST + tasks, mask=tasks < K, other=0)
    offsets = start + tl.arange(0, BLOCK)
    pointers = base.to(tl.pointer_type(DTYPE))[:, None] + offsets[None, :]
    mask = (base != 0)[:, None] & (offsets < n)[None, :]
    return tl.load(pointers, mask=mask, other=0.0).to(ACC)


@triton.jit
def _gramian_kernel(
    table_ptr,
    partials_ptr,
    K: tl.constexpr,
    KP2: tl.constexpr,
    DIAGONAL: tl.constexpr,
    WIDTH: tl.constexpr,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The item's partial Gramian as row ``item`` of partials (items x WIDTH, see
    :func:`partials_width`): the KP2 squared norms (zeros past K), or the K(K+1)/2 entries of the
    upper triangle row by row, then zeros; the rest of the KP2 x KP2 tile (KP2 >= 16 for tl.dot)
    is never stored."""
    item = tl.program_id(0).to(tl.int64)
    row = table_ptr + item * (K + 1)
    n = tl.load(row)
    rows = tl.arange(0, KP2)
    if DIAGONAL:
        squares = tl.zeros((KP2,), dtype=ACC)
        for start in range(0, CHUNK, BLOCK):
            x = _load_tile(row, start, n, 1, K, KP2, DTYPE, ACC, BLOCK)
            squares += tl.sum(x * x, axis=1)
        tl.store(partials_ptr + item * WIDTH + rows, squares)
    else:
        products = tl.zeros((KP2, KP2), dtype=ACC)
        for start in range(0, CHUNK, BLOCK):
            x = _load_tile(row, start, n, 1, K, KP2, DTYPE, ACC, BLOCK)
            products += tl.dot(x, tl.trans(x), input_precision="ieee")
        out = partials_ptr + item * WIDTH
        i = rows[:, None]
        j = rows[None, :]
        # (i, j) for i <= j < K at pair i * K - i * (i - 1) / 2 + (j - i), row by row
        pair = i * K - (i * (i - 1)) // 2 + (j - i)
        tl.store(out + pair, products, mask=(i <= j) & (j < K))
        padding = K * (K + 1) // 2 + tl.arange(0, 16)
        tl.store(out + padding, tl.zeros((16,), dtype=ACC), mask=padding < WIDTH)


@triton.jit
def _combine_kernel(
    table_ptr,
    coeffs_ptr,
    K: tl.constexpr,
    KP2: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    item = tl.program_id(0).to(tl.int64)
    row = table_ptr + item * (K + 2)
    out = tl.load(row).to(tl.pointer_type(DTYPE))
    n = tl.load(row + 1)
    tasks = tl.arange(0, KP2)
    c = tl.load(coeffs_ptr + tasks, mask=tasks < K, other=0.0).to(ACC)
    for start in range(0, CHUNK, BLOCK):
        x = _load_tile(row, start, n, 2, K, KP2, DTYPE, ACC, BLOCK)
        total = tl.sum(x * c[:, None], axis=0)
        offsets = start + tl.arange(0, BLOCK)
        if ACCUMULATE:
            total += tl.load(out + offsets, mask=offsets < n, other=0.0).to(ACC)
        tl.store(out + offsets, total.to(DTYPE), mask=offsets < n)


@triton.jit
def _penalty_kernel(
    table_ptr,
    constants_ptr,
    partials_ptr,
    OVERWRITE: tl.constexpr,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Table rows [grad, w, length]; constants [l1, 2 * l2] in ACC (a float argument would be
    fp32); partials[item] = (sum |w|, sum w^2) over the item; grad (+)= l1 * sign(w) + 2 l2 * w
    (csrc/multi_tensor/multi_tensor_math.h)."""
    item = tl.program_id(0).to(tl.int64)
    row = table_ptr + item * 3
    grad = tl.load(row).to(tl.pointer_type(DTYPE))
    w = tl.load(row + 1).to(tl.pointer_type(DTYPE))
    n = tl.load(row + 2)
    l1 = tl.load(constants_ptr)
    two_l2 = tl.load(constants_ptr + 1)
    abs_sum = tl.zeros((BLOCK,), dtype=ACC)
    square_sum = tl.zeros((BLOCK,), dtype=ACC)
    for start in range(0, CHUNK, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < n
        x = tl.load(w + offsets, mask=mask, other=0.0).to(ACC)
        sign = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0)).to(ACC)
        abs_sum += tl.abs(x)
        square_sum += x * x
        update = l1 * sign + two_l2 * x
        if not OVERWRITE:
            update = tl.load(grad + offsets, mask=mask, other=0.0).to(ACC) + update
        tl.store(grad + offsets, update.to(DTYPE), mask=mask)
    tl.store(partials_ptr + item * 2, tl.sum(abs_sum).to(tl.float64))
    tl.store(partials_ptr + item * 2 + 1, tl.sum(square_sum).to(tl.float64))


@triton.jit
def _trim_kernel(
    table_ptr,
    K: tl.constexpr,
    KP2: tl.constexpr,
    TRIM: tl.constexpr,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """TrimmedMean's masks in place (csrc/multi_tensor/multi_tensor_math.h, sorts_before): the
    item's K x BLOCK tile, each task j's row compared with the whole tile (the rank of x[i] counts
    the j a stable ascending sort puts before it), then the tile times its 0/1 keep mask stored
    back. Table rows [length, K addresses]."""
    item = tl.program_id(0).to(tl.int64)
    row = table_ptr + item * (K + 1)
    n = tl.load(row)
    tasks = tl.arange(0, KP2)
    bases = tl.load(row + 1 + tasks, mask=tasks < K, other=0)
    for start in range(0, n, BLOCK):
        x = _load_tile(row, start, n, 1, K, KP2, DTYPE, ACC, BLOCK)
        offsets = start + tl.arange(0, BLOCK)
        rank = tl.zeros((KP2, BLOCK), dtype=tl.int32)
        for j in range(K):
            base = tl.load(row + 1 + j)
            v = tl.load(base.to(tl.pointer_type(DTYPE)) + offsets, mask=offsets < n, other=0.0)
            v = v.to(ACC)[None, :]
            v_first = (v < x) | ((x != x) & (v == v))  # v sorts before x
            x_first = (x < v) | ((v != v) & (x == x))
            counted = tl.where(tasks[:, None] > j, ~x_first, v_first) & (tasks[:, None] != j)
            rank += counted.to(tl.int32)
        keep = (rank >= TRIM) & (rank < K - TRIM)
        pointers = bases.to(tl.pointer_type(DTYPE))[:, None] + offsets[None, :]
        mask = (tasks < K)[:, None] & (offsets < n)[None, :]
        tl.store(pointers, (x * keep.to(ACC)).to(DTYPE), mask=mask)


@triton.jit
def _sign_dropout_kernel(
    table_ptr,
    leak_ptr,
    K: tl.constexpr,
    DTYPE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """GradDrop's masks in place (csrc/multi_tensor/multi_tensor_math.h, sign_purity): the sums
    over the K rows in task order (a loop, not tl.sum's tree: the CPU's bits), then each row
    times leak + (1 - leak) * kept. Table rows [uniforms, length, K addresses]; leak: K floats
    in ACC."""
    item = tl.program_id(0).to(tl.int64)
    row = table_ptr + item * (K + 2)
    uniform = tl.load(row).to(tl.pointer_type(DTYPE))
    n = tl.load(row + 1)
    for start in range(0, n, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < n
        total = tl.zeros((BLOCK,), dtype=ACC)
        magnitude = tl.zeros((BLOCK,), dtype=ACC)
        for i in range(K):
            g = tl.load(row + 2 + i).to(tl.pointer_type(DTYPE))
            v = tl.load(g + offsets, mask=mask, other=0.0).to(ACC)
            total += v
            magnitude += tl.abs(v)
        if ACC == tl.float64:  # (IEEE division; div_rn is fp32 only)
            ratio = total / magnitude
        else:
            ratio = tl.math.div_rn(total, magnitude)
        purity = 0.5 * (1.0 + ratio)
        draw = tl.load(uniform + offsets, mask=mask, other=0.0).to(ACC)
        for i in range(K):
            g = tl.load(row + 2 + i).to(tl.pointer_type(DTYPE))
            v = tl.load(g + offsets, mask=mask, other=0.0).to(ACC)
            kept = ((purity > draw) & (v > 0)) | ((purity < draw) & (v < 0))
            keep_leak = tl.load(leak_ptr + i)
            factor = keep_leak + (1.0 - keep_leak) * kept.to(ACC)
            # (rtne said explicitly: the interpreter truncates to bf16 otherwise)
            tl.store(g + offsets, (v * factor).to(DTYPE, fp_downcast_rounding="rtne"), mask=mask)


def _device_table(rows: list[list[int]], device: torch.device) -> Tensor:
    cpu = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":  # pinned, so the copy does not wait for the host
        return cpu.pin_memory().to(device, non_blocking=True)
    return cpu


def _work_table(table, outs: list[Tensor] | None, device: torch.device) -> tuple[Tensor, int]:
    """int64 [items, (out,) length, K addresses]: one row per CHUNK-sized piece of a parameter."""
    rows = []
    for p in range(len(table[0])):
        grads = [g[p] for g in table]
        present = [g for g in grads if g is not None]
        if not present:
            continue
        numel, size = present[0].numel(), present[0].element_size()
        for begin in range(0, numel, CHUNK):
            row = [] if outs is None else [outs[p].data_ptr() + begin * size]
            row.append(min(CHUNK, numel - begin))
            row += [g.data_ptr() + begin * size if g is not None else 0 for g in grads]
            rows.append(row)
    if not rows:
        return torch.empty(0, dtype=torch.int64, device=device), 0
    return _device_table(rows, device), len(rows)


def _task_table(grads: list[Optional[Tensor]], num_tasks: int):
    """The flat K * P list of the schema as K lists of P contiguous tensors (or None), checked."""
    if num_tasks < 1 or num_tasks > MAX_TASKS or len(grads) % num_tasks:
        raise ValueError(
            f"fusedmtl triton multi_tensor: {len(grads)} gradients for {num_tasks} tasks (1 to "
            f"{MAX_TASKS} tasks, the same number of gradients each)"
        )
    first = _first(grads)
    for n, g in enumerate(grads):  # the kernels read every gradient as the first one's dtype
        if g is not None and (g.dtype != first.dtype or g.device != first.device):
            raise ValueError(
                f"fusedmtl triton multi_tensor: gradient {n} is {g.dtype} on {g.device} but "
                f"the first is {first.dtype} on {first.device}"
            )
    p = len(grads) // num_tasks
    return [
        [g.contiguous() if g is not None else None for g in grads[i * p : (i + 1) * p]]
        for i in range(num_tasks)
    ]


def _first(grads):
    return next((g for g in grads if g is not None), None)


@torch.library.custom_op("fusedmtl::triton_multi_tensor_gramian", mutates_args=())
def gramian_op(grads: list[Optional[Tensor]], num_tasks: int, diagonal_only: bool) -> Tensor:
    """Same contract as ``torch.ops.fusedmtl.multi_tensor_gramian``, run by Triton."""
    table = _task_table(grads, num_tasks)
    first = _first(grads)
    dtype = first.dtype if first is not None else torch.float32
    device = first.device if first is not None else torch.device("cpu")
    k = num_tasks
    acc = accumulate_dtype(dtype)
    work, items = _work_table(table, None, device)
    if items == 0:
        return torch.zeros((k,) if diagonal_only else (k, k), dtype=acc, device=device)
    kp2 = padded_tasks(k, diagonal_only)
    width = partials_width(k, diagonal_only)
    partials = torch.empty((items, width), dtype=acc, device=device)
    with device_guard(device):
        _gramian_kernel[(items,)](
            work,
            partials,
            K=k,
            KP2=kp2,
            DIAGONAL=diagonal_only,
            WIDTH=width,
            DTYPE=_TL_DTYPES[dtype],
            ACC=_TL_DTYPES[acc],
            CHUNK=CHUNK,
            BLOCK=gramian_block(kp2, acc, diagonal_only),
        )
    total = partials.sum(0, dtype=torch.float64).to(acc)
    if diagonal_only:
        return total[:k]
    # Entry (i, j) and its mirror (j, i) both read pair (min, max): exactly symmetric. A gather
    # by an index built on the device: no host synchronisation.
    tasks = torch.arange(k, device=device)
    first = torch.minimum(tasks[:, None], tasks[None, :])
    second = torch.maximum(tasks[:, None], tasks[None, :])
    return total[first * k - first * (first - 1) // 2 + (second - first)]


@gramian_op.register_fake
def _(grads, num_tasks, diagonal_only):
    first = _first(grads)
    dtype = accumulate_dtype(first.dtype) if first is not None else torch.float32
    device = first.device if first is not None else None
    return torch.empty(
        (num_tasks,) if diagonal_only else (num_tasks, num_tasks), dtype=dtype, device=device
    )


@torch.library.custom_op("fusedmtl::triton_multi_tensor_combine", mutates_args=("out",))
def combine_op(
    grads: list[Optional[Tensor]],
    num_tasks: int,
    coeffs: Tensor,
    out: list[Tensor],
    accumulate: bool,
) -> None:
    """Same contract as ``torch.ops.fusedmtl.multi_tensor_combine``, run by Triton: out[p] (+)=
    sum_i coeffs[i] * grads[i * P + p] for P contiguous outputs of the gradients' dtype."""
    table = _task_table(grads, num_tasks)
    if len(out) != len(table[0]):
        raise ValueError(
            f"fusedmtl triton combine: {len(out)} outputs for {len(table[0])} parameters"
        )
    if coeffs.numel() != num_tasks:
        raise ValueError(
            f"fusedmtl triton combine: expected {num_tasks} coefficients, got {coeffs.numel()}"
        )
    first = _first(grads)
    for p, target in enumerate(out):
        if not target.is_contiguous():
            raise ValueError(f"fusedmtl triton combine: output {p} must be contiguous")
        if first is not None and (target.dtype != first.dtype or target.device != first.device):
            raise ValueError(
                f"fusedmtl triton combine: output {p} is {target.dtype} on {target.device} but "
                f"the gradients are {first.dtype} on {first.device}"
            )
        if not accumulate and all(g[p] is None for g in table):
            target.zero_()
    if not out:
        return
    dtype, device = out[0].dtype, out[0].device
    work, items = _work_table(table, out, device)
    if items == 0:
        return
    acc = accumulate_dtype(dtype)
    # A CPU or float64 coefficient tensor: rounded once to the accumulation dtype, on the device.
    c = coeffs.reshape(num_tasks).to(torch.float64).to(device=device, dtype=acc).contiguous()
    with device_guard(device):
        _combine_kernel[(items,)](
            work,
            c,
            K=num_tasks,
            KP2=padded_tasks(num_tasks, True),
            ACCUMULATE=accumulate,
            DTYPE=_TL_DTYPES[dtype],
            ACC=_TL_DTYPES[acc],
            CHUNK=CHUNK,
            BLOCK=tile_block(padded_tasks(num_tasks, True)),
        )


@combine_op.register_fake
def _(grads, num_tasks, coeffs, out, accumulate):
    return None


@torch.library.custom_op("fusedmtl::triton_multi_tensor_add_l1_l2_penalty", mutates_args=("grads",))
def penalty_op(
    params: list[Tensor], grads: list[Tensor], overwrite: bool, l1: float, l2: float
) -> Tensor:
    """Same contract as ``torch.ops.fusedmtl.multi_tensor_add_l1_l2_penalty``, run by Triton."""
    if len(params) != len(grads) or not params:
        raise ValueError(
            f"fusedmtl triton penalty: {len(params)} parameters and {len(grads)} "
            "gradients (at least one, as many of each)"
        )
    dtype, device = params[0].dtype, params[0].device
    rows = []
    for p, (w, g) in enumerate(zip(params, grads)):
        if w.dtype != dtype or g.dtype != dtype or w.device != device or g.device != device:
            raise ValueError(
                f"fusedmtl triton penalty: parameter {p} and its gradient must be "
                f"{dtype} on {device}"
            )
        if not (w.is_contiguous() and g.is_contiguous()) or w.shape != g.shape:
            raise ValueError(
                f"fusedmtl triton penalty: parameter {p} and its gradient must be "
                "contiguous and of the same shape"
            )
        size = w.element_size()
        rows += [
            [g.data_ptr() + b * size, w.data_ptr() + b * size, min(CHUNK, w.numel() - b)]
            for b in range(0, w.numel(), CHUNK)
        ]
    acc = accumulate_dtype(dtype)
    if not rows:
        return torch.zeros((), dtype=acc, device=device)
    constants = torch.tensor([float(l1), 2 * float(l2)], dtype=acc)
    if device.type == "cuda":
        constants = constants.pin_memory().to(device, non_blocking=True)
    partials = torch.empty((len(rows), 2), dtype=torch.float64, device=device)
    with device_guard(device):
        _penalty_kernel[(len(rows),)](
            _device_table(rows, device),
            constants,
            partials,
            OVERWRITE=overwrite,
            DTYPE=_TL_DTYPES[dtype],
            ACC=_TL_DTYPES[acc],
            CHUNK=CHUNK,
            BLOCK=BLOCK,
        )
    sums = partials.sum(0)
    return (float(l1) * sums[0] + float(l2) * sums[1]).to(acc)


@penalty_op.register_fake
def _(params, grads, overwrite, l1, l2):
    dtype = accumulate_dtype(params[0].dtype) if params else torch.float32
    return torch.empty((), dtype=dtype, device=params[0].device if params else None)


@torch.library.custom_op("fusedmtl::triton_multi_tensor_trim_", mutates_args=("grads",))
def trim_op(grads: list[Tensor], num_tasks: int, trim: int) -> None:
    """Same contract as ``torch.ops.fusedmtl.multi_tensor_trim_``, run by Triton: every gradient
    (contiguous) masked in place to the coordinates where its value ranks in [trim, K - trim)."""
    table = _task_table(grads, num_tasks)
    if trim < 0 or 2 * trim >= num_tasks:
        raise ValueError(
            f"fusedmtl triton trim_: needs 0 <= trim < num_tasks / 2, got trim={trim} for "
            f"{num_tasks} tasks"
        )
    _check_contiguous("trim_", table)
    first = _first(grads)
    if first is None:
        return
    work, items = _work_table(table, None, first.device)
    if items == 0:
        return
    kp2 = padded_tasks(num_tasks, True)
    with device_guard(first.device):
        _trim_kernel[(items,)](
            work,
            K=num_tasks,
            KP2=kp2,
            TRIM=trim,
            DTYPE=_TL_DTYPES[first.dtype],
            ACC=_TL_DTYPES[accumulate_dtype(first.dtype)],
            BLOCK=_in_place_block(trim_block(kp2), grads),
        )


def _check_contiguous(op: str, table) -> None:
    for i, row in enumerate(table):
        for p, g in enumerate(row):
            if not g.is_contiguous():
                raise ValueError(
                    f"fusedmtl triton {op}: task {i} parameter {p} must be contiguous (it is "
                    "masked in place)"
                )


def _in_place_block(block: int, grads: list[Tensor]) -> int:
    """``block``, or under the interpreter (whose cost is per element of the block, used or not)
    no more than the longest item."""
    if not INTERPRETED:
        return block
    longest = max(min(CHUNK, g.numel()) for g in grads)
    return min(block, triton.next_power_of_2(max(longest, 16)))


@trim_op.register_fake
def _(grads, num_tasks, trim):
    return None


@torch.library.custom_op("fusedmtl::triton_multi_tensor_sign_dropout_", mutates_args=("grads",))
def sign_dropout_op(
    grads: list[Tensor], num_tasks: int, uniforms: list[Tensor], leak: Tensor
) -> None:
    """Same contract as ``torch.ops.fusedmtl.multi_tensor_sign_dropout_``, run by Triton."""
    table = _task_table(grads, num_tasks)
    if len(uniforms) != len(table[0]) or leak.numel() != num_tasks:
        raise ValueError(
            f"fusedmtl triton sign_dropout_: {len(uniforms)} uniform tensors and {leak.numel()} "
            f"leaks for {len(table[0])} parameters and {num_tasks} tasks"
        )
    _check_contiguous("sign_dropout_", table)
    first = _first(grads)
    for p, u in enumerate(uniforms):
        if not u.is_contiguous() or u.dtype != first.dtype or u.numel() != table[0][p].numel():
            raise ValueError(
                f"fusedmtl triton sign_dropout_: uniforms {p} must be a contiguous {first.dtype} "
                f"tensor of {table[0][p].numel()} elements"
            )
    work, items = _work_table(table, uniforms, first.device)
    if items == 0:
        return
    acc = accumulate_dtype(first.dtype)
    with device_guard(first.device):
        _sign_dropout_kernel[(items,)](
            work,
            leak.to(torch.float64).to(device=first.device, dtype=acc).contiguous(),
            K=num_tasks,
            DTYPE=_TL_DTYPES[first.dtype],
            ACC=_TL_DTYPES[acc],
            BLOCK=_in_place_block(BLOCK, grads),
        )


@sign_dropout_op.register_fake
def _(grads, num_tasks, uniforms, leak):
    return None


def sign_dropout_(table, uniforms: list[Tensor], leak: Tensor) -> None:
    """GradDrop's masks on the (contiguous) gradients in place, in one launch."""
    sign_dropout_op([g for grads in table for g in grads], len(table), uniforms, leak)


def trim_block(kp2: int) -> int:
    """Elements per tile of the trim kernel: its tile, a rank tile and the comparisons of one row
    live together (K x BLOCK each), so half the combine's tile on a GPU."""
    return tile_block(kp2) if INTERPRETED else max(16, min(BLOCK, 4096 // kp2))


def trim_(table, trim: int) -> None:
    """Masks the (contiguous) gradients in place for a trimmed mean, in one launch."""
    trim_op([g for grads in table for g in grads], len(table), trim)


def gramian(table, dtype: torch.dtype, device: torch.device, diagonal_only: bool) -> Tensor:
    """K x K inner products (diagonal_only: the K squared norms) in one launch."""
    return gramian_op([g for grads in table for g in grads], len(table), diagonal_only)


def combine(table, coeffs: Tensor, out: list[Tensor], accumulate: bool) -> None:
    """out[p] (+)= sum_i coeffs[i] * table[i][p] in one launch; outputs must be contiguous."""
    combine_op([g for grads in table for g in grads], len(table), coeffs, out, accumulate)


def l1_l2_penalty(
    params: list[Tensor], grads: list[Tensor], overwrite: bool, l1: float, l2: float
) -> Tensor:
    """l1 * sum |w| + l2 * sum w^2 over params; writes or adds its gradient into grads."""
    return penalty_op(params, grads, overwrite, l1, l2)


def _compile_cases():
    """(kernel, signature, constexprs) for every kernel as a GPU launch specialises it: each dtype,
    each padded task count K <= 64 gives (shared memory depends on the padded size, not on K), both
    Gramian flavours."""
    names = {
        torch.float32: "fp32",
        torch.float64: "fp64",
        torch.float16: "fp16",
        torch.bfloat16: "bf16",
    }
    cases = []
    for dtype, tl_dtype in _TL_DTYPES.items():
        acc = accumulate_dtype(dtype)
        common = {"DTYPE": tl_dtype, "ACC": _TL_DTYPES[acc], "CHUNK": CHUNK}
        for k in (2, 16, 32, MAX_TASKS):
            for diagonal in (True, False):
                kp2 = padded_tasks(k, diagonal)
                cases.append(
                    (
                        _gramian_kernel,
                        {"table_ptr": "*i64", "partials_ptr": f"*{names[acc]}"},
                        {
                            "K": k,
                            "KP2": kp2,
                            "DIAGONAL": diagonal,
                            "WIDTH": partials_width(k, diagonal),
                            **common,
                            "BLOCK": gramian_block(kp2, acc, diagonal),
                        },
                    )
                )
            cases.append(
                (
                    _combine_kernel,
                    {"table_ptr": "*i64", "coeffs_ptr": f"*{names[acc]}"},
                    {
                        "K": k,
                        "KP2": padded_tasks(k, True),
                        "ACCUMULATE": True,
                        **common,
                        "BLOCK": tile_block(padded_tasks(k, True)),
                    },
                )
            )
            cases.append(
                (
                    _trim_kernel,
                    {"table_ptr": "*i64"},
                    {
                        "K": k,
                        "KP2": padded_tasks(k, True),
                        "TRIM": (k - 1) // 2,
                        "DTYPE": tl_dtype,
                        "ACC": _TL_DTYPES[acc],
                        "BLOCK": trim_block(padded_tasks(k, True)),
                    },
                )
            )
            cases.append(
                (
                    _sign_dropout_kernel,
                    {"table_ptr": "*i64", "leak_ptr": f"*{names[acc]}"},
                    {"K": k, "DTYPE": tl_dtype, "ACC": _TL_DTYPES[acc], "BLOCK": BLOCK},
                )
            )
        for overwrite in (False, True):
            cases.append(
                (
                    _penalty_kernel,
                    {
                        "table_ptr": "*i64",
                        "constants_ptr": f"*{names[acc]}",
                        "partials_ptr": "*fp64",
                    },
                    {"OVERWRITE": overwrite, **common, "BLOCK": BLOCK},
                )
            )
    return cases


COMPILE_CASES = _compile_cases()
