"""Backward Triton kernel: one sweep per row that writes the student-logit gradient.

For row ``(b, t)`` with upstream scales ``gd = dL/dd[b, t]`` and ``gx = dL/dls[x][b, t]``:

    grad_j = ( gd * (c_j - ps_j * C)  +  gx * ([j == x] - ps_j) ) / tau

``c_j`` is recomputed from the logits and the saved log-sum-exps; ``C`` was summed by the forward
kernel. The first term is the divergence's gradient (SPEC, "Gradient"), the second the sampled
token's log-probability gradient (used by the sampled reverse-KL loss). Each term is compiled in
only when its scale exists, and the teacher is read only for the divergence term.

Bytes per row: read student (and teacher) once, write the gradient once in the logits' dtype.
Ignored rows are written with zeros here, never assumed pre-zeroed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import config
from ..rows import DivergenceParams, RowStats, check_scales, dense_logits
from .fwd import _block_v
from .math import _anchor, _divergence_terms, _row_pointers

__all__ = ["renio_bwd"]


@triton.jit
def _renio_bwd_kernel(
    # pointers
    s_ptr,
    t_ptr,
    labels_ptr,
    lse_s_ptr,
    lse_t_ptr,
    c_ptr,
    gd_ptr,
    gx_ptr,
    grad_ptr,
    # sizes
    T,
    V,
    # strides (elements)
    s_stride_b,
    s_stride_t,
    t_stride_b,
    t_stride_t,
    l_stride_b,
    l_stride_t,
    g_stride_b,
    g_stride_t,
    # scalars
    inv_tau,
    beta,
    token_clip,
    ignore_index,
    # constexprs
    DIVERGENCE: tl.constexpr,
    CLIP: tl.constexpr,
    HAS_DIV_GRAD: tl.constexpr,
    HAS_SAMPLED_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + _row_pointers(row, T, l_stride_b, l_stride_t)).to(tl.int64)
    s_row = s_ptr + _row_pointers(row, T, s_stride_b, s_stride_t)
    t_row = t_ptr + _row_pointers(row, T, t_stride_b, t_stride_t)
    g_row = grad_ptr + _row_pointers(row, T, g_stride_b, g_stride_t)
    cols = tl.arange(0, BLOCK_V)

    if label == ignore_index:
        zeros = tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + cols
            tl.store(g_row + offs, zeros, mask=offs < V)
    else:
        lse_s = tl.load(lse_s_ptr + row)
        an_s = _anchor(s_row, V, inv_tau)
        if HAS_DIV_GRAD:
            lse_t = tl.load(lse_t_ptr + row)
            an_t = _anchor(t_row, V, inv_tau)
            c_sum = tl.load(c_ptr + row)
            gd = tl.load(gd_ptr + row).to(tl.float32) * inv_tau
        if HAS_SAMPLED_GRAD:
            gx = tl.load(gx_ptr + row).to(tl.float32) * inv_tau
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + cols
            in_row = offs < V
            a = tl.load(s_row + offs, mask=in_row, other=float("-inf")).to(tl.float32)
            ls = (a * inv_tau - an_s) - lse_s
            g = tl.zeros([BLOCK_V], dtype=tl.float32)
            if HAS_DIV_GRAD:
                b = tl.load(t_row + offs, mask=in_row, other=float("-inf")).to(tl.float32)
                _, de, ps = _divergence_terms(
                    ls,
                    (b * inv_tau - an_t) - lse_t,
                    beta,
                    token_clip,
                    DIVERGENCE,
                    CLIP,
                )
                g += gd * (de - ps * c_sum)
            if HAS_SAMPLED_GRAD:
                g += gx * (tl.where(offs == label, 1.0, 0.0) - tl.exp(ls))
            tl.store(g_row + offs, g.to(grad_ptr.dtype.element_ty), mask=in_row)


def renio_bwd(student, teacher_input, labels, params: DivergenceParams, stats: RowStats, grad_d,
              grad_ls_x, *, block_v=None, out=None) -> torch.Tensor:  # fmt: skip
    """``RowBackend.bwd`` (``ops.rows``): the gradient of ``sum(grad_d * d) + sum(grad_ls_x *
    ls[x])`` w.r.t. the student logits, one program per row. ``out`` may be ``student`` itself:
    each program reads a tile of its row before writing the same tile."""
    teacher = dense_logits(student, teacher_input, labels)
    check_scales(stats, grad_d, grad_ls_x)
    batch, seq, vocab = student.shape
    grad = (
        out if out is not None else torch.empty_like(student, memory_format=torch.contiguous_format)
    )
    if batch * seq == 0:
        return grad
    # An absent scale is passed as None: Triton specializes it away with its constexpr flag.
    gd = grad_d.float().contiguous() if grad_d is not None else None
    gx = grad_ls_x.float().contiguous() if grad_ls_x is not None else None
    _renio_bwd_kernel[(batch * seq,)](
        student,
        teacher,
        labels,
        stats.lse_s,
        stats.lse_t,
        stats.c if grad_d is not None else None,
        gd,
        gx,
        grad,
        seq,
        vocab,
        student.stride(0),
        student.stride(1),
        teacher.stride(0),
        teacher.stride(1),
        labels.stride(0),
        labels.stride(1),
        grad.stride(0),
        grad.stride(1),
        params.inv_tau,
        float(params.beta),
        params.clip_value,
        params.ignore_index,
        DIVERGENCE=params.mode,
        CLIP=params.clip_on,
        HAS_DIV_GRAD=grad_d is not None,
        HAS_SAMPLED_GRAD=grad_ls_x is not None,
        BLOCK_V=_block_v(vocab, block_v),
        num_warps=config.TRITON.num_warps,
    )
    return grad
