"""Every tunable of the package, in one place.

Defaults were chosen for the reasons given beside them; benchmarks and tests override them
explicitly (the Triton launchers take a ``block_v`` argument) rather than by editing code.
The C++ constants and the environment variables are listed in ``docs/tunables.md``.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

__all__ = [
    "TritonConfig",
    "TRITON",
    "TORCH_CHUNK_ELEMENTS",
    "FUSED_LINEAR_CHUNK_ELEMENTS",
    "FUSED_LINEAR_MIN_ROWS",
    "cpu_grad_in_forward",
    "cpu_grad_in_forward_enabled",
    "interpreting",
]


@dataclass(frozen=True)
class TritonConfig:
    # Vocabulary tile per loop iteration. 4096 fp32 lanes per program keeps each tile in registers
    # at 8 warps (16 values per thread per tensor) while amortizing the loop overhead.
    block_v: int = 4096
    num_warps: int = 8
    # Under the CPU interpreter every program runs as numpy ops; one config, no tuning.
    interpret_block_v: int = 1024


TRITON = TritonConfig()

# The torch backend processes rows in chunks of about this many (rows x vocab) elements, so its
# fp32 intermediates stay a small, fixed size whatever B*T is: 2^21 elements = 8 MiB per fp32
# temporary, about a dozen of which are live at once.
TORCH_CHUNK_ELEMENTS = 1 << 21

# The fused-linear loss takes tokens in chunks whose fp32 buffers (student and teacher logits, the
# logits gradient, upcast hidden rows) hold about this many elements together, per device type.
# CPU: 2^25 elements = 128 MiB, so the chunk buffers stay near 5% of one (4096 x 152k) fp32 logits
# tensor. CUDA: 2^28 = 1 GiB, which gives ~580-row chunks at a 152k vocabulary: each chunk's GEMM
# re-reads the whole weight, so rows per chunk is the matmul's arithmetic intensity.
FUSED_LINEAR_CHUNK_ELEMENTS = {"cpu": 1 << 25, "cuda": 1 << 28}
# Fewer rows than this make the chunk GEMMs bandwidth-bound on the weight, whatever the budget says.
FUSED_LINEAR_MIN_ROWS = 16

# The native CPU kernel forms the gradient through the divergence at unit scale in the forward,
# while each row is in cache, when a backward can follow; the backward only scales it. 2 exps per
# logit instead of 5 and 5 logits' worth of DRAM traffic instead of 7 (csrc/renio_cpu_grad.cpp),
# at the same peak memory (the gradient is allocated in the forward instead of the backward).
# ``cpu_grad_in_forward(False)`` gives the recompute-in-backward kernels, as on the other backends.
_CPU_GRAD_IN_FORWARD = [True]
# Deprecated: the old module-level switch. Assigning True/False still works, with a warning.
CPU_GRAD_IN_FORWARD: bool | None = None


@contextlib.contextmanager
def cpu_grad_in_forward(enabled: bool):
    """Within the block, whether the native CPU kernel forms the gradient in the forward
    (default True); False recomputes it in the backward (one rounding of fp16/bf16 gradients
    instead of two, at about twice the time)."""
    if not isinstance(enabled, bool):
        raise ValueError(f"cpu_grad_in_forward takes a bool, got {enabled!r}")
    previous = _CPU_GRAD_IN_FORWARD[0]
    _CPU_GRAD_IN_FORWARD[0] = enabled
    try:
        yield
    finally:
        _CPU_GRAD_IN_FORWARD[0] = previous


def cpu_grad_in_forward_enabled() -> bool:
    legacy = CPU_GRAD_IN_FORWARD
    if legacy is not None:  # assigned by a caller of the old module-level switch
        warnings.warn(
            "renio_kernels.config.CPU_GRAD_IN_FORWARD is deprecated; use "
            "`with renio_kernels.config.cpu_grad_in_forward(False):`",
            DeprecationWarning,
            stacklevel=3,
        )
        return bool(legacy)
    return _CPU_GRAD_IN_FORWARD[0]


def interpreting() -> bool:
    """True when Triton runs through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
