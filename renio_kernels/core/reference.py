"""Plain-PyTorch ReNIO loss: the test oracle and the paper trainer's code path.

Everything here follows ``docs/SPEC.md`` line by line, materializing every ``(B, T, V)``
intermediate the way the paper's eager trainer does. It runs in any floating dtype; the tests
call it on float64 copies of the inputs. It is deliberately simple and slow: the fused backends
are checked against it, never the other way round.

Conventions shared with the fused backends (and documented in ``docs/usage.md``):

* a divergence term whose weighting probability is exactly 0 contributes 0 (so ``-inf`` teacher
  logits never make ``0 * -inf = NaN``); a NaN probability is *not* 0, so NaN inputs propagate;
* ignored positions have ``d = 0`` and ``r = 0`` and receive a zero gradient;
* ``ratio_clip=None`` or ``token_clip=None`` disables that clip.
"""

from __future__ import annotations

import math

import torch

from ..ops.sparse import SparseTeacher
from .options import WEIGHT_NORMS
from .reduction import sequence_weights

__all__ = [
    "WEIGHT_NORMS",
    "divergence_terms",
    "per_token",
    "renio_loss",
    "sampled_reverse_kl_loss",
    "sparse_per_token",
    "top_k_ids",
    "sequence_weights",
]


def _guarded(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``p * x`` with ``0 * anything = 0``; NaN in ``p`` or ``x`` still propagates.

    ``x`` is replaced before the product (not after) so the backward pass never forms
    ``0 * inf`` either.
    """
    return p * torch.where(p == 0, torch.zeros_like(x), x)


def divergence_terms(
    ls: torch.Tensor, lt: torch.Tensor, beta: float, divergence: str | None = None
) -> torch.Tensor:
    """Per-element divergence terms ``e_v`` from student and teacher log-probabilities.

    ``divergence`` None chooses by ``beta`` (0 forward KL, 1 reverse KL, else JSD).
    """
    ps, pt = ls.exp(), lt.exp()
    if divergence is None:
        divergence = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta, "jsd")
    if divergence == "tvd":
        # torch.abs's gradient is sign(x), 0 at 0: the subgradient SPEC asks for at ties.
        return 0.5 * (ps - pt).abs()
    if divergence == "forward_kl":
        return _guarded(pt, lt - ls)
    if divergence == "reverse_kl":
        return _guarded(ps, ls - lt)
    # Where both probabilities are 0 every term is guarded away; substituting 0 there keeps
    # logaddexp(-inf, -inf) out of the backward pass.
    both_zero = (ps == 0) & (pt == 0)
    log_m = torch.logaddexp(
        torch.where(both_zero, 0.0, ls + math.log1p(-beta)),
        torch.where(both_zero, 0.0, lt + math.log(beta)),
    )
    return beta * _guarded(pt, lt - log_m) + (1.0 - beta) * _guarded(ps, ls - log_m)


def top_k_ids(teacher_logits: torch.Tensor, vocab: int, k: int, temperature: float = 1.0):
    """The ``k`` columns with the largest ``teacher_logits[..., :vocab] / temperature``; among
    equal values the lower column id (a stable descending sort)."""
    scaled = teacher_logits[..., :vocab] / temperature
    return torch.sort(scaled, dim=-1, descending=True, stable=True).indices[..., :k]


def _clip(e: torch.Tensor, token_clip: float | None) -> torch.Tensor:
    return torch.clamp(e, 0.0, token_clip) if token_clip is not None and token_clip > 0 else e


def _ratio(ls_x, lt_x, mask, ratio_clip):
    r = (ls_x - lt_x).detach()
    if ratio_clip is not None:
        r = torch.clamp(r, max=ratio_clip)
    return torch.where(mask, r, torch.zeros((), dtype=r.dtype))


def _nan_rows(d: torch.Tensor, mask: torch.Tensor, *log_probs: torch.Tensor) -> torch.Tensor:
    """A NaN in a valid row's full-vocabulary distribution makes its ``d`` NaN, also when the NaN
    is outside the columns the divergence sums over (it is never hidden)."""
    bad = mask.clone()
    nan = torch.zeros_like(mask)
    for x in log_probs:
        nan = nan | torch.isnan(x).any(-1)
    return torch.where(bad & nan, float("nan"), d)


def _sampled(x: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    idx = torch.where(mask, labels, torch.zeros_like(labels)).unsqueeze(-1)
    return x.gather(-1, idx).squeeze(-1)


def per_token(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float = 0.0,
    divergence: str | None = None,
    temperature: float = 1.0,
    token_clip: float | None = None,
    ratio_clip: float | None = 2.5,
    ignore_index: int = -100,
    top_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(d, r, mask)``: per-token divergence, clipped sampled-token log ratio, mask.

    ``teacher_logits`` may be a ``SparseTeacher`` (``sparse_per_token``)."""
    if isinstance(teacher_logits, SparseTeacher):
        assert top_k is None
        return sparse_per_token(
            student_logits, teacher_logits, labels, beta=beta, divergence=divergence,
            temperature=temperature, token_clip=token_clip, ratio_clip=ratio_clip,
            ignore_index=ignore_index,
        )  # fmt: skip
    vocab = student_logits.shape[-1]
    ls = torch.log_softmax(student_logits / temperature, dim=-1)
    lt = torch.log_softmax(teacher_logits[..., :vocab].to(ls.dtype) / temperature, dim=-1)
    mask = labels != ignore_index
    if top_k is None or top_k >= vocab:
        e = divergence_terms(ls, lt, beta, divergence)
    else:
        # The top_k columns of the teacher, both sides renormalized there.
        ids = top_k_ids(teacher_logits.to(ls.dtype), vocab, top_k, temperature)
        ls_k = torch.log_softmax(student_logits.gather(-1, ids) / temperature, dim=-1)
        lt_k = torch.log_softmax(teacher_logits.to(ls.dtype).gather(-1, ids) / temperature, -1)
        e = divergence_terms(ls_k, lt_k, beta, divergence)
    e = _clip(e, token_clip)
    d = torch.where(mask, e.sum(-1), torch.zeros((), dtype=e.dtype))
    if top_k is not None and top_k < vocab:
        d = _nan_rows(d, mask, ls, lt)
    r = _ratio(_sampled(ls, labels, mask), _sampled(lt, labels, mask), mask, ratio_clip)
    return d, r, mask


def sparse_per_token(
    student_logits: torch.Tensor,
    teacher: SparseTeacher,
    labels: torch.Tensor,
    *,
    beta: float = 0.0,
    divergence: str | None = None,
    temperature: float = 1.0,
    token_clip: float | None = None,
    ratio_clip: float | None = 2.5,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``per_token`` with a sparse teacher: ``"renormalized"`` takes ``log_softmax`` of both
    sides over the given ids; ``"truncated"`` the student's full-vocabulary log-probabilities and
    the teacher's as sent at the ids, ``d = max(0, sum)``. ``r`` uses ``sampled_logprob``."""
    ls = torch.log_softmax(student_logits / temperature, dim=-1)
    mask = labels != ignore_index
    ids = torch.where(mask.unsqueeze(-1), teacher.ids.long(), 0)
    lp = teacher.logprobs.to(ls.dtype)
    if teacher.mode == "renormalized":
        ls_k = torch.log_softmax(student_logits.gather(-1, ids) / temperature, dim=-1)
        e = divergence_terms(ls_k, torch.log_softmax(lp, dim=-1), beta, divergence)
        d = _clip(e, token_clip).sum(-1)
    else:
        e = divergence_terms(ls.gather(-1, ids), lp, beta, divergence)
        d = torch.clamp(_clip(e, token_clip).sum(-1), min=0.0)
    d = _nan_rows(torch.where(mask, d, torch.zeros((), dtype=d.dtype)), mask, ls)
    lt_x = torch.where(mask, teacher.sampled_logprob.to(ls.dtype), 0.0)
    r = _ratio(_sampled(ls, labels, mask), lt_x, mask, ratio_clip)
    return d, r, mask


def renio_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    use_renio: bool = True,
    threshold: float = 0.8,
    weight_temperature: float = 1.0,
    weight_norm: str = "batch_mean",
    ema_mean: torch.Tensor | None = None,
    reduction: str = "sequence_mean",
    return_stats: bool = False,
    **token_options,
):
    """The ReNIO loss of ``docs/SPEC.md``, materializing everything. Differentiable in the student.

    ``reduction``: ``"sequence_mean"`` (``mean_b(w_b D_b)``), ``"token_mean"`` (every valid token's
    ``w_b d`` over their number) or ``"sum"``.

    ``token_options`` are those of ``per_token`` (beta, divergence, temperature, token_clip,
    ratio_clip, ignore_index, top_k); ``teacher_logits`` may be a ``SparseTeacher``."""
    d, r, mask = per_token(student_logits, teacher_logits, labels, **token_options)
    n = mask.sum(-1).clamp(min=1).to(d.dtype)
    divergence = d.sum(-1) / n
    w, selected, mean_e = sequence_weights(
        r,
        mask,
        threshold=threshold,
        weight_temperature=weight_temperature,
        weight_norm=weight_norm,
        ema_mean=ema_mean,
    )
    if not use_renio:
        w = torch.ones_like(w)
    weighted = w.unsqueeze(-1) * torch.where(mask, d, torch.zeros_like(d))
    if reduction == "sequence_mean":
        loss = (weighted.sum(-1) / n).mean()
    elif reduction == "token_mean":
        loss = weighted.sum() / mask.sum().clamp(min=1)
    elif reduction == "sum":
        loss = weighted.sum()
    else:
        raise ValueError(f"unknown reduction {reduction!r}")
    if not return_stats:
        return loss
    stats = {
        "weights": w.detach(),
        "divergence": divergence.detach(),
        "log_ratio": r,
        "selected": selected,
        "batch_mean_e": mean_e,
    }
    return loss, stats


def sampled_reverse_kl_loss(student_logits, teacher_logits, labels, *, temperature=1.0,
                            ignore_index=-100) -> torch.Tensor:  # fmt: skip
    """``-mean over valid tokens of A * ls[x]``, detached advantage ``A = lt[x] - ls[x]``."""
    vocab = student_logits.shape[-1]
    ls = torch.log_softmax(student_logits / temperature, dim=-1)
    lt = torch.log_softmax(teacher_logits[..., :vocab].to(ls.dtype) / temperature, dim=-1)
    mask = labels != ignore_index
    idx = torch.where(mask, labels, torch.zeros_like(labels)).unsqueeze(-1)
    ls_x = ls.gather(-1, idx).squeeze(-1)
    lt_x = lt.gather(-1, idx).squeeze(-1)
    adv = (lt_x - ls_x).detach()
    zero = torch.zeros((), dtype=ls_x.dtype)
    total = torch.where(mask, adv * ls_x, zero).sum()
    return -total / mask.sum().clamp(min=1)
