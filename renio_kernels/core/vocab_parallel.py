"""Vocabulary-parallel rows: ``(d, ls[x], lt[x])`` of logits sharded over the vocabulary.

Each rank of a tensor-parallel group holds the same ``(B, T)`` rows and the global vocabulary
columns ``[offset, offset + width)`` of both sides (``VocabShard``). Per row, in fp32:

* phase 1, local: ``m = max_v x_v / tau``, ``z = sum_v exp(x_v / tau - m)`` and ``x[label] / tau``
  where this rank owns the label (0 elsewhere), for each side. One all-gather of these
  ``(6, B, T)`` values; every rank then forms the same ``M = max_r m_r``, ``log Z = log sum_r
  z_r exp(m_r - M)`` and sampled logit (a sum with one non-zero term: exact), so ``ls = (x / tau -
  M) - log Z`` everywhere, in the digit-preserving form of the single-device kernels. One
  gather instead of an all-reduce MAX then SUM: one collective's latency, ``R`` times a tiny size.
* phase 2, local: ``sum_v e_v`` and ``C = sum_v c_v`` over the rank's columns (the token clip
  acts per element, so the clipped local sums are exact parts of the global ones); one
  all-gather, summed in rank order on every rank, gives ``d`` and ``C``: the same bits
  everywhere, whatever algorithm the backend's all-reduce would use, so the loss, the ReNIO
  weights and ``ema_state`` agree exactly across ranks.
* backward, no communication: ``g_j = dL/dd * (c_j - p_s,j C) / tau`` on the local columns with
  the global ``C`` and log-normalizers the forward saved; each rank gets its own slice.

The logits path runs phase 1 over all rows, then phase 2 (two collectives per call, the logits
read twice); the fused-linear path forms each chunk's local logits once and runs both phases on
it (two collectives per chunk). No host reads. Columns at or past ``width`` (a padded vocabulary)
are never read, and get a zero gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..ops.gemm import GradBuffers, LinearSide, flat_rows, no_autocast
from ..ops.rows import DivergenceParams
from ..ops.torch.chunked import elementwise_terms, row_chunks
from .autograd import no_double_backward

__all__ = ["VocabParallelLinearFunction", "VocabParallelRowsFunction", "VocabShard"]

# all_gather_into_tensor was renamed (and deprecated) in recent torch.
_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class VocabShard:
    """This rank's part of the vocabulary: its local column ``j < width`` is the global token
    ``offset + j``; local columns ``>= width`` are padding. ``group``: None is the default
    process group."""

    group: object
    offset: int
    width: int
    vocab_size: int


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """``(R, *x.shape)``. The concatenated output form: gloo does not take the stacked one."""
    world = dist.get_world_size(group)
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    _gather_into(out, x.contiguous(), group=group)
    return out.view(world, *x.shape)


def _phase1_side(x: torch.Tensor, lab: torch.Tensor, shard: VocabShard, inv_tau: float):
    """``(m, z, x[label] / tau or 0)`` of one side's local columns, each of ``lab``'s shape."""
    if shard.width == 0:
        zero = torch.zeros(lab.shape, dtype=torch.float32, device=x.device)
        return torch.full_like(zero, -math.inf), zero, zero
    x = x[..., : shard.width].float() * inv_tau
    local = lab - shard.offset
    own = (local >= 0) & (local < shard.width)
    sampled = x.gather(-1, torch.where(own, local, 0).unsqueeze(-1)).squeeze(-1)
    sampled = torch.where(own, sampled, 0.0)
    m = x.amax(-1)
    # A local slice that is -inf throughout contributes z = 0 (not NaN) to a finite row.
    shift = torch.where(m == -math.inf, 0.0, m)
    z = x.sub_(shift.unsqueeze(-1)).exp_().sum(-1)
    return m, z, sampled


def _phase1(xs, xt, lab, shard: VocabShard, inv_tau: float) -> torch.Tensor:
    """``(6, *rows)``: ``m, z, sampled`` of the student, then of the teacher."""
    return torch.stack(
        (*_phase1_side(xs, lab, shard, inv_tau), *_phase1_side(xt, lab, shard, inv_tau))
    )


def _combine(gathered: torch.Tensor) -> torch.Tensor:
    """Every rank's phase-1 values ``(R, 6, *rows)`` -> ``(6, *rows)``: ``M, log Z, ls[x]`` of
    the student, then ``M, log Z, lt[x]`` of the teacher. A row that is -inf on every rank
    gets NaN (no distribution), as on one device."""
    out = []
    for side in (0, 3):
        m, z, sampled = gathered[:, side], gathered[:, side + 1], gathered[:, side + 2]
        big = m.amax(0)
        log_z = torch.log((z * torch.exp(m - big)).sum(0))
        out += [big, log_z, (sampled.sum(0) - big) - log_z]
    return torch.stack(out)


def _log_probs(x, big, log_z, width: int, inv_tau: float) -> torch.Tensor:
    """``(x / tau - M) - log Z`` on the local columns, fp32."""
    x = x[..., :width].float() * inv_tau
    return x.sub_(big.unsqueeze(-1)).sub_(log_z.unsqueeze(-1))


def _phase2(xs, xt, norm, params: DivergenceParams, shard: VocabShard, want_c: bool):
    """``(2, *rows)``: the local sums of ``e_v`` and of ``c_v`` (0 when not wanted).

    ``norm``: ``M, log Z`` of the student and the teacher, ``(4, *rows)``."""
    inv_tau = params.inv_tau
    ls = _log_probs(xs, norm[0], norm[1], shard.width, inv_tau)
    lt = _log_probs(xt, norm[2], norm[3], shard.width, inv_tau)
    e, de, _ = elementwise_terms(ls, lt, params, want_grad=want_c)
    c = de.sum(-1) if want_c else torch.zeros_like(e[..., 0])
    return torch.stack((e.sum(-1), c))


def _grad_rows(xs, xt, lab, saved, grad_d, params: DivergenceParams, shard: VocabShard):
    """The logits gradient ``(*rows, width)`` fp32 of a block; ``saved``: ``(5, *rows)``,
    ``M, log Z`` of each side and ``C``. Zero on ignored rows."""
    inv_tau = params.inv_tau
    ls = _log_probs(xs, saved[0], saved[1], shard.width, inv_tau)
    lt = _log_probs(xt, saved[2], saved[3], shard.width, inv_tau)
    _, de, ps = elementwise_terms(ls, lt, params, want_grad=True)
    del ls, lt
    valid = (lab != params.ignore_index).unsqueeze(-1)
    scale = (grad_d.float() * inv_tau).unsqueeze(-1)
    g = de.sub_(ps.mul_(saved[4].unsqueeze(-1))).mul_(scale)
    # where, not a product: an ignored row may hold NaN (e.g. -inf logits) that must not leak.
    return torch.where(valid, g, 0.0)


def _finish(glob, sums, labels, params: DivergenceParams, shard: VocabShard):
    """``d, ls[x], lt[x]`` (0 on ignored rows, NaN for a label outside the vocabulary) and what
    the backward keeps: ``(5, *rows)``, ``M, log Z`` of each side and ``C``."""
    valid = labels != params.ignore_index
    in_range = (labels >= 0) & (labels < shard.vocab_size)

    def out(x):
        return torch.where(valid, torch.where(in_range, x, math.nan), 0.0)

    saved = torch.stack((glob[0], glob[1], glob[3], glob[4], torch.where(valid, sums[1], 0.0)))
    return (out(sums[0]), out(glob[2]), out(glob[5])), saved


class VocabParallelRowsFunction(torch.autograd.Function):
    """Local logits ``(B, T, W)`` of both sides in; ``d, ls[x], lt[x]`` ``(B, T)`` out, equal on
    every rank. Only ``d`` is differentiable: the reduction uses ``ls[x]`` detached."""

    @staticmethod
    def forward(ctx, student, teacher, labels, params, shard, need_grad):
        batch, seq, width = student.shape
        blocks = list(row_chunks(batch, seq, width))
        inv_tau = params.inv_tau
        local = torch.empty((6, batch, seq), dtype=torch.float32, device=student.device)
        for bs, ts in blocks:
            local[:, bs, ts] = _phase1(student[bs, ts], teacher[bs, ts], labels[bs, ts], shard,
                                       inv_tau)  # fmt: skip
        glob = _combine(_all_gather(local, shard.group))
        del local
        norm = glob[[0, 1, 3, 4]]
        sums = torch.empty((2, batch, seq), dtype=torch.float32, device=student.device)
        for bs, ts in blocks:
            sums[:, bs, ts] = _phase2(
                student[bs, ts], teacher[bs, ts], norm[:, bs, ts], params, shard, need_grad
            )
        sums = _all_gather(sums, shard.group).sum(0)
        rows, saved = _finish(glob, sums, labels, params, shard)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(rows[1], rows[2])
        ctx.params, ctx.shard = params, shard
        if need_grad:
            ctx.save_for_backward(student, teacher, labels, saved)
        return rows

    @staticmethod
    def backward(ctx, grad_d, _grad_ls_x, _grad_lt_x):
        no_double_backward()
        if grad_d is None:
            return (None,) * 6
        student, teacher, labels, saved = ctx.saved_tensors
        params, shard = ctx.params, ctx.shard
        batch, seq, width = student.shape
        grad = (torch.zeros if shard.width < width else torch.empty)(
            student.shape, dtype=student.dtype, device=student.device
        )
        for bs, ts in row_chunks(batch, seq, width):
            g = _grad_rows(student[bs, ts], teacher[bs, ts], labels[bs, ts], saved[:, bs, ts],
                           grad_d[bs, ts], params, shard)  # fmt: skip
            grad[bs, ts, : shard.width] = g.to(grad.dtype)
        return grad, None, None, None, None, None


def _sides(h_s, w_s, b_s, h_t, w_t, b_t, width: int):
    """Both sides' ``LinearSide`` on the local vocabulary rows (padding is never multiplied)."""
    return tuple(
        LinearSide.build(flat_rows(h), w[:width], None if b is None else b[:width])
        for h, w, b in ((h_s, w_s, b_s), (h_t, w_t, b_t))
    )


def _logits(side: LinearSide, r0: int, r1: int) -> torch.Tensor:
    """A chunk's fp32 logits; none to form on a rank holding only padding (oneDNN refuses an
    empty weight)."""
    if side.weight.shape[0] == 0:
        return torch.empty((r1 - r0, 0), dtype=torch.float32, device=side.hidden.device)
    return side.logits(r0, r1)


def _chunks(n_rows: int, rows: int):
    for r0 in range(0, n_rows, rows):
        yield r0, min(n_rows, r0 + rows)


class VocabParallelLinearFunction(torch.autograd.Function):
    """Replicated hidden states and local lm_head rows ``(W, H)`` in; ``d, ls[x], lt[x]``
    ``(B, T)`` out, equal on every rank. Gradients: this rank's weight and bias rows, and its
    partial sum of the hidden states' gradient (the caller all-reduces it over the group).

    Every rank must take the same chunks (``rows`` per chunk): each runs two collectives."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, labels, params, shard, rows, need_grad):
        flat_labels = labels.reshape(-1)
        n_rows = flat_labels.numel()
        glob = torch.empty((6, n_rows), dtype=torch.float32, device=h_s.device)
        sums = torch.empty((2, n_rows), dtype=torch.float32, device=h_s.device)
        with no_autocast(h_s.device):
            side_s, side_t = _sides(h_s, w_s, b_s, h_t, w_t, b_t, shard.width)
            for r0, r1 in _chunks(n_rows, rows):
                xs, xt, lab = _logits(side_s, r0, r1), _logits(side_t, r0, r1), flat_labels[r0:r1]
                g = _combine(_all_gather(_phase1(xs, xt, lab, shard, params.inv_tau), shard.group))
                s = _phase2(xs, xt, g[[0, 1, 3, 4]], params, shard, need_grad)
                del xs, xt
                s = _all_gather(s, shard.group).sum(0)
                glob[:, r0:r1], sums[:, r0:r1] = g, s
        flat, saved = _finish(glob, sums, flat_labels, params, shard)
        out = tuple(x.view(labels.shape) for x in flat)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(out[1], out[2])
        ctx.params, ctx.shard, ctx.rows = params, shard, rows
        if need_grad:
            ctx.save_for_backward(h_s, w_s, b_s, h_t, w_t, b_t, labels, saved)
        return out

    @staticmethod
    def backward(ctx, grad_d, _grad_ls_x, _grad_lt_x):
        no_double_backward()
        nones = (None,) * 8
        if grad_d is None or not any(ctx.needs_input_grad[:3]):
            return (None, None, None, *nones)
        h_s, w_s, b_s, h_t, w_t, b_t, labels, saved = ctx.saved_tensors
        params, shard = ctx.params, ctx.shard
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        flat_labels, flat_gd = labels.reshape(-1), grad_d.reshape(-1)
        n_rows, device = flat_labels.numel(), h_s.device
        f32 = {"dtype": torch.float32, "device": device}
        g_w = torch.zeros(w_s.shape, **f32) if want_w else None
        g_b = torch.zeros(w_s.shape[:1], **f32) if want_b else None
        # A rank holding only padding contributes nothing: zeros, and no chunk below.
        bufs = GradBuffers(
            (torch.empty if shard.width else torch.zeros)((n_rows, h_s.shape[-1]), **f32)
            if want_h
            else None,
            None if g_w is None else g_w[: shard.width],
            None if g_b is None else g_b[: shard.width],
        )
        with no_autocast(device):
            side_s, side_t = _sides(h_s, w_s, b_s, h_t, w_t, b_t, shard.width)
            for r0, r1 in _chunks(n_rows, ctx.rows) if shard.width else ():
                g = _grad_rows(side_s.logits(r0, r1), side_t.logits(r0, r1),
                               flat_labels[r0:r1], saved[:, r0:r1], flat_gd[r0:r1], params,
                               shard)  # fmt: skip
                bufs.accumulate(g, side_s, r0, r1)
        g_h = None if bufs.hidden is None else bufs.hidden.to(h_s.dtype).view(h_s.shape)
        return (
            g_h,
            None if g_w is None else g_w.to(w_s.dtype),
            None if g_b is None else g_b.to(b_s.dtype),
            *nones,
        )
