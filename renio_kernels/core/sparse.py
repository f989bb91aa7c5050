"""Top-k and sparse-teacher losses: validation and autograd (the math is in ``ops.sparse``).

Both losses return ``(d, ls[x], lt[x])`` per row like the dense ones, so ``reduce_renio`` turns
them into the loss unchanged. Only ``d`` is differentiable (``reduce_renio`` uses ``ls[x]``
detached). A dense teacher with ``top_k`` is a renormalized sparse teacher whose ids are its
top-k (``ops.sparse.select_top_k``) and whose ``lt[x]`` comes from the vocabulary sweep: one
code path.

``torch.compile``: these paths run eagerly (``torch.compiler.disable``: one graph break around
the loss's row computation; the reduction after it still compiles). They are not custom ops.
"""

from __future__ import annotations

import torch

from ..ops.backends import resolve_backend
from ..ops.gemm import GradBuffers, LinearSide, flat_rows, no_autocast
from ..ops.linear import chunk_bounds, plan_chunk_rows, sides
from ..ops.rows import DenseTeacher, DivergenceParams
from ..ops.sparse import (
    SPARSE_MODES,
    SparseTeacher,
    dense_truncated_grad,
    nan_rows,
    select_top_k,
    subset_grad,
    subset_rows,
    truncated_log_probs,
)
from ..ops.sparse_linear import (
    SparseSaved,
    sparse_backward_sweep,
    sparse_forward_sweep,
    teacher_ids,
)
from .autograd import no_double_backward
from .validation import FLOAT_DTYPES, LABEL_DTYPES, require_tensor

__all__ = [
    "check_sparse_teacher",
    "sparse_linear_rows",
    "sparse_row_stats",
    "uses_sparse_path",
]


def uses_sparse_path(teacher, top_k: int | None, vocab: int) -> bool:
    """A sparse teacher, or ``top_k`` below the student's vocabulary (``top_k >= Vs`` is the
    full loss, computed by the dense kernels)."""
    return isinstance(teacher, SparseTeacher) or (top_k is not None and top_k < vocab)


def check_sparse_teacher(teacher, batch_seq, vocab: int, labels, ignore_index: int, top_k) -> None:
    """Types, shapes, dtypes and devices of a ``SparseTeacher``; with ``teacher.check``, its
    values at the valid positions (one boolean read back from the device)."""
    if top_k is not None:
        raise ValueError(
            "top_k selects columns of dense teacher logits; a SparseTeacher already carries its "
            "k ids: leave top_k=None (send the teacher's top-k instead)"
        )
    if teacher.mode not in SPARSE_MODES:
        raise ValueError(f"unknown SparseTeacher mode {teacher.mode!r}; expected one of "
                         f"{SPARSE_MODES}")  # fmt: skip
    ids = require_tensor("SparseTeacher.ids", teacher.ids)
    lp = require_tensor("SparseTeacher.logprobs", teacher.logprobs)
    sampled = require_tensor("SparseTeacher.sampled_logprob", teacher.sampled_logprob)
    if ids.dtype not in LABEL_DTYPES:
        raise ValueError(f"SparseTeacher.ids has dtype {ids.dtype}; expected int64 (or int32) "
                         "column ids (use ids.long())")  # fmt: skip
    for name, x in (("logprobs", lp), ("sampled_logprob", sampled)):
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"SparseTeacher.{name} has dtype {x.dtype}; supported: float32, "
                             f"float16, bfloat16 (cast with .float())")  # fmt: skip
    if ids.dim() != 3 or tuple(ids.shape[:2]) != tuple(batch_seq):
        raise ValueError(f"SparseTeacher.ids has shape {tuple(ids.shape)}; expected (B, T, k) "
                         f"with (B, T) = {tuple(batch_seq)}, the student's positions")  # fmt: skip
    if lp.shape != ids.shape:
        raise ValueError(f"SparseTeacher.logprobs has shape {tuple(lp.shape)} but ids has "
                         f"{tuple(ids.shape)}; send one log-prob per id")  # fmt: skip
    if tuple(sampled.shape) != tuple(batch_seq):
        raise ValueError(f"SparseTeacher.sampled_logprob has shape {tuple(sampled.shape)}; "
                         f"expected (B, T) = {tuple(batch_seq)}, one per position")  # fmt: skip
    k = ids.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"SparseTeacher has k = {k} ids per position; expected 1 <= k <= "
                         f"Vs = {vocab}")  # fmt: skip
    for name, x in (("ids", ids), ("logprobs", lp), ("sampled_logprob", sampled)):
        if x.device != labels.device:
            raise ValueError(f"SparseTeacher.{name} is on {x.device} but labels is on "
                             f"{labels.device}; move all inputs to one device")  # fmt: skip
    if teacher.check:
        _check_values(ids, lp, sampled, labels != ignore_index, vocab)


def _check_values(ids, lp, sampled, valid, vocab: int) -> None:
    rows = valid.unsqueeze(-1)
    out_of_range = ((ids < 0) | (ids >= vocab)) & rows
    ordered = ids.sort(-1).values
    dup = (ordered[..., 1:] == ordered[..., :-1]) & rows
    bad_lp = (torch.isnan(lp) | (lp == float("inf"))) & rows
    bad_s = (torch.isnan(sampled) | (sampled == float("inf"))) & valid
    flags = torch.stack([x.any() for x in (out_of_range, dup, bad_lp, bad_s)]).tolist()
    if flags[0]:
        raise ValueError(f"SparseTeacher.ids contain {ids[out_of_range][0].item()}, outside "
                         f"[0, Vs = {vocab}); ids index the student's vocabulary")  # fmt: skip
    if flags[1]:
        pos = tuple(dup.any(-1).nonzero()[0].tolist())
        raise ValueError(f"SparseTeacher.ids repeat an id within the row at (b, t) = {pos}; "
                         "send k distinct ids per position")  # fmt: skip
    if flags[2] or flags[3]:
        name = "logprobs" if flags[2] else "sampled_logprob"
        raise ValueError(f"SparseTeacher.{name} is NaN or +inf at a valid position; send the "
                         "teacher's log-probabilities (-inf for no mass is fine)")  # fmt: skip


# --- logits in ----------------------------------------------------------------------------------


class SparseRowsFunction(torch.autograd.Function):
    """``(d, ls[x], lt[x])`` of a top-k or sparse teacher from student logits; only ``d`` is
    differentiable."""

    @staticmethod
    def forward(ctx, student, labels, teacher, params: DivergenceParams, kernels, top_k, need_grad):
        vocab = student.shape[-1]
        inv_tau = params.inv_tau
        valid = labels != params.ignore_index
        sparse = isinstance(teacher, SparseTeacher)
        other = DenseTeacher(student if sparse else teacher)
        stats = kernels.fwd(student, other, labels, params, with_divergence=False, store_c=False)
        zero = torch.zeros((), device=student.device)
        if sparse:
            ids, bad = teacher_ids(teacher, valid, vocab)
            renormalize = teacher.mode == "renormalized"
            lt_src = teacher.logprobs
            lt_x = torch.where(valid, teacher.sampled_logprob.float(), zero)
        else:
            ids, bad = select_top_k(teacher, vocab, top_k, kernel=kernels.top_k), None
            renormalize = True
            lt_src = teacher.gather(-1, ids).float() * inv_tau
            lt_x = stats.lt_x
        z_k = student.gather(-1, ids)
        ls_src = (
            z_k.float() * inv_tau
            if renormalize
            else truncated_log_probs(z_k, student, stats.lse_s, inv_tau)
        )
        rows = subset_rows(
            ls_src, lt_src, valid, params, renormalize=renormalize, want_grad=need_grad
        )
        d = rows.d if bad is None else torch.where(bad, float("nan"), rows.d)
        d = nan_rows(d, valid, stats.lse_s, *(() if sparse else (stats.lse_t,)))
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(stats.ls_x, lt_x)
        ctx.params, ctx.rows, ctx.renormalize = params, rows, renormalize
        if need_grad:
            ctx.save_for_backward(student, labels, ids, stats.lse_s)
        return d, stats.ls_x, lt_x

    @staticmethod
    def backward(ctx, grad_d, _grad_ls_x, _grad_lt_x):
        no_double_backward()
        nones = (None,) * 6
        if grad_d is None:
            return (None, *nones)
        student, labels, ids, lse_s = ctx.saved_tensors
        params = ctx.params
        valid = labels != params.ignore_index
        zero = torch.zeros((), device=student.device)
        scale = torch.where(valid, grad_d.float() * params.inv_tau, zero)
        g_k = subset_grad(ctx.rows, scale)
        if ctx.renormalize:
            grad = torch.zeros_like(student, memory_format=torch.contiguous_format)
            grad.scatter_add_(-1, ids, g_k.to(grad.dtype))
        else:
            grad = torch.empty_like(student, memory_format=torch.contiguous_format)
            c_scaled = ctx.rows.c_sum * scale
            dense_truncated_grad(
                student, ids, g_k, c_scaled, lse_s, valid, params.inv_tau, out=grad
            )
        return (grad, *nones)


@torch.compiler.disable
def sparse_row_stats(student, teacher, labels, params: DivergenceParams, backend: str,
                     top_k: int | None):  # fmt: skip
    """``(d, ls[x], lt[x])`` for ``renio_loss`` with a sparse teacher or ``top_k < Vs``."""
    kernels = resolve_backend(backend, student.device, params.divergence, DenseTeacher.kind)
    need_grad = student.requires_grad and torch.is_grad_enabled()
    if not isinstance(teacher, SparseTeacher):
        teacher = teacher.detach()
    return SparseRowsFunction.apply(student, labels, teacher, params, kernels, top_k, need_grad)


# --- hidden states in ---------------------------------------------------------------------------


class SparseLinearFunction(torch.autograd.Function):
    """``(d, ls[x], lt[x])`` of the fused-linear loss with a top-k or sparse teacher."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, labels, teacher, params, kernels, top_k, chunk_size, want):
        flat_labels = labels.reshape(-1)
        n_rows = flat_labels.shape[0]
        sparse = isinstance(teacher, SparseTeacher)
        with no_autocast(h_s.device):
            if sparse:
                student = LinearSide.build(flat_rows(h_s), w_s, b_s)
                side_t, width_t = teacher, 0
            else:
                h_t, w_t, b_t = teacher
                student, side_t = sides(flat_rows(h_s), w_s, b_s, flat_rows(h_t), w_t, b_t)
                width_t = h_t.shape[-1]
            rows = plan_chunk_rows(
                n_rows, w_s.shape[0], h_s.shape[-1], width_t, h_s.device, chunk_size
            )
            bounds = chunk_bounds(n_rows, rows)
            saved = sparse_forward_sweep(
                student, side_t, flat_labels, params, kernels, bounds, top_k, any(want)
            )
        ctx.set_materialize_grads(False)
        ctx.saved, ctx.bounds, ctx.params, ctx.want = saved, bounds, params, want
        ctx.shapes = (h_s.shape, h_s.dtype, w_s.dtype, None if b_s is None else b_s.dtype)
        if any(want):
            ctx.save_for_backward(h_s, w_s, b_s)
        out = tuple(x.view(labels.shape) for x in (saved.d, saved.ls_x, saved.lt_x))
        ctx.mark_non_differentiable(out[1], out[2])
        return out

    @staticmethod
    def backward(ctx, grad_d, _grad_ls_x, _grad_lt_x):
        no_double_backward()
        nones = (None,) * 7
        if grad_d is None or not any(ctx.want):
            return (None, None, None, *nones)
        h_s, w_s, b_s = ctx.saved_tensors
        want_h, want_w, want_b = ctx.want
        saved: SparseSaved = ctx.saved
        h_shape, h_dtype, w_dtype, b_dtype = ctx.shapes
        dev = h_s.device
        n_rows = saved.d.shape[0]
        with no_autocast(dev):
            student = LinearSide.build(flat_rows(h_s), w_s, b_s)
            f32 = {"dtype": torch.float32, "device": dev}
            into = GradBuffers(
                torch.zeros((n_rows, h_shape[-1]), **f32) if want_h else None,
                torch.zeros(tuple(w_s.shape), **f32) if want_w else None,
                torch.zeros((w_s.shape[0],), **f32) if want_b else None,
            )
            sparse_backward_sweep(student, saved, grad_d.reshape(-1), ctx.params, ctx.bounds, into)
        return (
            None if into.hidden is None else into.hidden.to(h_dtype).view(h_shape),
            None if into.weight is None else into.weight.to(w_dtype),
            None if into.bias is None else into.bias.to(b_dtype),
            *nones,
        )


@torch.compiler.disable
def sparse_linear_rows(student, teacher, labels, params: DivergenceParams, backend: str,
                       top_k: int | None, chunk_size: int | None, want):  # fmt: skip
    """``(d, ls[x], lt[x])`` for ``fused_linear_renio_loss`` with a sparse teacher or ``top_k``;
    ``student = (hidden, weight, bias)``, ``teacher`` a ``SparseTeacher`` or the detached
    ``(hidden, weight, bias)`` of a dense teacher."""
    kernels = resolve_backend(backend, labels.device, params.divergence, DenseTeacher.kind)
    return SparseLinearFunction.apply(
        *student, labels, teacher, params, kernels, top_k, chunk_size, want
    )
