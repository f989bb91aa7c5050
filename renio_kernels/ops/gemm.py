"""The fused-linear loss's last-layer matmuls: how each side's logits, ``u @ W`` and the weight
gradient reach an fp32 result.

Precision: the logits are never rounded below fp32 before the softmax (Liger #1432) and the weight
gradient is accumulated across chunks in fp32 (Liger #1391). How the matmuls get there depends on
the operands (``Gemm``):

* fp32 operands (or mixed dtypes, e.g. bf16 hidden states from autocast with an fp32 weight):
  plain fp32 matmuls; low-precision operands are upcast, hidden rows per chunk and the weight once
  per sweep. On CPU the logits and ``u @ W`` go through oneDNN's fp32 linear, which is much faster
  than MKL's sgemm on the measured AMD machine (``config.FUSED_LINEAR_CPU_ONEDNN``); the weight
  gradient through MKL's ``addmm_``, which accumulates in place.
* bf16/fp16 hidden and weight on CUDA: ``torch.mm(..., out_dtype=torch.float32)`` multiplies the
  low-precision tensors on the tensor cores and writes an fp32 result (fp32 accumulation, no
  rounding of the logits). ``u`` and the weighted hidden rows are rounded to the weight's dtype for
  the two gradient matmuls, as an unfused bf16 model's backward does.
* bf16/fp16 on CPU: CPU torch has no low-precision matmul with an fp32 result, so the weight is
  upcast once per sweep (a transient weight-sized fp32 copy; nothing that grows with ``B * T``).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from .. import config

__all__ = ["Gemm", "GradBuffers", "LinearSide", "flat_rows", "no_autocast"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


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


@functools.cache
def _onednn_linear_works() -> bool:
    """Whether this torch has oneDNN's fp32 linear (``mkldnn::_linear_pointwise``, the op
    inductor's CPU linear lowers to) and it agrees with ``torch.mm`` on both operand layouts the
    sweep uses; probed once on tiny tensors."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        op = torch.ops.mkldnn._linear_pointwise
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(s, generator=g) for s in ((5, 7), (9, 7), (9,)))
        ok = torch.allclose(op(x, w, b, "none", [], ""), torch.addmm(b, x, w.T), atol=1e-5)
        y = torch.randn((5, 9), generator=g)
        return ok and torch.allclose(op(y, w.T, None, "none", [], ""), y @ w, atol=1e-5)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@dataclass(frozen=True)
class Gemm:
    """How one side's matmuls reach an fp32 result (see the module docstring). Every
    (rows x vocab x hidden) matmul of the sweeps goes through ``mm`` or ``addmm_``."""

    native: bool  # low-precision operands, fp32 result from the GEMM itself
    dtype: torch.dtype  # operand dtype when native, else float32
    onednn: bool = False  # fp32 CPU products through oneDNN (``config.FUSED_LINEAR_CPU_ONEDNN``)

    @staticmethod
    def for_operands(hidden: torch.Tensor, weight: torch.Tensor) -> Gemm:
        native = (
            hidden.dtype == weight.dtype
            and hidden.dtype in _LOW_PRECISION
            and hidden.device.type == "cuda"
            and _mm_out_dtype_works(hidden.device, hidden.dtype)
        )
        onednn = (
            not native
            and hidden.device.type == "cpu"
            and config.FUSED_LINEAR_CPU_ONEDNN
            and weight.is_contiguous()
            and _onednn_linear_works()
        )
        return Gemm(native, hidden.dtype if native else torch.float32, onednn)

    def operand(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.dtype == self.dtype else x.to(self.dtype)

    def mm(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None,
           bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """``a @ b (+ bias)`` in fp32 (into ``out`` if given); ``a`` and ``b`` already in
        ``self.dtype``. oneDNN makes a new result (copied into ``out``: only the small rows of
        ``u @ W`` are asked for that way; the logits take no buffer on this path)."""
        if self.onednn and a.is_contiguous():
            # oneDNN's linear takes the weight as (out, in): b.T, a view of the contiguous weight.
            prod = torch.ops.mkldnn._linear_pointwise(a, b.T, bias, "none", [], "")
            return prod if out is None else out.copy_(prod)
        if self.native:
            prod = torch.mm(a, b, out_dtype=torch.float32)
            if bias is not None:
                prod.add_(bias)
            return prod if out is None else out.copy_(prod)
        if bias is not None:
            return torch.addmm(bias, a, b) if out is None else torch.addmm(bias, a, b, out=out)
        return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)

    def addmm_(self, c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: float = 1.0,
               alpha: float = 1.0) -> None:  # fmt: skip
        """``c = beta * c + alpha * (a @ b)`` for an fp32 ``c``; ``beta=0`` ignores ``c``. (On
        CPU through MKL's sgemm, which accumulates in place: oneDNN's linear has no in-place
        accumulation, and a separate add would cost a pass over ``c`` per chunk.)"""
        if not self.native:
            c.addmm_(a, b, beta=beta, alpha=alpha)
            return
        prod = torch.mm(a, b, out_dtype=torch.float32)
        if beta == 0:
            torch.mul(prod, alpha, out=c)
        else:
            if beta != 1:
                c.mul_(beta)
            c.add_(prod, alpha=alpha)


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

    def buffer(self, rows: int) -> torch.Tensor | None:
        """A ``(rows, V)`` fp32 buffer the chunks' logits are written into, so that a sweep
        allocates its logits once rather than per chunk; None when the GEMM makes its own result
        (``out_dtype``, oneDNN)."""
        if self.gemm.native or self.gemm.onednn:
            return None
        return torch.empty((rows, self.weight.shape[0]), dtype=torch.float32,
                           device=self.hidden.device)  # fmt: skip

    def logits(self, r0: int, r1: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """``(r1 - r0, V)`` fp32 logits of a chunk; never rounded below fp32."""
        out = None if buffer is None else buffer[: r1 - r0]
        rows = self.gemm.operand(self.hidden[r0:r1])
        return self.gemm.mm(rows, self.weight.T, out=out, bias=self.bias)


@dataclass
class GradBuffers:
    """The student's gradients being formed; None for an input that does not need one."""

    hidden: torch.Tensor | None  # (N, H), written per chunk
    weight: torch.Tensor | None = None  # (V, H) fp32 accumulator
    bias: torch.Tensor | None = None  # (V,) fp32 accumulator

    def accumulate(self, g: torch.Tensor, side: LinearSide, r0: int, r1: int) -> None:
        """Add the contribution of chunk ``[r0, r1)`` with fp32 logits gradient ``g (rows, V)``."""
        gemm = side.gemm
        g_op = gemm.operand(g)
        if self.hidden is not None:
            gemm.mm(g_op, side.weight, out=self.hidden[r0:r1])
        if self.weight is not None:
            gemm.addmm_(self.weight, g_op.T, gemm.operand(side.hidden[r0:r1]))
        if self.bias is not None:
            self.bias.add_(g.sum(0))


def no_autocast(device: torch.device):
    # Under autocast the chunk matmuls would run in bf16 and round the logits (Liger #305/#1432).
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def flat_rows(hidden: torch.Tensor) -> torch.Tensor:
    """``(B * T, H)`` rows: a view when the layout allows, else one copy."""
    return hidden.reshape(-1, hidden.shape[-1])
