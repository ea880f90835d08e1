"""Timing and memory: interleaved samples, medians, copy bandwidth, peak extra memory.

The contenders of one row are interleaved -- each repetition runs every contender once, in an order
that rotates from one repetition to the next -- after untimed warm-up rounds, with the cyclic
garbage collector off; statistics are medians (with min and IQR), and every ratio is taken between
contenders of the same row, so of the same run.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

# torch's own default thread count, read before any sweep changes it: what "all threads" means.
ALL_THREADS = torch.get_num_threads()
BANDWIDTH_BUFFER_BYTES = 64 * 2**20


class Clock:
    """Wall time of a callable: perf_counter on the CPU, CUDA events after a synchronize on a GPU
    (so that a sample holds this call's GPU work and nothing before it)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def time_ms(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        start_ns = time.perf_counter_ns()
        fn()
        return (time.perf_counter_ns() - start_ns) / 1e6


@dataclass
class Stats:
    """The samples of one contender, in milliseconds per call."""

    median_ms: float
    min_ms: float
    iqr_ms: float
    samples_ms: list[float] = field(repr=False)

    @classmethod
    def of(cls, samples: list[float]) -> Stats:
        q1, _, q3 = (
            statistics.quantiles(samples, n=4, method="inclusive")
            if len(samples) > 1
            else (samples[0],) * 3
        )
        return cls(statistics.median(samples), min(samples), q3 - q1, samples)


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """No cyclic garbage collection while timing (it would land in a random contender's sample)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def time_contenders(
    samples: dict[str, Callable[[], object]],
    clock: Clock,
    repeats: int,
    warmup: int,
    before_each: Callable[[], None] | None = None,
    calls_per_sample: int = 1,
) -> dict[str, Stats]:
    """Times each callable ``repeats`` times, interleaved, after ``warmup`` untimed rounds.

    Repetition r runs the contenders in the order rotated by r, so that none is always first or
    always after the same one. ``before_each`` runs untimed before every call (e.g. dropping the
    previous gradient); a sample may batch ``calls_per_sample`` calls (the stats are per call).
    """
    names = list(samples)
    times: dict[str, list[float]] = {name: [] for name in names}
    with quiet_gc():
        for r in range(warmup + repeats):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                if before_each is not None:
                    before_each()
                elapsed = clock.time_ms(samples[name])
                if r >= warmup:
                    times[name].append(elapsed / calls_per_sample)
    return {name: Stats.of(ts) for name, ts in times.items()}


@contextlib.contextmanager
def num_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set for the block, restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class CopyBandwidth:
    """Copy bandwidth (bytes read + written per second) with the current thread setting, from two
    preallocated, already touched float32 buffers; ``bound_ms(n)`` is the least time to move n
    bytes at it."""

    def __init__(self, device: torch.device, nbytes: int = BANDWIDTH_BUFFER_BYTES):
        self.src = torch.ones(nbytes // 4, device=device)
        self.dst = torch.zeros_like(self.src)
        self.dst.copy_(self.src)  # every page of both buffers mapped before the first sample
        self.clock = Clock(device)

    def measure_gbs(self, repeats: int) -> float:
        stats = time_contenders({"copy": lambda: self.dst.copy_(self.src)}, self.clock, repeats, 1)
        return 2 * self.src.numel() * 4 / (stats["copy"].median_ms * 1e-3) / 1e9


def bound_ms(nbytes: int, gbytes_per_s: float) -> float:
    return nbytes / (gbytes_per_s * 1e9) * 1e3


@contextlib.contextmanager
def stderr_to_devnull() -> Iterator[None]:
    """Silences file descriptor 2: kineto writes a "USDT: ... profiler_start" line per profile
    straight to it, with no setting to turn it off."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated by one call of ``fn`` above what was allocated before it.

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated
    before. CPU: the running sum, in time order, of the allocation and free events of PyTorch's
    CPU allocator that torch.profiler records (profile_memory=True), at its maximum; the
    allocator rounds small blocks up (a K-vector shows as 16-64 bytes). None when the profiler
    records no memory events. What is still allocated when ``fn`` returns counts too (state a
    method keeps, a result the caller receives)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with stderr_to_devnull(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        fn()
    try:
        events = sorted(
            (e.start_ns(), e.nbytes())
            for e in p.profiler.kineto_results.events()
            if e.name() == "[memory]"
        )
    except AttributeError:  # another profiler layout
        return None
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak
