"""The fused-linear loss with a top-k or sparse teacher: sweeps over token chunks.

Forward, per chunk of rows: the student's fp32 logits (one GEMM), which the backend's row kernels
reduce to ``lse_s`` and ``ls[x]`` (``with_divergence=False``); with a dense teacher (``top_k``),
the teacher's logits too (a second GEMM), its ``lse_t``, ``lt[x]`` and the top-k selection. The
student's logits at the ``k`` ids are gathered from the chunk in hand, so the divergence costs
``O(k)`` per row on top of the GEMMs. Only ``(N, k)`` tensors outlive a chunk.

Backward, renormalized (every ``top_k`` call, and a renormalized sparse teacher): the logits
gradient is non-zero at ``k`` columns per row, ``g (N, k)``, so it is never formed densely:
``grad_hidden[n] = sum_j g[n, j] W[ids[n, j]]`` is an ``embedding_bag`` (``O(k H)`` per row),
``grad_weight`` an ``index_add_`` of ``g[n, j] h_n`` into the rows ``ids[n, j]`` and ``grad_bias``
one of ``g``. Truncated: the gradient has the dense term ``-ps C / tau`` (through the student's
log-normalizer), so the backward recomputes the student's logits per chunk (one GEMM) and runs
the dense ``grad_hidden`` and ``grad_weight`` GEMMs: three passes, as a dense backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import config
from .gemm import GradBuffers, LinearSide
from .rows import DenseTeacher, DivergenceParams, RowBackend
from .sparse import (
    SparseTeacher,
    SubsetRows,
    dense_truncated_grad,
    nan_rows,
    select_top_k,
    subset_grad,
    subset_rows,
    truncated_log_probs,
)

__all__ = ["SparseSaved", "sparse_backward_sweep", "sparse_forward_sweep"]


@dataclass
class SparseSaved:
    """What the forward leaves for the backward, flat over the ``N`` rows."""

    d: torch.Tensor  # (N,)
    ls_x: torch.Tensor  # (N,)
    lt_x: torch.Tensor  # (N,)
    ids: torch.Tensor  # (N, k) int64, in [0, Vs)
    lse_s: torch.Tensor  # (N,)
    rows: SubsetRows  # (N, k) / (N,)
    renormalize: bool
    valid: torch.Tensor  # (N,) bool


def teacher_ids(teacher: SparseTeacher, valid: torch.Tensor, vocab: int):
    """The sparse teacher's ids, made safe to gather with (0 at ignored rows, clamped elsewhere),
    and a (rows,) mask of valid rows with an id outside ``[0, vocab)`` (their ``d`` is NaN)."""
    ids = teacher.ids.long()
    out_of_range = ((ids < 0) | (ids >= vocab)).any(-1) & valid
    ids = torch.where(valid.unsqueeze(-1), ids, torch.zeros((), dtype=ids.dtype, device=ids.device))
    return ids.clamp(0, vocab - 1), out_of_range


def sparse_forward_sweep(
    student: LinearSide,
    teacher: LinearSide | SparseTeacher,
    labels: torch.Tensor,
    params: DivergenceParams,
    backend: RowBackend,
    bounds: list[tuple[int, int]],
    top_k: int,
    want_grad: bool,
) -> SparseSaved:
    """Per-row ``d``, ``ls[x]``, ``lt[x]`` and the k-column state, over chunks ``bounds``."""
    n_rows = labels.shape[0]
    vocab = student.weight.shape[0]
    dev = labels.device
    inv_tau = params.inv_tau
    valid = labels != params.ignore_index
    sparse = isinstance(teacher, SparseTeacher)
    renormalize = not sparse or teacher.mode == "renormalized"
    if sparse:
        flat = SparseTeacher(*(x.reshape(n_rows, *x.shape[2:]) for x in (
            teacher.ids, teacher.logprobs, teacher.sampled_logprob)), teacher.mode)  # fmt: skip
        ids, bad = teacher_ids(flat, valid, vocab)
        k = ids.shape[-1]
    else:
        k = top_k
        ids = torch.empty((n_rows, k), dtype=torch.int64, device=dev)
    out = torch.zeros((4, n_rows), dtype=torch.float32, device=dev)
    d, ls_x, lt_x, lse_s = out.unbind(0)
    parts = []
    longest = max(r1 - r0 for r0, r1 in bounds)
    buf_s = student.buffer(longest)
    buf_t = None if sparse else teacher.buffer(longest)
    for r0, r1 in bounds:
        logits_s = student.logits(r0, r1, buf_s)
        lab = labels[r0:r1].view(1, -1)
        if sparse:
            other = logits_s
        else:
            other = teacher.logits(r0, r1, buf_t)
        stats = backend.fwd(
            logits_s.unsqueeze(0), DenseTeacher(other.unsqueeze(0)), lab, params,
            with_divergence=False, store_c=False,
        )  # fmt: skip
        if sparse:
            chunk_ids = ids[r0:r1]
            lt_src = flat.logprobs[r0:r1]
            lt_x[r0:r1] = torch.where(
                valid[r0:r1], flat.sampled_logprob[r0:r1].float(), torch.zeros((), device=dev)
            )
        else:
            chunk_ids = select_top_k(other.unsqueeze(0), vocab, k, kernel=backend.top_k)[0]
            ids[r0:r1] = chunk_ids
            lt_src = other.gather(-1, chunk_ids) * inv_tau
            lt_x[r0:r1] = stats.lt_x.view(-1)
        ls_x[r0:r1] = stats.ls_x.view(-1)
        lse_s[r0:r1] = stats.lse_s.view(-1)
        z_k = logits_s.gather(-1, chunk_ids)
        ls_src = (
            z_k * inv_tau
            if renormalize
            else truncated_log_probs(z_k, logits_s, stats.lse_s.view(-1), inv_tau)
        )
        del logits_s, other
        part = subset_rows(
            ls_src, lt_src, valid[r0:r1], params, renormalize=renormalize, want_grad=want_grad
        )
        lse = (stats.lse_s,) if sparse else (stats.lse_s, stats.lse_t)
        d[r0:r1] = nan_rows(part.d, valid[r0:r1], *(x.view(-1) for x in lse))
        parts.append(part)

    def cat(name: str):
        xs = [getattr(p, name) for p in parts]
        return None if xs[0] is None else torch.cat(xs)

    rows = SubsetRows(d, cat("c"), cat("ps"), cat("c_sum"))
    if sparse:
        out[0] = torch.where(bad, float("nan"), d)
    return SparseSaved(out[0], ls_x, lt_x, ids, lse_s, rows, renormalize, valid)


def _grad_rows(k: int, width: int) -> int:
    """Rows per chunk of the ``(rows, k, H)`` outer products of the weight gradient."""
    return max(1, config.TORCH_CHUNK_ELEMENTS // max(1, k * width))


def sparse_backward_sweep(
    student: LinearSide,
    saved: SparseSaved,
    grad_d: torch.Tensor,
    params: DivergenceParams,
    bounds: list[tuple[int, int]],
    into: GradBuffers,
) -> GradBuffers:
    """Add the student's gradients at ``dL/dd = grad_d`` (N,) into ``into`` (fp32 buffers)."""
    scale = grad_d.float() * params.inv_tau
    rows = saved.rows
    g_k = subset_grad(rows, scale)
    if not saved.renormalize:
        c_scaled = rows.c_sum * scale
        for r0, r1 in bounds:
            logits = student.logits(r0, r1).unsqueeze(0)
            g = dense_truncated_grad(
                logits, saved.ids[r0:r1].unsqueeze(0), g_k[r0:r1].unsqueeze(0),
                c_scaled[r0:r1].view(1, -1), saved.lse_s[r0:r1].view(1, -1),
                saved.valid[r0:r1].view(1, -1),
                params.inv_tau, out=logits,
            )  # fmt: skip
            into.accumulate(g.view(r1 - r0, -1), student, r0, r1)
            del logits, g
        return into
    gemm = student.gemm
    if into.hidden is not None:
        into.hidden.copy_(
            torch.nn.functional.embedding_bag(
                saved.ids, student.weight, per_sample_weights=gemm.operand(g_k), mode="sum"
            )
        )
    if into.weight is not None:
        k, width = g_k.shape[1], student.weight.shape[1]
        step = _grad_rows(k, width)
        for r0 in range(0, g_k.shape[0], step):
            r1 = min(g_k.shape[0], r0 + step)
            outer = g_k[r0:r1].unsqueeze(-1) * student.hidden[r0:r1].float().unsqueeze(1)
            into.weight.index_add_(0, saved.ids[r0:r1].reshape(-1), outer.view(-1, width))
            del outer
    if into.bias is not None:
        into.bias.index_add_(0, saved.ids.reshape(-1), g_k.reshape(-1))
    return into
