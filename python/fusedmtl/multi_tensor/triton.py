"""Triton kernels of the multi-tensor ops: one launch for the Gramian (or norms) phase and one for
the combine phase, whatever the number of parameters.

The parameters are cut into work items of at most CHUNK elements; a table on the device holds, per
item, its length and the addresses of the item's first element in each task's gradient (0 where the
task does not reach the parameter), plus the output's address for combine. A program walks its item
in K x BLOCK tiles, so every element is read once for all K(K+1)/2 products (a tl.dot of the tile
with itself, in IEEE fp32). Per-item partial Gramians are added with torch.sum (no atomics: the
same result every run). Values are upcast to the
accumulation dtype right after loading (the interpreter mis-computes bf16 arithmetic).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusedmtl.multi_tensor.reference import accumulate_dtype

# The interpreter costs about 1 ms per program whatever its size: give it large items in one tile.
# On a GPU a program walks its item in tiles small enough to stay in registers.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CHUNK = 65536 if INTERPRETED else 16384
BLOCK = 65536 if INTERPRETED else 512

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


@triton.jit
def _load_tile(row, start, n, FIRST: tl.constexpr, K: tl.constexpr, KP2: tl.constexpr,
               DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Elements [start, start + BLOCK) of the item's K gradients as a KP2 x BLOCK tile (zeros past
    its length n and for absent tasks)."""
    tasks = tl.arange(0, KP2)
    base = tl.load(row + FIRST + tasks, mask=tasks < K, other=0)
    offsets = start + tl.arange(0, BLOCK)
    pointers = base.to(tl.pointer_type(DTYPE))[:, None] + offsets[None, :]
    mask = (base != 0)[:, None] & (offsets < n)[None, :]
    return tl.load(pointers, mask=mask, other=0.0).to(ACC)


@triton.jit
def _gramian_kernel(table_ptr, partials_ptr, K: tl.constexpr, KP2: tl.constexpr,
                    DIAGONAL: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr,
                    CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    item = tl.program_id(0).to(tl.int64)
    row = table_ptr + item * (K + 1)
    n = tl.load(row)
    rows = tl.arange(0, KP2)
    if DIAGONAL:
        squares = tl.zeros((KP2,), dtype=ACC)
        for start in range(0, CHUNK, BLOCK):
            x = _load_tile(row, start, n, 1, K, KP2, DTYPE, ACC, BLOCK)
            squares += tl.sum(x * x, axis=1)
        tl.store(partials_ptr + item * KP2 + rows, squares)
    else:
        products = tl.zeros((KP2, KP2), dtype=ACC)
        for start in range(0, CHUNK, BLOCK):
            x = _load_tile(row, start, n, 1, K, KP2, DTYPE, ACC, BLOCK)
            products += tl.dot(x, tl.trans(x), input_precision="ieee")
        tl.store(partials_ptr + item * KP2 * KP2 + rows[:, None] * KP2 + rows[None, :], products)


@triton.jit
def _combine_kernel(table_ptr, coeffs_ptr, K: tl.constexpr, KP2: tl.constexpr,
                    ACCUMULATE: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr,
                    CHUNK: tl.constexpr, BLOCK: tl.constexpr):
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
    cpu = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":  # pinned, so the copy does not wait for the host
        return cpu.pin_memory().to(device, non_blocking=True), len(rows)
    return cpu, len(rows)


def _contiguous(table):
    return [[g.contiguous() if g is not None else None for g in grads] for grads in table]


def gramian(table, dtype: torch.dtype, device: torch.device, diagonal_only: bool) -> Tensor:
    """K x K inner products (diagonal_only: the K squared norms) in one launch."""
    table = _contiguous(table)
    k = len(table)
    kp2 = max(16, triton.next_power_of_2(k))  # tl.dot needs at least 16 rows
    acc = accumulate_dtype(dtype)
    work, items = _work_table(table, None, device)
    if items == 0:
        return torch.zeros((k,) if diagonal_only else (k, k), dtype=acc, device=device)
    partials = torch.empty((items, kp2) if diagonal_only else (items, kp2, kp2), dtype=acc, device=device)
    _gramian_kernel[(items,)](
        work, partials, K=k, KP2=kp2, DIAGONAL=diagonal_only, DTYPE=_TL_DTYPES[dtype],
        ACC=_TL_DTYPES[acc], CHUNK=CHUNK, BLOCK=BLOCK,
    )
    total = partials.sum(0)
    return total[:k] if diagonal_only else total[:k, :k]


def combine(table, coeffs: Tensor, out: list[Tensor], accumulate: bool) -> None:
    """out[p] (+)= sum_i coeffs[i] * table[i][p] in one launch; outputs must be contiguous."""
    table = _contiguous(table)
    k = len(table)
    for p, target in enumerate(out):
        if not accumulate and all(g[p] is None for g in table):
            target.zero_()
    if not out:
        return
    dtype = out[0].dtype
    work, items = _work_table(table, out, out[0].device)
    if items == 0:
        return
    _combine_kernel[(items,)](
        work, coeffs.to(accumulate_dtype(dtype)).contiguous(), K=k,
        KP2=max(2, triton.next_power_of_2(k)), ACCUMULATE=accumulate, DTYPE=_TL_DTYPES[dtype],
        ACC=_TL_DTYPES[accumulate_dtype(dtype)], CHUNK=CHUNK, BLOCK=BLOCK,
    )
