"""Token chunks for the fused-linear loss: the chunk planner and the last-layer matmuls.

A chunk is a range ``[r0, r1)`` of the flattened ``B * T`` tokens. Per chunk the loss forms
``logits = hidden[r0:r1] @ weight.T (+ bias)`` in fp32 for each side, hands them to the row
kernels, and (backward) turns the fp32 logits gradient ``g`` into

    grad_hidden[r0:r1] = g @ weight        grad_weight += g.T @ hidden[r0:r1]     grad_bias += sum g

Precision: the logits are never rounded below fp32 before the softmax (Liger #1432) and the weight
gradient is accumulated across chunks in fp32 (Liger #1391). How the matmuls get there depends on
the operands (``Gemm``):

* fp32 operands (or mixed dtypes, e.g. bf16 hidden states from autocast with an fp32 weight):
  plain fp32 matmuls; low-precision operands are upcast, hidden rows per chunk and the weight once
  per sweep.
* bf16/fp16 hidden and weight on CUDA: ``torch.mm(..., out_dtype=torch.float32)`` multiplies the
  low-precision tensors on the tensor cores and writes an fp32 result (fp32 accumulation, no
  rounding of the logits). The logits gradient is rounded to the weight's dtype for the two
  gradient matmuls, as an unfused bf16 model's backward does.
* bf16/fp16 on CPU: CPU torch has no low-precision matmul with an fp32 result, so the weight is
  upcast once per sweep (a transient weight-sized fp32 copy; nothing that grows with ``B * T``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..config import FUSED_LINEAR_CHUNK_ELEMENTS, FUSED_LINEAR_MIN_ROWS

__all__ = ["Gemm", "LinearSide", "GradBuffers", "plan_chunk_rows", "chunk_bounds"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def plan_chunk_rows(
    n_rows: int,
    vocab: int,
    hidden_s: int,
    hidden_t: int,
    device: torch.device,
    chunk_size: int | None = None,
) -> int:
    """Rows per chunk: ``chunk_size`` if given, else from the device's element budget.

    Per chunk row the sweeps hold ``3 * vocab + hidden_s + hidden_t`` fp32 values (student and
    teacher logits, the logits gradient, upcast hidden rows). The automatic size is balanced over
    the chunks, so the last one is not a nearly empty, inefficient GEMM.
    """
    if chunk_size is not None:
        return max(1, min(chunk_size, n_rows))
    budget = FUSED_LINEAR_CHUNK_ELEMENTS.get(device.type, FUSED_LINEAR_CHUNK_ELEMENTS["cpu"])
    per_row = 3 * vocab + hidden_s + hidden_t
    cap = max(FUSED_LINEAR_MIN_ROWS, budget // per_row)
    n_chunks = math.ceil(n_rows / cap)
    return math.ceil(n_rows / n_chunks)


def chunk_bounds(n_rows: int, rows: int) -> Iterator[tuple[int, int]]:
    for r0 in range(0, n_rows, rows):
        yield r0, min(n_rows, r0 + rows)


@functools.cache
def _mm_out_dtype_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch multiplies ``dtype`` operands into an fp32 result on ``device``.

    Probed once with a 1x1 product: an unsupported overload raises at dispatch, before any work.
    """
    a = torch.ones((1, 1), dtype=dtype, device=device)
    try:
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):  # an unimplemented overload raises a RuntimeError subclass
        return False


@dataclass(frozen=True)
class Gemm:
    """How one side's matmuls reach an fp32 result (see the module docstring)."""

    native: bool  # low-precision operands, fp32 result from the GEMM itself
    dtype: torch.dtype  # operand dtype when native, else float32

    @staticmethod
    def for_operands(hidden: torch.Tensor, weight: torch.Tensor) -> Gemm:
        native = (
            hidden.dtype == weight.dtype
            and hidden.dtype in _LOW_PRECISION
            and hidden.device.type == "cuda"
            and _mm_out_dtype_works(hidden.device, hidden.dtype)
        )
        return Gemm(native, hidden.dtype if native else torch.float32)

    def operand(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.dtype == self.dtype else x.to(self.dtype)

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a @ b`` in fp32; ``a`` and ``b`` already in ``self.dtype``."""
        if self.native:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.mm(a, b)


@dataclass(frozen=True)
class LinearSide:
    """One model's last layer for one sweep: flat hidden rows, the weight as the GEMM reads it."""

    hidden: torch.Tensor  # (N, H), caller's dtype
    weight: torch.Tensor  # (V, H), in gemm.dtype (upcast once per sweep when not native)
    bias: torch.Tensor | None  # (V,) fp32
    gemm: Gemm

    @staticmethod
    def build(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> LinearSide:
        gemm = Gemm.for_operands(hidden, weight)
        return LinearSide(
            hidden,
            gemm.operand(weight),
            None if bias is None else bias.float(),
            gemm,
        )

    def logits(self, r0: int, r1: int) -> torch.Tensor:
        """``(r1 - r0, V)`` fp32 logits of a chunk; never rounded below fp32."""
        out = self.gemm.mm(self.gemm.operand(self.hidden[r0:r1]), self.weight.T)
        if self.bias is not None:
            out.add_(self.bias)
        return out


@dataclass
class GradBuffers:
    """The student's gradients being formed; None for an input that does not need one."""

    hidden: torch.Tensor | None  # (N, H), written per chunk
    weight: torch.Tensor | None  # (V, H) fp32 accumulator
    bias: torch.Tensor | None  # (V,) fp32 accumulator

    @staticmethod
    def allocate(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        want: tuple[bool, bool, bool],
        hidden_dtype: torch.dtype | None = None,
    ) -> GradBuffers:
        want_h, want_w, want_b = want
        vocab, width = weight.shape
        dev = hidden.device
        h_dtype = hidden_dtype or hidden.dtype
        return GradBuffers(
            torch.empty(hidden.shape, dtype=h_dtype, device=dev) if want_h else None,
            torch.zeros((vocab, width), dtype=torch.float32, device=dev) if want_w else None,
            torch.zeros((vocab,), dtype=torch.float32, device=dev) if want_b else None,
        )

    def accumulate(self, g: torch.Tensor, side: LinearSide, r0: int, r1: int) -> None:
        """Add the contribution of chunk ``[r0, r1)`` with fp32 logits gradient ``g (rows, V)``."""
        gemm = side.gemm
        g_op = gemm.operand(g)
        if self.hidden is not None:
            self.hidden[r0:r1] = gemm.mm(g_op, side.weight)
        if self.weight is not None:
            h_op = gemm.operand(side.hidden[r0:r1])
            if gemm.native:
                self.weight.add_(gemm.mm(g_op.T, h_op))
            else:
                self.weight.addmm_(g_op.T, h_op)
        if self.bias is not None:
            self.bias.add_(g.sum(0))
