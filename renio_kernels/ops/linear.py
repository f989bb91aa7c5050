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

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..config import FUSED_LINEAR_CHUNK_ELEMENTS, FUSED_LINEAR_MIN_ROWS
from .backends import resolve_backend
from .rows import DenseTeacher, DivergenceParams, RowBackend, RowStats

__all__ = [
    "Gemm",
    "GradBuffers",
    "LinearSide",
    "SweepPlan",
    "chunk_bounds",
    "flat_rows",
    "forward_sweep",
    "grad_sweep",
    "no_autocast",
    "plan_chunk_rows",
]

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
    weight: torch.Tensor | None = None  # (V, H) fp32 accumulator
    bias: torch.Tensor | None = None  # (V,) fp32 accumulator

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


@dataclass(frozen=True)
class SweepPlan:
    """What every sweep of one call needs besides the tensors."""

    params: DivergenceParams
    backend: RowBackend
    rows: int  # tokens per chunk
    want: tuple[bool, bool, bool]  # gradients wanted: student hidden, weight, bias

    @staticmethod
    def build(params, backend: str, h_s, w_s, h_t, labels, chunk_size, want) -> SweepPlan:
        """The plan of one call: the resolved row kernels and the tokens per chunk."""
        rows = plan_chunk_rows(
            labels.numel(), w_s.shape[0], h_s.shape[-1], h_t.shape[-1], h_s.device, chunk_size
        )
        kernels = resolve_backend(backend, h_s.device, params.divergence)
        return SweepPlan(params, kernels, rows, tuple(want))


def no_autocast(device: torch.device):
    # Under autocast the chunk matmuls would run in bf16 and round the logits (Liger #305/#1432).
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def flat_rows(hidden: torch.Tensor) -> torch.Tensor:
    """``(B * T, H)`` rows: a view when the layout allows, else one copy."""
    return hidden.reshape(-1, hidden.shape[-1])


def sides(h_s, w_s, b_s, h_t, w_t, b_t) -> tuple[LinearSide, LinearSide]:
    vocab = w_s.shape[0]
    # The teacher's columns >= Vs are ignored by the loss, so they are never computed.
    teacher = LinearSide.build(h_t, w_t[:vocab], None if b_t is None else b_t[:vocab])
    return LinearSide.build(h_s, w_s, b_s), teacher


def _chunk(x: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows ``[r0, r1)`` of a flat per-token tensor, shaped as the row kernels' ``(1, rows)``."""
    return x[r0:r1].view(1, r1 - r0, *x.shape[1:])


def _chunk_logits(student: LinearSide, teacher: LinearSide, r0: int, r1: int):
    return student.logits(r0, r1).unsqueeze(0), DenseTeacher(teacher.logits(r0, r1).unsqueeze(0))


def _stats_sweep(
    student: LinearSide,
    teacher: LinearSide,
    labels: torch.Tensor,
    plan: SweepPlan,
    grads: GradBuffers | None,
    scale: torch.Tensor | None,
) -> torch.Tensor:
    """Forward sweep: a ``(6, N)`` fp32 tensor of ``lse_s, lse_t, ls_x, lt_x, d, C`` per token.

    With ``grads`` it also accumulates the student's gradients from the logits already in hand,
    at ``dL/dd = scale`` per token, or at unit scale when ``scale`` is None.
    """
    n_rows = labels.shape[0]
    out = torch.zeros((6, n_rows), dtype=torch.float32, device=labels.device)
    fwd_grad = plan.backend.fwd_grad
    for r0, r1 in chunk_bounds(n_rows, plan.rows):
        logits_s, logits_t = _chunk_logits(student, teacher, r0, r1)
        lab = _chunk(labels, r0, r1)
        g = None
        if grads is not None and fwd_grad is not None:
            # The native CPU kernel forms the unit-scale gradient in the same sweeps as the stats.
            stats, g = fwd_grad(logits_s, logits_t, lab, plan.params)
            if scale is not None:
                plan.backend.scale_grad(g, _chunk(scale, r0, r1), lab, plan.params.ignore_index)
        else:
            stats = plan.backend.fwd(
                logits_s, logits_t, lab, plan.params, with_divergence=True, store_c=any(plan.want)
            )
        for i, x in enumerate(stats):
            if x is not None:
                out[i, r0:r1] = x.view(-1)
        if grads is not None and g is None:
            if scale is None:
                row_scale = torch.ones_like(lab, dtype=torch.float32)
            else:
                row_scale = _chunk(scale, r0, r1)
            g = plan.backend.bwd(logits_s, logits_t, lab, plan.params, stats, row_scale, None)
        # Freed before the next chunk's logits exist, so at most one chunk is alive.
        del logits_s, logits_t
        if g is not None:
            grads.accumulate(g.view(r1 - r0, -1), student, r0, r1)
            del g
    return out


def forward_sweep(flat_s, w_s, b_s, flat_t, w_t, b_t, flat_labels, plan: SweepPlan, scale=None):
    """The forward sweep over token chunks: stacked per-row stats ``(6, N)`` and the gradient
    buffers it formed (fp32; None when nothing is wanted).

    ``scale=None``: ``u @ Ws`` per token at unit scale when ``plan.want`` asks for grad_hidden
    (the backward scales the rows by ``dL/dd``). ``scale`` (N,): every wanted gradient at
    ``dL/dd = scale``, for a loss whose gradient scale is known in the forward up to one scalar.
    """
    want_h = plan.want[0]
    if scale is not None and any(plan.want):
        grads = GradBuffers.allocate(flat_s, w_s, plan.want, hidden_dtype=torch.float32)
    elif scale is None and want_h:
        grads = GradBuffers(torch.empty(flat_s.shape, dtype=torch.float32, device=flat_s.device))
    else:
        grads = None
    with no_autocast(flat_s.device):
        student, teacher = sides(flat_s, w_s, b_s, flat_t, w_t, b_t)
        out = _stats_sweep(student, teacher, flat_labels, plan, grads, scale)
    return out, grads


def grad_sweep(flat_s, w_s, b_s, flat_t, w_t, b_t, labels, plan: SweepPlan, saved, grad_d):
    """Backward sweep: recompute the logits per chunk and accumulate the student's weight and
    bias gradients (fp32) at ``dL/dd = grad_d`` (N,); ``saved`` is ``(lse_s, lse_t, C)``."""
    grads = GradBuffers.allocate(flat_s, w_s, (False, *plan.want[1:]))
    lse_s, lse_t, c = saved.unbind(0)
    with no_autocast(flat_s.device):
        student, teacher = sides(flat_s, w_s, b_s, flat_t, w_t, b_t)
        for r0, r1 in chunk_bounds(labels.shape[0], plan.rows):
            logits_s, logits_t = _chunk_logits(student, teacher, r0, r1)
            stats = RowStats(
                _chunk(lse_s, r0, r1), _chunk(lse_t, r0, r1), None, None, None, _chunk(c, r0, r1)
            )
            lab = _chunk(labels, r0, r1)
            g = plan.backend.bwd(
                logits_s, logits_t, lab, plan.params, stats, _chunk(grad_d, r0, r1), None
            )
            del logits_s, logits_t
            grads.accumulate(g.view(r1 - r0, -1), student, r0, r1)
            del g
    return grads
