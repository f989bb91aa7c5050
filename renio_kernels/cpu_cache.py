"""Control of the native CPU kernel's gradient-buffer cache.

A ``(B*T, V)`` logits gradient is hundreds of MB. glibc maps such a block fresh and unmaps it when
the tensor dies, so on CPU every training step pays a page fault (and the kernel's zeroing) per
4 KiB of it: about a third of a forward+backward at a 152k vocabulary on our reference VM. The
native kernels (``backend="cpu"``) therefore take gradients of 1 MiB or more from a small cache
that gets each buffer back when its tensor is freed, like the CUDA caching allocator does on GPUs.

Between calls the cache holds at most two buffers (the last gradients' memory, which the next step
needs again). ``empty_cpu_grad_cache()`` hands them back to the OS (e.g. before an evaluation
phase that needs the memory); ``set_cpu_grad_cache(False)``, or ``RENIO_CPU_GRAD_CACHE=0`` in the
environment before the first call, turns the cache off. A gradient still alive is never touched:
only freed buffers are cached.
"""

from __future__ import annotations

import os

from .ops.cpu import native as cpu

__all__ = ["cpu_grad_cache_info", "empty_cpu_grad_cache", "set_cpu_grad_cache"]


def cpu_grad_cache_info() -> dict[str, int | bool]:
    """``enabled``, ``cached_bytes``, ``cached_buffers``, and since the process started ``reuses``
    and ``allocations`` of gradient buffers. Before the extension is loaded (nothing cached yet;
    this does not build it): zeros, and ``enabled`` as the environment sets it."""
    if not cpu.loaded():
        return {
            "enabled": os.environ.get("RENIO_CPU_GRAD_CACHE", "1") != "0",
            "cached_bytes": 0,
            "cached_buffers": 0,
            "reuses": 0,
            "allocations": 0,
        }
    return cpu.grad_cache_info()


def empty_cpu_grad_cache() -> None:
    """Return the cached gradient buffers to the OS. Gradients still in use are unaffected."""
    cpu.empty_grad_cache()


def set_cpu_grad_cache(enabled: bool) -> bool:
    """Turn the cache on or off (off also empties it); returns the previous setting."""
    if not isinstance(enabled, bool):
        raise TypeError(f"set_cpu_grad_cache(enabled) takes a bool, got {type(enabled).__name__}")
    if cpu.load_extension() is None:
        return False
    return cpu.set_grad_cache(enabled)
