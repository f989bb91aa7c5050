"""Forward Triton kernel: one program per ``(b, t)`` row, two sweeps over the vocabulary.

Math (``a = s / tau``, ``b = t / tau`` over the student's ``Vs`` columns):

    sweep 1: lse_s = logsumexp(a), lse_t = logsumexp(b)     online, one max + one exp per element
             ls[x] = a[x] - lse_s, lt[x] = b[x] - lse_t        two scalar loads (the sampled token)
             (each formed against the row's anchor: ``triton.math._anchor``)
    sweep 2: d = sum_v clamp(e_v),  C = sum_v c_v            (e, c: see ``ops.triton.math``)

``C`` is what the backward pass needs besides the log-sum-exps: ``g_j = (c_j - ps_j C) / tau``
(SPEC, "Gradient"), so backward is a single sweep that can write each gradient tile at once.

Why two sweeps: a clipped or JSD term needs the final normalizers before any element can be
evaluated, so a single online sweep cannot produce ``d``. Bytes moved per row (element size
``s``): forward reads ``2 * Vs * s`` twice (the second sweep mostly from L2 for rows up to a few
MB), backward reads ``2 * Vs * s`` and writes ``Vs * s``: 7 ``Vs * s`` in all, against a floor of
3 (read both once, write the gradient once) for a loss whose gradient scale depends on the whole
batch. Sequence weights need every row's ``ls[x] - lt[x]`` first, so the gradient cannot be
finalized in the forward pass without storing a ``(B, T, V)`` tensor.

Ignored rows (``label == ignore_index``) skip both sweeps and write zeros; the kernel writes
every output itself. Rows are addressed as ``b * stride_b + t * stride_t`` in int64, so views
such as ``logits[:, :-1]`` are read in place and ``B * T * V`` may exceed 2^31.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import config
from ..rows import DivergenceParams, RowStats, dense_logits
from .math import _anchor, _divergence_terms, _row_pointers

__all__ = ["renio_fwd"]


@triton.jit
def _renio_fwd_kernel(
    # pointers
    s_ptr,
    t_ptr,
    labels_ptr,
    lse_s_ptr,
    lse_t_ptr,
    ls_x_ptr,
    lt_x_ptr,
    d_ptr,
    c_ptr,
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
    # scalars
    inv_tau,
    beta,
    token_clip,
    ignore_index,
    # constexprs
    DIVERGENCE: tl.constexpr,
    CLIP: tl.constexpr,
    WITH_DIVERGENCE: tl.constexpr,
    STORE_C: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + _row_pointers(row, T, l_stride_b, l_stride_t)).to(tl.int64)
    s_row = s_ptr + _row_pointers(row, T, s_stride_b, s_stride_t)
    t_row = t_ptr + _row_pointers(row, T, t_stride_b, t_stride_t)
    cols = tl.arange(0, BLOCK_V)

    lse_s = 0.0
    lse_t = 0.0
    ls_x = 0.0
    lt_x = 0.0
    d = 0.0
    c = 0.0
    if label != ignore_index:
        # Sweep 1: online log-sum-exp. ``m_safe`` stands in for a running max that is still
        # -inf (an all -inf prefix) so exp(-inf - -inf) never makes a NaN.
        m_s = float("-inf")
        m_t = float("-inf")
        z_s = 0.0
        z_t = 0.0
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + cols
            in_row = offs < V
            a = tl.load(s_row + offs, mask=in_row, other=float("-inf")).to(tl.float32) * inv_tau
            b = tl.load(t_row + offs, mask=in_row, other=float("-inf")).to(tl.float32) * inv_tau
            new_m_s = tl.maximum(m_s, tl.max(a, axis=0))
            new_m_t = tl.maximum(m_t, tl.max(b, axis=0))
            safe_s = tl.where(new_m_s == float("-inf"), 0.0, new_m_s)
            safe_t = tl.where(new_m_t == float("-inf"), 0.0, new_m_t)
            z_s = z_s * tl.exp(m_s - safe_s) + tl.sum(tl.exp(a - safe_s), axis=0)
            z_t = z_t * tl.exp(m_t - safe_t) + tl.sum(tl.exp(b - safe_t), axis=0)
            m_s = new_m_s
            m_t = new_m_t
        an_s = _anchor(s_row, V, inv_tau)
        an_t = _anchor(t_row, V, inv_tau)
        lse_s = (tl.where(m_s == float("-inf"), 0.0, m_s) - an_s) + tl.log(z_s)
        lse_t = (tl.where(m_t == float("-inf"), 0.0, m_t) - an_t) + tl.log(z_t)

        # An out-of-range label (only possible with check_labels=False) poisons the row's
        # outputs, d included, so the loss turns NaN instead of silently dropping the token.
        ok = (label >= 0) & (label < V)
        s_x = tl.load(s_row + label, mask=ok, other=float("nan")).to(tl.float32)
        t_x = tl.load(t_row + label, mask=ok, other=float("nan")).to(tl.float32)
        ls_x = (s_x * inv_tau - an_s) - lse_s
        lt_x = (t_x * inv_tau - an_t) - lse_t

        if WITH_DIVERGENCE:
            d_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
            c_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + cols
                in_row = offs < V
                a = tl.load(s_row + offs, mask=in_row, other=float("-inf")).to(tl.float32)
                b = tl.load(t_row + offs, mask=in_row, other=float("-inf")).to(tl.float32)
                e, de, _ = _divergence_terms(
                    (a * inv_tau - an_s) - lse_s,
                    (b * inv_tau - an_t) - lse_t,
                    beta,
                    token_clip,
                    DIVERGENCE,
                    CLIP,
                )
                d_acc += e
                if STORE_C:
                    c_acc += de
            d = tl.where(ok, tl.sum(d_acc, axis=0), float("nan"))
            c = tl.sum(c_acc, axis=0)

    tl.store(lse_s_ptr + row, lse_s)
    tl.store(lse_t_ptr + row, lse_t)
    tl.store(ls_x_ptr + row, ls_x)
    tl.store(lt_x_ptr + row, lt_x)
    if WITH_DIVERGENCE:
        tl.store(d_ptr + row, d)
        if STORE_C:
            tl.store(c_ptr + row, c)


def _block_v(vocab: int, block_v: int | None) -> int:
    if block_v is None:
        tiles = config.TRITON
        block_v = tiles.interpret_block_v if config.interpreting() else tiles.block_v
    return min(block_v, triton.next_power_of_2(vocab))


def renio_fwd(student, teacher_input, labels, params: DivergenceParams, *, with_divergence=True,
              store_c=True, block_v=None) -> RowStats:  # fmt: skip
    """``RowBackend.fwd`` (``ops.rows``): one program per row, ``block_v`` columns per tile."""
    teacher = dense_logits(student, teacher_input, labels)
    batch, seq, vocab = student.shape

    rows = batch * seq
    device = student.device
    lse_s, lse_t, ls_x, lt_x = torch.empty((4, batch, seq), dtype=torch.float32, device=device)
    store_c = store_c and with_divergence
    # Outputs nobody asked for are passed as None; their constexpr flag compiles the store out.
    d = torch.empty((batch, seq), dtype=torch.float32, device=device) if with_divergence else None
    c = torch.empty((batch, seq), dtype=torch.float32, device=device) if store_c else None
    block = _block_v(vocab, block_v)
    if rows > 0:
        _renio_fwd_kernel[(rows,)](
            student,
            teacher,
            labels,
            lse_s,
            lse_t,
            ls_x,
            lt_x,
            d,
            c,
            seq,
            vocab,
            student.stride(0),
            student.stride(1),
            teacher.stride(0),
            teacher.stride(1),
            labels.stride(0),
            labels.stride(1),
            params.inv_tau,
            float(params.beta),
            params.clip_value,
            params.ignore_index,
            DIVERGENCE=params.mode,
            CLIP=params.clip_on,
            WITH_DIVERGENCE=with_divergence,
            STORE_C=store_c,
            BLOCK_V=block,
            num_warps=config.TRITON.num_warps,
        )
    if d is None:
        d = torch.zeros((batch, seq), dtype=torch.float32, device=device)
    return RowStats(lse_s, lse_t, ls_x, lt_x, d, c)
