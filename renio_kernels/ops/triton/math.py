"""Element-wise math shared by the forward and backward Triton kernels.

For one vocabulary tile of a row, with ``ls``/``lt`` the student/teacher log-probabilities
(already divided by the temperature and normalized) and ``ps = exp(ls)``, ``pt = exp(lt)``, the
term ``e`` and ``de/dls`` of each divergence in ``ops.divergences`` (the ``DIVERGENCE``
constexpr is its ``mode``).

A term whose probability is exactly 0 is 0 (so ``-inf`` logits never produce ``0 * -inf``), but
the guard tests ``p == 0``, not ``p > 0``: a NaN probability keeps its NaN. With the token clip,
``e`` is clamped to ``[0, clip]`` and ``de/dls`` is zeroed where the clamp is active (inclusive
bounds, as ``torch.clamp``'s gradient). Each JSD term is >= 0 in exact arithmetic (log-sum
inequality), so its lower bound is only ever crossed by rounding noise where ``ps ~ pt``; gating
on it would drop a gradient that exact arithmetic keeps, so for the JSD only the upper bound
gates (this matches the float64 reference far better than a literal fp32 clamp).
``log m`` is ``max(ls, lt) + log(w_big + w_small exp(-|ls - lt|))``, finite whenever one side is.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..divergences import DIVERGENCES
from ..rows import ANCHOR_COLUMNS

_ANCHOR_COLUMNS = tl.constexpr(ANCHOR_COLUMNS)

_FORWARD_KL = tl.constexpr(DIVERGENCES["forward_kl"].mode)
_REVERSE_KL = tl.constexpr(DIVERGENCES["reverse_kl"].mode)
_JSD = tl.constexpr(DIVERGENCES["jsd"].mode)
_TVD = tl.constexpr(DIVERGENCES["tvd"].mode)


@triton.jit
def _divergence_terms(
    ls,
    lt,
    beta,
    token_clip,
    DIVERGENCE: tl.constexpr,
    CLIP: tl.constexpr,
):
    """Return ``(e, de/dls, ps)`` for one tile (clamped and gated when ``CLIP``)."""
    ps = tl.exp(ls)
    pt = tl.exp(lt)
    if DIVERGENCE == _FORWARD_KL:
        e = pt * tl.where(pt == 0.0, 0.0, lt - ls)
        de = -pt
    elif DIVERGENCE == _REVERSE_KL:
        diff = tl.where(ps == 0.0, 0.0, ls - lt)
        e = ps * diff
        de = ps * (diff + 1.0)
    elif DIVERGENCE == _TVD:
        diff = ps - pt
        e = 0.5 * tl.abs(diff)
        # sign(ps - pt) * ps / 2: the subgradient 0 at exact ties
        de = tl.where(diff > 0.0, 0.5 * ps, tl.where(diff < 0.0, -0.5 * ps, 0.0))
    else:
        # log m = mx + log(w_big + w_small * exp(-|ls - lt|)), mx = max(ls, lt): one rounding at
        # the scale of |log m|. A log-add-exp of ls + log(1 - beta) and lt + log(beta) would also
        # round those sums (about 3x the error); log((1 - beta) ps + beta pt) would underflow to
        # -inf where both probabilities are subnormal and make a finite term infinite.
        mx = tl.maximum(ls, lt)
        w_big = tl.where(ls >= lt, 1.0 - beta, beta)
        log_m = mx + tl.log(w_big + (1.0 - w_big) * tl.exp(-tl.abs(ls - lt)))
        s_term = ps * tl.where(ps == 0.0, 0.0, ls - log_m)
        t_term = pt * tl.where(pt == 0.0, 0.0, lt - log_m)
        e = beta * t_term + (1.0 - beta) * s_term
        de = (1.0 - beta) * s_term
    if CLIP:
        if DIVERGENCE == _JSD:
            de = tl.where(e <= token_clip, de, 0.0)
        else:
            de = tl.where((e >= 0.0) & (e <= token_clip), de, 0.0)
        # Written with comparisons rather than minimum/maximum so a NaN stays NaN.
        e = tl.where(e < 0.0, 0.0, tl.where(e > token_clip, token_clip, e))
    return e, de, ps


@triton.jit
def _anchor(row_ptr, V, inv_tau):
    """The row's anchor (``ops.rows.ANCHOR_COLUMNS``): the largest of its first columns' logits /
    tau, 0 when not finite. Log-probabilities are ``(a - anchor) - lse`` with ``lse`` stored
    relative to the anchor."""
    cols = tl.arange(0, _ANCHOR_COLUMNS)
    x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_tau
    a0 = tl.max(x, axis=0)
    return tl.where(a0 - a0 == 0.0, a0, 0.0)


@triton.jit
def _row_pointers(row, T, stride_b, stride_t):
    """int64 offset of row ``row`` of a ``(B, T, V)`` view with the given batch/time strides."""
    b = row // T
    t = row - b * T
    return b * stride_b + t * stride_t
