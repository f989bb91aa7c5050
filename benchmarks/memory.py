"""Peak extra memory of a callable: CUDA allocator stats on a GPU, a sampled RSS on the CPU."""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from collections.abc import Callable

import torch

from renio_kernels.cpu_cache import empty_cpu_grad_cache

__all__ = ["peak_extra_bytes", "current_rss_bytes", "pin_mmap_threshold"]


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    import resource  # noqa: PLC0415

    return resident_pages * resource.getpagesize()


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def pin_mmap_threshold(threshold: int = 128 * 1024) -> bool:
    """Fix glibc's mmap threshold so large tensors are always mmapped and unmapped on free.

    By default glibc raises the threshold after large frees, after which big tensors come from
    the heap and stay resident: RSS then depends on what ran before in the process (the same
    call measured 186 to 402 MiB). Pinning it makes RSS follow live tensors, but it stays pinned
    for the rest of the process and every later large allocation is page-faulted afresh (several
    times slower for allocation-heavy code): time things before measuring memory, or measure in
    a fresh process. Returns False where there is no glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))


def peak_extra_bytes(fn: Callable[[], object], device: str = "cpu", interval: float = 1e-3) -> int:
    """Bytes allocated above the starting level at the peak of ``fn()`` (its results dropped).

    CPU: resident set size sampled every ``interval`` seconds by a thread, with glibc's mmap
    threshold pinned (``pin_mmap_threshold``) so RSS tracks live tensors; a short spike between
    two samples can be missed, so the figure is a lower bound within about one sampling interval.
    The native CPU kernel's gradient cache is emptied first, so a gradient ``fn`` allocates is
    counted even when an earlier call left a buffer it would reuse.
    """
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - base
    empty_cpu_grad_cache()
    pin_mmap_threshold()
    base = current_rss_bytes()
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, current_rss_bytes())
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        out = fn()
        peak = max(peak, current_rss_bytes())
    finally:
        done.set()
        thread.join()
    del out
    gc.collect()
    return max(0, peak - base)
