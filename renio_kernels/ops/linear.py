"""Token chunks for the fused-linear loss: the chunk planner, the last-layer matmuls and the
sweeps over the chunks.

A chunk is a range ``[r0, r1)`` of the flattened ``B * T`` tokens. Per chunk the forward sweep
forms ``logits = hidden[r0:r1] @ weight.T (+ bias)`` in fp32 for each side, hands them to the row
kernels, which return the row statistics and the unit-scale logits gradient ``u`` (the gradient
of ``d``; ``dL/dd`` is applied later), and turns ``u`` into

    grad_hidden[r0:r1] = u @ weight        G += u.T @ (s * hidden[r0:r1])     Gb += u.T @ s

where ``s`` weights each row by its sequence's factor (``SequenceWeights``). That is four
(rows x vocab x hidden) matmuls per chunk, each once: the backward only scales what the forward
formed (see ``core.autograd``).

Sequence weighting: ``dL/dd[b, t] = grad_output * w_b / (B * n_b)`` where ``w_b`` is, for every
``weight_norm``, a factor ``f_b`` of sequence ``b``'s own rows times one batch-wide scalar (except
where ``batch_mean`` caps it, which the backward corrects). ``f_b`` is known once sequence ``b``'s
last row has been through the row kernels, so the weight-gradient rows of a sequence go into
``G`` when it closes: whole sequences per chunk when one fits in the chunk budget (the automatic
plan puts chunk boundaries on sequence boundaries), else the rows of the one sequence still open
at a chunk boundary wait in a second fp32 accumulator (or in ``G`` itself while ``G`` holds nothing
else) and are added to ``G`` with their factor when the sequence closes. ``G`` is kept relative to
a reference ``exp(L)`` so that the factors, which ``exp(rbar / weight_temperature)`` can take far
outside fp32's range, are only ever applied as ratios: see ``_WeightedGrads``.

The last-layer matmuls and their precision are in ``ops.gemm``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import config
from .backends import resolve_backend
from .gemm import GradBuffers, LinearSide, no_autocast
from .rows import DenseTeacher, DivergenceParams, RowBackend, RowStats

__all__ = [
    "ForwardGrads",
    "SequenceWeights",
    "SweepPlan",
    "chunk_bounds",
    "chunk_cap",
    "forward_sweep",
    "grad_sweep",
    "plan_chunk_rows",
]


def chunk_cap(vocab: int, hidden_s: int, hidden_t: int, device: torch.device) -> int:
    """The most rows per chunk the device's budget allows (and that pay off).

    Per chunk row the sweep holds ``3 * vocab + hidden_s + hidden_t`` fp32 values (student and
    teacher logits, the logits gradient, hidden rows). Where ``FUSED_LINEAR_TOTAL_PER_VOCAB`` is
    set (CPU), they get what ``FUSED_LINEAR_TOTAL_PER_VOCAB * vocab`` elements leave after the
    two weight-sized fp32 accumulators (at most ``FUSED_LINEAR_MAX_CHUNK_ELEMENTS``), unless that
    is under ``_TOTAL_MIN_ROWS`` rows (a large hidden size, where the accumulators alone take it,
    or a huge vocabulary); otherwise ``FUSED_LINEAR_CHUNK_ELEMENTS``.
    Between ``FUSED_LINEAR_MIN_ROWS`` and ``FUSED_LINEAR_MAX_ROWS`` rows.
    """
    budget = config.FUSED_LINEAR_CHUNK_ELEMENTS
    kind = device.type if device.type in budget else "cpu"
    per_row = 3 * vocab + hidden_s + hidden_t
    cap = budget[kind] // per_row
    per_vocab = config.FUSED_LINEAR_TOTAL_PER_VOCAB.get(kind)
    if per_vocab is not None:
        left = min((per_vocab - 2 * hidden_s) * vocab, config.FUSED_LINEAR_MAX_CHUNK_ELEMENTS[kind])
        if left >= _TOTAL_MIN_ROWS * per_row:
            cap = left // per_row
    return max(config.FUSED_LINEAR_MIN_ROWS, min(cap, config.FUSED_LINEAR_MAX_ROWS.get(kind, cap)))


# Fewer rows than this cost the chunk matmuls a sixth of their rate or more (216 against 259
# GFLOP/s with 64 and 256 rows at V = 151936, fused_linear_gemm.md): use the chunk budget then.
_TOTAL_MIN_ROWS = 64


def plan_chunk_rows(
    n_rows: int,
    vocab: int,
    hidden_s: int,
    hidden_t: int,
    device: torch.device,
    chunk_size: int | None = None,
) -> int:
    """Rows per chunk: ``chunk_size`` if given, else ``chunk_cap`` balanced over the chunks, so
    the last one is not a nearly empty, inefficient GEMM."""
    if chunk_size is not None:
        return max(1, min(chunk_size, n_rows))
    cap = chunk_cap(vocab, hidden_s, hidden_t, device)
    n_chunks = math.ceil(n_rows / cap)
    return math.ceil(n_rows / n_chunks)


def chunk_bounds(n_rows: int, rows: int, seq_len: int | None = None) -> list[tuple[int, int]]:
    """Chunks ``[r0, r1)`` of at most ``rows`` tokens.

    With ``seq_len``, boundaries fall on sequence boundaries: as many whole sequences per chunk
    as fit (balanced), or, for a sequence longer than ``rows``, that sequence in balanced pieces.
    Without it, ``rows`` tokens per chunk whatever the sequences.
    """
    if seq_len is None or seq_len < 1 or n_rows % seq_len:
        return [(r0, min(n_rows, r0 + rows)) for r0 in range(0, n_rows, rows)]
    if seq_len <= rows:
        n_seq = n_rows // seq_len
        per = rows // seq_len
        per = math.ceil(n_seq / math.ceil(n_seq / per))
        step = per * seq_len
        return [(r0, min(n_rows, r0 + step)) for r0 in range(0, n_rows, step)]
    piece = math.ceil(seq_len / math.ceil(seq_len / rows))
    return [
        (r0, min(s0 + seq_len, r0 + piece))
        for s0 in range(0, n_rows, seq_len)
        for r0 in range(s0, s0 + seq_len, piece)
    ]


@dataclass(frozen=True)
class SequenceWeights:
    """How the forward weights each sequence's rows in the weight and bias gradients. Built by
    the core from the loss options (``core.reduction`` defines the factors); nothing here knows
    the ReNIO formulas.

    ``log_factor(ls_x, lt_x, labels)`` takes the rows ``(S, T)`` of S complete sequences and
    returns ``log f`` (S,) float64, ``-inf`` for a sequence without a valid token. ``span``: an
    upper bound of ``max log f - min log f`` that the options guarantee (None: unbounded).
    ``capped``: some weights may not be ``f_b`` times the batch-wide scalar (``batch_mean``'s cap),
    so the backward checks for them and corrects them. ``per_token_mean``: each row also carries
    ``1 / n_b`` (the loss averages each sequence over its valid tokens), else every row of a
    sequence carries ``f_b`` alone.
    """

    seq_len: int
    log_factor: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    span: float | None
    capped: bool
    per_token_mean: bool = True


@dataclass(frozen=True)
class SweepPlan:
    """What every sweep of one call needs besides the tensors."""

    params: DivergenceParams
    backend: RowBackend
    rows: int  # tokens per chunk (at most)
    want: tuple[bool, bool, bool]  # gradients wanted: student hidden, weight, bias
    weights: SequenceWeights | None = None  # present when the weight or bias gradient is wanted
    aligned: bool = False  # chunk boundaries on sequence boundaries (the automatic plan)

    @staticmethod
    def build(params, backend: str, h_s, w_s, h_t, labels, chunk_size, want,
              weights: SequenceWeights | None = None) -> SweepPlan:  # fmt: skip
        """The plan of one call: the resolved row kernels and the tokens per chunk."""
        kernels = resolve_backend(backend, h_s.device, params.divergence)
        vocab, h_s_dim, h_t_dim = w_s.shape[0], h_s.shape[-1], h_t.shape[-1]
        aligned = chunk_size is None and weights is not None
        if aligned:
            rows = min(labels.numel(), chunk_cap(vocab, h_s_dim, h_t_dim, h_s.device))
        else:
            rows = plan_chunk_rows(labels.numel(), vocab, h_s_dim, h_t_dim, h_s.device, chunk_size)
        return SweepPlan(params, kernels, rows, tuple(want), weights, aligned)

    def bounds(self, n_rows: int) -> list[tuple[int, int]]:
        seq_len = self.weights.seq_len if self.aligned and self.weights is not None else None
        return chunk_bounds(n_rows, self.rows, seq_len)


@dataclass
class ForwardGrads:
    """What the forward sweep formed for the backward (fp32; None where not wanted).

    ``hidden``: ``u @ Ws`` per row at unit scale (the backward scales row n by ``dL/dd[n]``).
    ``weight``, ``bias``: ``sum_n s[n] u_n^T h_n`` and ``sum_n s[n] u_n`` with ``s[n] =
    seq[0, b(n)]``, the per-sequence scale; ``seq[1]`` is ``log f_b - L`` (``-inf`` for a sequence
    without a valid token), so ``seq[0] = exp(seq[1]) / (B * n_b)`` (float64, (2, B)).
    """

    hidden: torch.Tensor | None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    seq: torch.Tensor | None = None


def sides(h_s, w_s, b_s, h_t, w_t, b_t) -> tuple[LinearSide, LinearSide]:
    vocab = w_s.shape[0]
    # The teacher's columns >= Vs are ignored by the loss, so they are never computed.
    teacher = LinearSide.build(h_t, w_t[:vocab], None if b_t is None else b_t[:vocab])
    return LinearSide.build(h_s, w_s, b_s), teacher


def _chunk(x: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows ``[r0, r1)`` of a flat per-token tensor, shaped as the row kernels' ``(1, rows)``."""
    return x[r0:r1].view(1, r1 - r0, *x.shape[1:])


def host_scalars(device: torch.device) -> bool:
    """Whether the sweep may read scalars back to the host: free for CPU tensors; on a GPU it
    would stall the stream, so there the weighting runs on device scalars."""
    return device.type == "cpu"


# Without a host read, the reference ``L`` is fixed at the first sequence that closes when the
# options bound the spread of ``log f`` by this much (every ratio ``exp(log f - L)`` then stays
# well inside fp32, and inside fp16 for the native fp16 GEMM); otherwise it follows the running
# maximum with a device-side rescale of ``G`` per chunk.
_FIXED_SPAN = 8.0


@dataclass
class _Sums:
    """A weight-gradient accumulator and its bias twin, allocated on first write."""

    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    state: str = "empty"  # "empty", "open" (holds the rows of the open sequence, unit factor),
    # or "closed" (holds closed sequences, relative to the reference)


@dataclass
class _WeightedGrads:
    """``G = sum_b exp(log f_b - L) / (B n_b) * U_b^T H_b`` (and ``Gb``), formed chunk by chunk.

    Rows of a sequence are added to ``main`` once the sequence's factor is known, all rows of a
    chunk's closed sequences in one GEMM (the hidden rows scaled by their sequence's ``s``). The
    sequence still open at the end of a chunk accumulates at unit factor, in ``main`` while
    ``main`` holds nothing else (then ``L`` is set to its factor when it closes: no pass over
    ``G``), else in ``extra``, which is added to ``main`` with its factor when the sequence closes
    (one pass over a weight-sized buffer per sequence that spans chunks).

    ``L`` tracks the largest ``log f`` seen: with host scalars a rise is folded into the next
    GEMM's ``beta`` (free); without, it is fixed when ``SequenceWeights.span`` allows, else ``G`` is
    rescaled on the device per chunk.
    """

    side: LinearSide
    want_w: bool
    want_b: bool
    weights: SequenceWeights
    labels: torch.Tensor  # (N,)
    ignore_index: int
    main: _Sums = field(default_factory=_Sums)
    extra: _Sums = field(default_factory=_Sums)

    def __post_init__(self) -> None:
        seq_len = self.weights.seq_len
        n_rows = self.labels.shape[0]
        count = (self.labels.view(-1, seq_len) != self.ignore_index).sum(-1)
        # n_b, or T where the rows of a sequence are not averaged.
        self.count = (
            count.clamp(min=1) if self.weights.per_token_mean else torch.full_like(count, seq_len)
        )
        # Per-row scale applied to the hidden rows; the GEMM's alpha = 1 / N completes 1 / (B n_b).
        self.unit = (seq_len / self.count).float()
        self.alpha = 1.0 / n_rows
        self.log_f = torch.full(
            count.shape, -math.inf, dtype=torch.float64, device=self.labels.device
        )
        span = self.weights.span
        if host_scalars(self.labels.device):
            self.mode = "fold"
        else:
            self.mode = "fixed" if span is not None and span <= _FIXED_SPAN else "rescale"
        self.ref = None  # L: 0-dim float64

    def _new(self, sums: _Sums) -> None:
        vocab, width = self.side.weight.shape
        dev = self.labels.device
        if self.want_w and sums.weight is None:
            sums.weight = torch.empty((vocab, width), dtype=torch.float32, device=dev)
        if self.want_b and sums.bias is None:
            sums.bias = torch.empty((vocab,), dtype=torch.float32, device=dev)

    def _add(self, sums: _Sums, g_op, g32, r0: int, r1: int, s: torch.Tensor, beta: float) -> None:
        """``sums = beta * sums + (rows [r0, r1) weighted by s) / N``."""
        self._new(sums)
        gemm = self.side.gemm
        if sums.weight is not None:
            rows = gemm.operand(self.side.hidden[r0:r1].float() * s.unsqueeze(1))
            gemm.addmm_(sums.weight, g_op.T, rows, beta=beta, alpha=self.alpha)
        if sums.bias is not None:
            sums.bias.addmv_(g32.T, s, beta=beta, alpha=self.alpha)

    def _rescale(self, log_f: torch.Tensor) -> float:
        """Move ``L`` for the sequences closing now; the ``beta`` for ``main``'s next GEMM."""
        top = log_f.max()
        if self.main.state == "empty":
            # Nothing in ``main`` yet. -inf (no valid token so far) stays -inf, except where L is
            # fixed: 0 lies in every bounded range of log f.
            self.ref = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
            if self.mode != "fixed":
                self.ref = top
            return 0.0
        if self.mode == "fixed":
            return 1.0
        new = torch.maximum(self.ref, top)
        ratio = torch.where(new > self.ref, torch.exp(self.ref - new), torch.ones_like(new))
        self.ref = new
        if self.mode == "fold":
            return float(ratio)
        for x in (self.main.weight, self.main.bias):
            if x is not None:
                x.mul_(ratio.float())
        return 1.0

    def _ratio(self, log_f: torch.Tensor) -> torch.Tensor:
        """``exp(log f - L)``, 0 for sequences without a valid token (fp32)."""
        finite = torch.isfinite(log_f)
        return torch.where(finite, torch.exp(log_f - self.ref), torch.zeros_like(log_f)).float()

    def add_chunk(self, g_op, g32, r0: int, r1: int, stats: torch.Tensor) -> None:
        """Chunk ``[r0, r1)`` with unit-scale logits gradient ``g32`` (fp32, (rows, V)) and
        ``g_op`` (the same in the GEMM's dtype); ``stats`` is the sweep's ``(6, N)`` so far."""
        seq_len = self.weights.seq_len
        # Rows [r0, cut) belong to sequences that end in this chunk; [cut, r1) to the open one.
        cut = r1 if r1 % seq_len == 0 else max(r0, r1 // seq_len * seq_len)
        carried = r0 % seq_len != 0  # the sequence at r0 began in an earlier chunk
        if cut > r0:
            b0, b1 = r0 // seq_len, cut // seq_len
            rows = slice(b0 * seq_len, b1 * seq_len)
            log_f = self.weights.log_factor(
                stats[2, rows].view(-1, seq_len),
                stats[3, rows].view(-1, seq_len),
                self.labels[rows].view(-1, seq_len),
            )
            self.log_f[b0:b1] = log_f
            if carried and self.main.state == "open":
                # ``main`` holds this sequence's first rows at unit factor: its reference is f.
                self.ref = log_f[0]
                if self.mode == "fixed":
                    self.ref = torch.where(
                        torch.isfinite(self.ref), self.ref, torch.zeros_like(self.ref)
                    )
                self.main.state = "closed"
            beta = self._rescale(log_f)
            seq_of_row = torch.arange(r0, cut, device=log_f.device) // seq_len - b0
            s = self._ratio(log_f)[seq_of_row] * self.unit[b0:b1][seq_of_row]
            n = cut - r0
            self._add(self.main, g_op[:n], g32[:n], r0, cut, s, beta)
            self.main.state = "closed"
            if carried and self.extra.state == "open":
                ratio = self._ratio(log_f[:1])
                for acc, part in ((self.main.weight, self.extra.weight),
                                  (self.main.bias, self.extra.bias)):  # fmt: skip
                    if acc is not None:
                        acc.addcmul_(part, ratio)
                self.extra.state = "empty"
        if cut < r1:
            b = cut // seq_len
            s = self.unit[b : b + 1].expand(r1 - cut).contiguous()
            n = cut - r0
            if cut == r0 and carried:  # the chunk continues the open sequence
                target = self.main if self.main.state == "open" else self.extra
                beta = 1.0
            else:
                target = self.main if self.main.state == "empty" else self.extra
                target.state, beta = "open", 0.0
            self._add(target, g_op[n:], g32[n:], cut, r1, s, beta)

    def finish(self) -> ForwardGrads:
        assert self.main.state == "closed" and self.extra.state == "empty"
        self.extra = _Sums()
        rel = self.log_f - self.ref
        batch = self.count.shape[0]
        scale = torch.where(torch.isfinite(self.log_f), torch.exp(rel), torch.zeros_like(rel)) / (
            batch * self.count.to(torch.float64)
        )
        return ForwardGrads(None, self.main.weight, self.main.bias, torch.stack((scale, rel)))


def _over(plan: SweepPlan, logits_s: torch.Tensor) -> dict:
    """Write the chunk's logits gradient over its student logits (no third (rows, V) buffer)
    where the backend can; the logits are not needed once the row kernels have read them."""
    return {"out": logits_s} if plan.backend.bwd_in_place else {}


def _stats_sweep(
    student: LinearSide,
    teacher: LinearSide,
    labels: torch.Tensor,
    plan: SweepPlan,
    hidden: torch.Tensor | None,
    weighted: _WeightedGrads | None,
) -> torch.Tensor:
    """Forward sweep: a ``(6, N)`` fp32 tensor of ``lse_s, lse_t, ls_x, lt_x, d, C`` per token.

    With ``hidden`` / ``weighted`` it also forms the student's gradients from the logits in hand:
    ``u @ Ws`` per row at unit scale, and the weighted weight/bias sums.
    """
    n_rows = labels.shape[0]
    out = torch.zeros((6, n_rows), dtype=torch.float32, device=labels.device)
    bounds = plan.bounds(n_rows)
    longest = max(r1 - r0 for r0, r1 in bounds)
    buf_s, buf_t = student.buffer(longest), teacher.buffer(longest)
    need_grad = hidden is not None or weighted is not None
    fwd_grad = plan.backend.fwd_grad if need_grad else None
    for r0, r1 in bounds:
        logits_s = student.logits(r0, r1, buf_s).unsqueeze(0)
        logits_t = DenseTeacher(teacher.logits(r0, r1, buf_t).unsqueeze(0))
        lab = _chunk(labels, r0, r1)
        g = None
        if fwd_grad is not None:
            # The native CPU kernel forms the unit-scale gradient in the same sweeps as the stats.
            stats, g = fwd_grad(logits_s, logits_t, lab, plan.params)
        else:
            stats = plan.backend.fwd(
                logits_s, logits_t, lab, plan.params, with_divergence=True, store_c=need_grad
            )
        for i, x in enumerate(stats):
            if x is not None:
                out[i, r0:r1] = x.view(-1)
        if need_grad and g is None:
            ones = torch.ones_like(lab, dtype=torch.float32)
            g = plan.backend.bwd(
                logits_s, logits_t, lab, plan.params, stats, ones, None, **_over(plan, logits_s)
            )
        del logits_s, logits_t
        if g is None:
            continue
        g32 = g.view(r1 - r0, -1)
        g_op = student.gemm.operand(g32)
        if hidden is not None:
            student.gemm.mm(g_op, student.weight, out=hidden[r0:r1])
        if weighted is not None:
            weighted.add_chunk(g_op, g32, r0, r1, out)
        # Freed before the next chunk's gradient exists, so at most one chunk is alive.
        del g, g32, g_op
    return out


def forward_sweep(flat_s, w_s, b_s, flat_t, w_t, b_t, flat_labels, plan: SweepPlan):
    """The forward sweep over token chunks: stacked per-row stats ``(6, N)`` and the
    ``ForwardGrads`` it formed (None when no gradient is wanted).

    Matmul passes of (N x V x H) size: both sides' logits, plus ``u @ Ws`` when grad_hidden is
    wanted, plus the weighted ``u^T hs`` when grad_weight is: four at most, each once.
    """
    want_h, want_w, want_b = plan.want
    if not any(plan.want):
        with no_autocast(flat_s.device):
            student, teacher = sides(flat_s, w_s, b_s, flat_t, w_t, b_t)
            return _stats_sweep(student, teacher, flat_labels, plan, None, None), None
    hidden = None
    if want_h:
        hidden = torch.empty(flat_s.shape, dtype=torch.float32, device=flat_s.device)
    with no_autocast(flat_s.device):
        student, teacher = sides(flat_s, w_s, b_s, flat_t, w_t, b_t)
        weighted = None
        if want_w or want_b:
            assert plan.weights is not None, "the weight/bias gradient needs SequenceWeights"
            weighted = _WeightedGrads(
                student, want_w, want_b, plan.weights, flat_labels, plan.params.ignore_index
            )
        out = _stats_sweep(student, teacher, flat_labels, plan, hidden, weighted)
    grads = weighted.finish() if weighted is not None else ForwardGrads(None)
    grads.hidden = hidden
    return out, grads


def grad_sweep(flat_s, w_s, b_s, flat_t, w_t, b_t, labels, plan: SweepPlan, saved, grad_d,
               ranges, into: GradBuffers) -> GradBuffers:  # fmt: skip
    """Recompute the logits of the rows in ``ranges`` (chunked by ``plan.rows``) and add their
    weight and bias gradients at ``dL/dd = grad_d`` (N,) into ``into`` (fp32); ``saved`` is the
    forward's ``(lse_s, lse_t, C)``. Used only for rows whose weight the forward could not know
    (``batch_mean``'s cap)."""
    lse_s, lse_t, c = saved.unbind(0)
    with no_autocast(flat_s.device):
        student, teacher = sides(flat_s, w_s, b_s, flat_t, w_t, b_t)
        for start, stop in ranges:
            for r0 in range(start, stop, plan.rows):
                r1 = min(stop, r0 + plan.rows)
                logits_s = student.logits(r0, r1).unsqueeze(0)
                logits_t = DenseTeacher(teacher.logits(r0, r1).unsqueeze(0))
                stats = RowStats(_chunk(lse_s, r0, r1), _chunk(lse_t, r0, r1), None, None, None,
                                 _chunk(c, r0, r1))  # fmt: skip
                lab = _chunk(labels, r0, r1)
                g = plan.backend.bwd(
                    logits_s, logits_t, lab, plan.params, stats, _chunk(grad_d, r0, r1), None,
                    **_over(plan, logits_s),
                )  # fmt: skip
                del logits_s, logits_t
                into.accumulate(g.view(r1 - r0, -1), student, r0, r1)
                del g
    return into
