"""Portable row kernels in plain PyTorch, a chunk of rows at a time.

Same contract as the Triton kernels (``RowStats`` out of the forward, the student gradient out of
the backward; ``ops.rows``), same math (``ops.triton.math``), in fp32 whatever the input dtype.
Rows are taken in chunks of about ``config.TORCH_CHUNK_ELEMENTS`` (rows x vocab) elements, so the
fp32 intermediates have a fixed size however many tokens there are: peak extra memory is the
gradient plus a dozen chunk-sized temporaries. Chunks are views of the inputs (whole sequences
when they fit, else slices of one sequence), so strided inputs are never copied as a whole.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ... import config
from ..rows import ANCHOR_COLUMNS, DivergenceParams, RowStats, check_scales, dense_logits

__all__ = [
    "elementwise_terms",
    "log_probs",
    "renio_bwd_torch",
    "renio_fwd_torch",
    "row_anchor",
    "row_chunks",
]


def row_chunks(
    batch: int, seq: int, vocab: int, chunk_elements: int | None = None
) -> Iterator[tuple[slice, slice]]:
    """``(b_slice, t_slice)`` blocks covering ``(batch, seq)`` with ~``chunk_elements`` each."""
    rows = max(1, (chunk_elements or config.TORCH_CHUNK_ELEMENTS) // max(vocab, 1))
    if rows >= seq:
        per = max(1, rows // max(seq, 1))
        for b0 in range(0, batch, per):
            yield slice(b0, min(batch, b0 + per)), slice(0, seq)
    else:
        for b in range(batch):
            for t0 in range(0, seq, rows):
                yield slice(b, b + 1), slice(t0, min(seq, t0 + rows))


def row_anchor(logits: torch.Tensor, inv_tau: float) -> torch.Tensor:
    """The rows' anchors (``ops.rows.ANCHOR_COLUMNS``): the largest of the first columns' logits /
    tau, 0 when not finite; ``(rows, 1)`` fp32."""
    first = logits[..., :ANCHOR_COLUMNS].float().amax(-1, keepdim=True) * inv_tau
    return torch.where(torch.isfinite(first), first, torch.zeros((), device=first.device))


def _log_probs(
    logits: torch.Tensor, vocab: int, inv_tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_softmax(logits[..., :vocab] / tau), lse)`` in fp32: ``lse`` is the log-sum-exp of
    ``logits / tau - anchor`` and the log-probabilities ``(logits / tau - anchor) - lse``, so a
    constant on the logits costs no digits."""
    logits = logits[..., :vocab]
    x = (logits.float() * inv_tau).sub_(row_anchor(logits, inv_tau))
    # A row that is -inf throughout has lse = -inf: NaN log-probabilities, as documented.
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    return x.sub_(lse), lse.squeeze(-1)


def log_probs(logits: torch.Tensor, inv_tau: float, lse: torch.Tensor) -> torch.Tensor:
    """``(logits / tau - anchor) - lse``: the log-probabilities from a stored ``lse``, fp32."""
    x = torch.add(-row_anchor(logits, inv_tau), logits.float(), alpha=inv_tau)
    return x.sub_(lse.unsqueeze(-1))


def elementwise_terms(
    ls: torch.Tensor, lt: torch.Tensor, params: DivergenceParams, want_grad: bool
):
    """``(e, de/dls, ps)`` of ``params``' divergence, with the guards and clip of
    ``triton.math._divergence_terms``."""
    ps = ls.exp()
    pt = lt.exp()
    zero = torch.zeros((), dtype=ls.dtype, device=ls.device)
    name = params.divergence
    if name == "forward_kl":
        e = pt * torch.where(pt == 0, zero, lt - ls)
        de = -pt if want_grad else None
    elif name == "reverse_kl":
        diff = torch.where(ps == 0, zero, ls - lt)
        e = ps * diff
        de = ps * (diff + 1.0) if want_grad else None
    elif name == "tvd":
        diff = ps - pt
        e = 0.5 * diff.abs()
        de = 0.5 * ps * torch.sign(diff) if want_grad else None
    else:
        beta = params.beta
        # log m with one rounding at its own scale, no underflow (see triton.math).
        w_big = torch.where(ls >= lt, 1.0 - beta, beta)
        log_m = torch.maximum(ls, lt) + torch.log(w_big + (1.0 - w_big) * (-(ls - lt).abs()).exp())
        s_term = ps * torch.where(ps == 0, zero, ls - log_m)
        t_term = pt * torch.where(pt == 0, zero, lt - log_m)
        e = beta * t_term + (1.0 - beta) * s_term
        de = (1.0 - beta) * s_term if want_grad else None
    if params.clip_on:
        clip = params.clip_value
        if want_grad:
            # JSD terms are >= 0 in exact arithmetic: only the upper bound gates (triton.math).
            upper = e <= clip
            active = upper if params.spec.nonnegative_terms else (e >= 0) & upper
            de = torch.where(active, de, zero)
        e = torch.where(e < 0, zero, torch.where(e > clip, clip, e))
    return e, de, ps


def _sampled(logp: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    idx = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(-1)
    return logp.gather(-1, idx.clamp(0, logp.shape[-1] - 1)).squeeze(-1)


def renio_fwd_torch(student, teacher_input, labels, params: DivergenceParams, *,
                    with_divergence=True, store_c=True, chunk_elements=None):  # fmt: skip
    """``RowBackend.fwd`` (``ops.rows``) in chunks of about ``chunk_elements`` logits."""
    teacher = dense_logits(student, teacher_input, labels)
    batch, seq, vocab = student.shape
    out = torch.zeros((6, batch, seq), dtype=torch.float32, device=student.device)
    lse_s, lse_t, ls_x, lt_x, d, c = out.unbind(0)
    store_c = store_c and with_divergence
    inv_tau = params.inv_tau
    for bs, ts in row_chunks(batch, seq, vocab, chunk_elements):
        lab = labels[bs, ts]
        valid = lab != params.ignore_index
        # Labels outside [0, V) (only with check_labels=False) give NaN, as in the kernels.
        in_range = (lab >= 0) & (lab < vocab)
        ls, lse_s_blk = _log_probs(student[bs, ts], vocab, inv_tau)
        lt, lse_t_blk = _log_probs(teacher[bs, ts], vocab, inv_tau)
        zero = torch.zeros((), device=ls.device)
        nan = torch.full((), float("nan"), device=ls.device)
        lse_s[bs, ts] = torch.where(valid, lse_s_blk, zero)
        lse_t[bs, ts] = torch.where(valid, lse_t_blk, zero)
        ls_x[bs, ts] = torch.where(
            valid, torch.where(in_range, _sampled(ls, lab, valid), nan), zero
        )
        lt_x[bs, ts] = torch.where(
            valid, torch.where(in_range, _sampled(lt, lab, valid), nan), zero
        )
        if with_divergence:
            e, de, _ = elementwise_terms(ls, lt, params, want_grad=store_c)
            d[bs, ts] = torch.where(valid, torch.where(in_range, e.sum(-1), nan), zero)
            if store_c:
                c[bs, ts] = torch.where(valid, de.sum(-1), zero)
            del e, de
    return RowStats(lse_s, lse_t, ls_x, lt_x, d, c if store_c else None)


def renio_bwd_torch(student, teacher_input, labels, params: DivergenceParams, stats: RowStats,
                    grad_d, grad_ls_x, *, chunk_elements=None, out=None):  # fmt: skip
    """``RowBackend.bwd`` (``ops.rows``) in chunks of about ``chunk_elements`` logits. ``out``
    may be ``student`` itself: a chunk is read before its gradient is written."""
    teacher = dense_logits(student, teacher_input, labels)
    check_scales(stats, grad_d, grad_ls_x)
    batch, seq, vocab = student.shape
    grad = (
        out if out is not None else torch.empty_like(student, memory_format=torch.contiguous_format)
    )
    inv_tau = params.inv_tau
    for bs, ts in row_chunks(batch, seq, vocab, chunk_elements):
        lab = labels[bs, ts]
        valid = lab != params.ignore_index
        ls = log_probs(student[bs, ts], inv_tau, stats.lse_s[bs, ts])
        g = torch.zeros_like(ls)
        if grad_d is not None:
            lt = log_probs(teacher[bs, ts, :vocab], inv_tau, stats.lse_t[bs, ts])
            _, de, ps = elementwise_terms(ls, lt, params, want_grad=True)
            del lt
            scale = (grad_d[bs, ts].float() * inv_tau).unsqueeze(-1)
            g.add_(de.sub_(ps * stats.c[bs, ts].unsqueeze(-1)).mul_(scale))
            del de, ps
        if grad_ls_x is not None:
            scale = (grad_ls_x[bs, ts].float() * inv_tau).unsqueeze(-1)
            onehot = torch.zeros_like(ls).scatter_(
                -1, torch.where(valid, lab, 0).clamp(0, vocab - 1).unsqueeze(-1), 1.0
            )
            g.add_(onehot.sub_(ls.exp()).mul_(scale))
            del onehot
        g = torch.where(valid.unsqueeze(-1), g, torch.zeros((), device=g.device))
        grad[bs, ts] = g.to(grad.dtype)
    return grad
