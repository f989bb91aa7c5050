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
    "FUSED_LINEAR_CPU_ONEDNN",
    "FUSED_LINEAR_MAX_CHUNK_ELEMENTS",
    "FUSED_LINEAR_MAX_ROWS",
    "FUSED_LINEAR_MIN_ROWS",
    "FUSED_LINEAR_TOTAL_PER_VOCAB",
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
    # The streaming top-k's tile (at least the next power of two of k): a tile is sorted
    # (bitonic) only when it holds a key above the running k-th, so most tiles cost a max. Not
    # measured on a GPU yet.
    top_k_block: int = 1024
    # The interpreter runs the bitonic sort as numpy ops, O(tile log^2 tile) per merge.
    interpret_top_k_block: int = 128


TRITON = TritonConfig()

# The torch backend processes rows in chunks of about this many (rows x vocab) elements, so its
# fp32 intermediates stay a small, fixed size whatever B*T is: 2^21 elements = 8 MiB per fp32
# temporary, about a dozen of which are live at once.
TORCH_CHUNK_ELEMENTS = 1 << 21

# The fused-linear loss takes tokens in chunks (``ops.linear.chunk_cap``). Rows per chunk is the
# chunk matmuls' arithmetic intensity (each chunk re-reads the whole weight), so the chunks are as
# large as memory allows and as pays off: ``benchmarks/results/fused_linear_gemm.md`` measures
# GFLOP/s against rows per chunk on the 2-core CPU (H = 256, fp32, the loss's own GEMM calls).
#
# FUSED_LINEAR_CHUNK_ELEMENTS: the chunk's fp32 buffers (student and teacher logits, the logits
# gradient, hidden rows) get at least this many elements. CPU 2^25 = 128 MiB; CUDA 2^28 = 1 GiB,
# ~580-row chunks at a 152k vocabulary (not measured: no GPU here).
FUSED_LINEAR_CHUNK_ELEMENTS = {"cpu": 1 << 25, "cuda": 1 << 28}
# FUSED_LINEAR_TOTAL_PER_VOCAB: on CPU the chunk buffers instead get what this many elements per
# vocabulary entry leave after the two weight-sized fp32 accumulators (the weight gradient and the
# one for a sequence spanning chunks): 960, so that the loss's extra memory stays under a quarter
# of one 4096-token fp32 logits tensor (1024 V elements) at any vocabulary, with room for the
# (tokens x H)-sized rest: 149 rows at H = 256 (128 on sequence boundaries of T = 256), where the
# four chunk matmuls run at 242 (V = 151936) and 286 (V = 32000) GFLOP/s against 259 and 313 with
# 256 rows. A hidden size that leaves fewer than 64 rows (about H > 380, where the accumulators
# alone are near the quarter) gets the chunk budget above instead.
FUSED_LINEAR_TOTAL_PER_VOCAB = {"cpu": 960}
# ... and never more than this many elements (512 MiB), whatever the vocabulary.
FUSED_LINEAR_MAX_CHUNK_ELEMENTS = {"cpu": 1 << 27}
# Fewer rows than this make the chunk GEMMs bandwidth-bound on the weight, whatever the budget says.
FUSED_LINEAR_MIN_ROWS = 16
# At most this many rows per chunk. CPU: 256. Beyond it the chunk matmuls gain at most 3% (259 ->
# 267 GFLOP/s at V = 151936 with 1024 rows), and at V = 32000 they lose: a chunk's logits then
# exceed glibc's 32 MiB mmap threshold and are page-faulted afresh per chunk (313 GFLOP/s at 256
# rows, 257-270 from 384 to 1024).
FUSED_LINEAR_MAX_ROWS = {"cpu": 256, "cuda": 1 << 20}
# On CPU the fp32 logits and ``u @ W`` matmuls go through oneDNN's linear (the op inductor's CPU
# linear lowers to) rather than torch.mm (MKL's sgemm): 1.4-2.6x faster on the 2-core AMD EPYC
# (400 against 156 GFLOP/s for the logits, 358 against 189 for u @ W, 256 rows at V = 32000), with
# fp32 accuracy (probed against torch.mm on first use; torch.mm where oneDNN is missing or the
# weight is not contiguous). The weight gradient stays on MKL, which accumulates in place (205
# GFLOP/s). False: torch.mm for all of them.
FUSED_LINEAR_CPU_ONEDNN = True

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
