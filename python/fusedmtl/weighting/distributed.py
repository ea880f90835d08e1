"""What the weightings need from torch.distributed: averages across data-parallel ranks.

Data parallelism splits the batch over ranks, so a task's gradient on the whole batch is the mean
of the ranks' gradients. Weightings average the per-task gradients (and the few scalars their
state depends on) before they compute coefficients, so every rank computes the same coefficients
and writes the same .grad, wrapped in DistributedDataParallel or not.

Gradients travel in buckets of about ``BUCKET_BYTES`` (flattened, all-reduced, copied back), one
collective per bucket instead of one per tensor, with bounded extra memory, the way DDP does it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

BUCKET_BYTES = 25 * 2**20
_AVAILABLE = dist.is_available()  # (a build property: asked once, not every step)


def world_size(group=None) -> int:
    """The number of ranks to average over: 1 without an initialised process group."""
    if not (_AVAILABLE and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def mean_(tensors: Sequence[Tensor], group=None, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Replaces every tensor by its mean across ranks, in place, in coalesced buckets."""
    size = world_size(group)
    if size == 1:
        return
    for bucket in _buckets(tensors, bucket_bytes):
        flat = _flatten_dense_tensors(bucket) if len(bucket) > 1 else bucket[0].contiguous()
        dist.all_reduce(flat, group=group)
        flat.div_(size)
        if len(bucket) == 1:
            if flat is not bucket[0]:
                bucket[0].copy_(flat)
            continue
        for t, averaged in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            t.copy_(averaged)


def sum_(tensor: Tensor, group=None) -> Tensor:
    """The sum across ranks of a small tensor (a Gramian, a loss vector); itself without a group."""
    if world_size(group) > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
    return tensor


def shared_seed(seed: int | None, group=None) -> int:
    """A seed that is the same on every rank: ``seed`` if given, else rank 0's random draw."""
    if seed is not None:
        return int(seed)
    drawn = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    if world_size(group) > 1:
        backend_device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
        drawn = drawn.to(backend_device)
        dist.broadcast(
            drawn, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group
        )
    return int(drawn.item())


def _buckets(tensors: Sequence[Tensor], bucket_bytes: int):
    """Consecutive runs of same-dtype, same-device tensors of at most ``bucket_bytes`` (a larger
    tensor forms a bucket of its own)."""
    bucket: list[Tensor] = []
    filled = 0
    for t in tensors:
        size = t.numel() * t.element_size()
        if bucket and (
            filled + size > bucket_bytes
            or t.dtype != bucket[0].dtype
            or t.device != bucket[0].device
        ):
            yield bucket
            bucket, filled = [], 0
        bucket.append(t)
        filled += size
    if bucket:
        yield bucket
