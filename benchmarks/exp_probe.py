"""The native CPU kernel's vector exp rate, for the benchmarks' floors (not used by the loss).

``exp_throughput(iters)`` times ``vexp`` (``csrc/renio_cpu_math.h``) over an L1-resident buffer on
all torch threads and returns exps per second. It lives in its own small extension
(``benchmarks/exp_probe.cpp``), JIT-built on first use with the flags of the kernel's own build
(``renio_kernels.ops.cpu.native.build_flags()``) and cached like it under torch's extension
directory, so the production extension carries no benchmark code.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

from renio_kernels.ops.cpu import native

__all__ = ["build_flags", "exp_throughput"]

SOURCE = Path(__file__).resolve().with_name("exp_probe.cpp")
_LIBRARY = "renio_bench_probe"


def build_flags() -> list[str]:
    """The kernel's flags, with at::vec's inline namespace renamed so that the probe's copies of
    its inline functions never stand in for the kernel's (or the other way round)."""
    prefix = "-DCPU_CAPABILITY=renio_"
    return [f.replace(prefix, prefix + "probe_") for f in native.build_flags()]


@functools.cache
def _ops():
    from torch.utils import cpp_extension

    flags = build_flags()
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update((native.CSRC / "renio_cpu_math.h").read_bytes())
    digest.update(" ".join(flags).encode())
    digest.update(torch.__version__.encode())
    name = f"renio_exp_probe_{digest.hexdigest()[:16]}"
    build_dir = getattr(cpp_extension, "_get_build_directory", None)  # private: may go away
    if build_dir is not None:
        native.wait_for_build_lock(Path(build_dir(name, False)))
    cpp_extension.load(
        name=name,
        sources=[str(SOURCE)],
        extra_include_paths=[str(native.CSRC)],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
    )
    return getattr(torch.ops, _LIBRARY)


def exp_throughput(iters: int) -> float:
    """Exps per second of the kernel's ``vexp``: ``iters`` passes over 1024 floats per thread.

    Builds the probe on the first call (a few seconds; raises if it cannot be built).
    """
    return float(_ops().exp_throughput(int(iters)))
