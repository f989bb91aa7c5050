"""Top-k and sparse teachers: the teacher input type, the top-k selection and the k-column math.

A sparse row sees the teacher at ``k`` columns only (``ids``): the divergence is a sum over those
columns, so its math costs ``O(k)`` per row and is written once here, in fp32 torch, for every
backend. What still needs the whole vocabulary (the student's log-normalizer, hence ``ls[x]``; a
dense teacher's ``lt[x]``) is the vocabulary sweep every backend's row kernels already run with
``with_divergence=False``.

Two semantics (``docs/SPEC.md``, "Extensions"):

* ``"renormalized"`` (``top_k``, and a sparse teacher by default): both sides' log-probabilities
  are renormalized over the ``k`` columns, ``ls_k = log_softmax(z[ids] / tau)``, ``lt_k =
  log_softmax(teacher at ids)``; ``d = sum_k clip(e_v)``. The gradient in the logits is
  ``(c - ps_k C) / tau`` at the ``k`` columns and 0 elsewhere.
* ``"truncated"``: the full-vocabulary log-probabilities at the ``k`` columns, not renormalized,
  ``ls_k = z[ids] / tau - log Z``, ``lt_k`` as sent; ``d = max(0, sum_k clip(e_v))`` (a sum over a
  subset of a divergence's terms can be negative). Through ``log Z`` the gradient is dense:
  ``(scatter(c) - ps C) / tau`` with the full-vocabulary ``ps``, 0 on rows where the clamp at 0 is
  active (as ``torch.clamp``, which passes the gradient at exactly 0).

Top-k ties: the selection keys each column by (value, -column id), so among equal teacher logits
the lower column id is taken; ``select_top_k`` is the rule, run by ``torch.topk`` or by a
backend's own kernel under it (``RowBackend.top_k``: the Triton backend's streaming top-k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .rows import DivergenceParams
from .torch.chunked import elementwise_terms, log_probs, row_anchor, row_chunks

__all__ = [
    "SPARSE_MODES",
    "SparseTeacher",
    "SubsetRows",
    "dense_truncated_grad",
    "nan_rows",
    "select_top_k",
    "subset_rows",
    "subset_grad",
    "truncated_log_probs",
]

SPARSE_MODES = ("renormalized", "truncated")

# Elements per row chunk of the top-k selection (about 20 bytes of temporaries each). On a GPU a
# chunk is a handful of kernel launches, so chunks are larger there than the torch backend's
# (``config.TORCH_CHUNK_ELEMENTS``, sized for CPU caches): 16M elements, about 320 MiB.
_SELECT_CHUNK_ELEMENTS_CUDA = 1 << 24


@dataclass(frozen=True)
class SparseTeacher:
    """The teacher at ``k`` columns per position, e.g. from a teacher server.

    Pass it in place of the teacher logits (``renio_loss(student_logits, teacher, labels)``) or of
    the teacher's hidden states (``fused_linear_renio_loss(h, W, teacher, None, labels)``).

    Args:
        ids: ``(B, T, k)`` int64 (or int32) column ids in ``[0, Vs)``, distinct within a row
            (typically the teacher's top-k at the loss temperature, in any order).
        logprobs: ``(B, T, k)`` fp32/fp16/bf16: the teacher's log-probabilities at ``ids``,
            ``log_softmax(teacher_logits / temperature)`` over its vocabulary, at the loss's
            ``temperature``. ``"renormalized"`` only uses them up to a per-row constant (raw
            ``logits / temperature`` are fine); ``"truncated"`` needs the normalized values.
            ``-inf`` (no mass) is allowed; NaN and ``+inf`` are not.
        sampled_logprob: ``(B, T)`` float: the teacher's full-vocabulary log-probability of the
            sampled token ``labels[b, t]`` at the loss's temperature (``lt[x]`` of the ReNIO ratio;
            a token outside ``ids`` has one too, so it is sent separately).
        mode: ``"renormalized"`` (the ``top_k`` semantics over ``ids``) or ``"truncated"``
            (full-vocabulary log-probabilities on ``ids``, not renormalized, ``d`` clamped at 0;
            verl's ``*_topk`` losses). See ``docs/SPEC.md``.
        check: check the values at the loss's valid positions (ids in range and distinct, no NaN
            log-probabilities): one boolean read back from the device, a sync on CUDA. False
            skips it; bad ids then give a NaN loss, duplicate ids count twice.

    Rows at ignored positions (``labels == ignore_index``) are never read as values: padding
    there may hold anything.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    sampled_logprob: torch.Tensor
    mode: str = "renormalized"
    check: bool = True

    kind = "sparse"

    @property
    def k(self) -> int:
        return self.ids.shape[-1]


def select_top_k(
    logits: torch.Tensor,
    vocab: int,
    k: int,
    chunk_elements: int | None = None,
    exact_keys: bool | None = None,
    kernel=None,
) -> torch.Tensor:
    """``(B, T, k)`` int64 ids of the ``k`` largest of ``logits[..., :vocab]`` per row, largest
    first; among equal values the lower column id first (so the selection and its order never
    depend on the backend or on ``torch.topk``'s unspecified tie order). Selecting on the
    logits rather than ``logits / tau`` gives the same set (``tau > 0`` preserves the order)
    without fp32 rounding merging two values. ``-0.0`` and ``+0.0`` are equal. A row with a NaN
    among its selection is keyed by the NaN's sign bit (its loss is NaN anyway).

    Two implementations of that one rule, row chunk by row chunk (``exact_keys``; default: True
    on GPU): keyed, ``torch.topk`` on an int64 key ``ordered_bits(value) * 2**32 + (vocab - 1 -
    id)``, distinct per column, with no host sync (a radix select, one read of the logits); or,
    on CPU where a host read is free, ``torch.topk`` on the values (4x faster there), the k
    selected put in (value, id) order, and the rows where a value tied with the k-th one was
    left out (or a NaN came in) redone keyed.

    ``kernel``: a backend's own selection under the same rule (``RowBackend.top_k``: the Triton
    backend's streaming top-k, one read of the logits in tiles), used instead when given.
    """
    if kernel is not None:
        return kernel(logits, vocab, k)
    batch, seq = logits.shape[:2]
    out = torch.empty((batch, seq, k), dtype=torch.int64, device=logits.device)
    if exact_keys is None:
        exact_keys = logits.device.type != "cpu"
    if chunk_elements is None and logits.device.type == "cuda":
        chunk_elements = _SELECT_CHUNK_ELEMENTS_CUDA
    for bs, ts in row_chunks(batch, seq, vocab, chunk_elements):
        x = logits[bs, ts, :vocab]
        out[bs, ts] = _keyed_top_k(x, k) if exact_keys else _repaired_top_k(x, k)
    return out


def _keyed_top_k(x: torch.Tensor, k: int) -> torch.Tensor:
    vocab = x.shape[-1]
    low = vocab - 1 - torch.arange(vocab, device=x.device, dtype=torch.int64)
    bits = (x.float() + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 becomes +0.0
    # Negative floats order opposite to their bit patterns: flip the 31 magnitude bits.
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = bits.mul_(1 << 32).add_(low)
    top = torch.topk(key, k, dim=-1, sorted=True).values
    return (vocab - 1) - (top & 0xFFFFFFFF)


def _repaired_top_k(x: torch.Tensor, k: int) -> torch.Tensor:
    vals, ids = torch.topk(x, k, dim=-1, sorted=False)
    kth = vals.min(-1, keepdim=True).values
    redo = ((x == kth).sum(-1) != (vals == kth).sum(-1)) | torch.isnan(vals).any(-1)
    # (value desc, id asc): ids ascending, then a stable sort on the values.
    ids = ids.sort(-1).values
    order = torch.sort(x.gather(-1, ids), dim=-1, descending=True, stable=True).indices
    ids = ids.gather(-1, order)
    if bool(redo.any()):
        ids[redo] = _keyed_top_k(x[redo], k)
    return ids


@dataclass
class SubsetRows:
    """Per-row results of the k-column math (rows = any leading shape).

    ``d``: the divergence (0 at ignored rows); ``c``: ``de/dls`` at the ``k`` columns where the
    clip is inactive (0 on truncated rows whose clamp at 0 is active); ``ps``: the student's
    renormalized probabilities at the ``k`` columns (renormalized mode only, else None);
    ``c_sum``: ``C = sum_k c``. ``c``, ``ps`` and ``c_sum`` are None without a gradient.
    """

    d: torch.Tensor
    c: torch.Tensor | None
    ps: torch.Tensor | None
    c_sum: torch.Tensor | None


def truncated_log_probs(z_k: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor, inv_tau: float):
    """The student's full-vocabulary log-probabilities at the ``k`` gathered logits ``z_k``:
    ``(z / tau - anchor) - lse`` with the anchor of the row's ``logits`` and the sweep's ``lse``
    (``ops.rows.RowStats``), the same digits as the row kernels' ``ls``."""
    return (z_k.float() * inv_tau - row_anchor(logits, inv_tau)) - lse.unsqueeze(-1)


def subset_rows(
    ls_k: torch.Tensor,
    lt_k: torch.Tensor,
    valid: torch.Tensor,
    params: DivergenceParams,
    *,
    renormalize: bool,
    want_grad: bool,
) -> SubsetRows:
    """The divergence over the ``k`` columns (and what its gradient needs), fp32.

    ``ls_k`` / ``lt_k``: ``(..., k)`` student and teacher values: raw ``logits / tau`` (or any
    row offset of them) when ``renormalize``, which takes ``log_softmax`` over the ``k`` columns;
    else full-vocabulary log-probabilities (truncated mode, ``d`` clamped at 0).
    """
    ls_k, lt_k = ls_k.float(), lt_k.float()
    if renormalize:
        ls_k = torch.log_softmax(ls_k, dim=-1)
        lt_k = torch.log_softmax(lt_k, dim=-1)
    e, de, ps = elementwise_terms(ls_k, lt_k, params, want_grad)
    d = e.sum(-1)
    del e
    zero = torch.zeros((), device=d.device)
    if not renormalize:
        # As torch.clamp(min=0): the gradient passes where the sum is >= 0 (NaN: d stays NaN).
        active = d >= 0
        d = torch.where(d < 0, zero, d)
        if want_grad:
            de = torch.where(active.unsqueeze(-1), de, zero)
    d = torch.where(valid, d, zero)
    if not want_grad:
        return SubsetRows(d, None, None, None)
    de = torch.where(valid.unsqueeze(-1), de, zero)
    ps = torch.where(valid.unsqueeze(-1), ps, zero) if renormalize else None
    return SubsetRows(d, de, ps, de.sum(-1))


def nan_rows(d: torch.Tensor, valid: torch.Tensor, *lse: torch.Tensor) -> torch.Tensor:
    """``d``, NaN at valid rows whose full-vocabulary log-normalizer is NaN: a NaN logit outside
    the ``k`` columns must not vanish from the loss (the dense loss would be NaN there)."""
    bad = torch.zeros_like(valid)
    for x in lse:
        bad = bad | torch.isnan(x)
    return torch.where(bad & valid, float("nan"), d)


def subset_grad(rows: SubsetRows, scale: torch.Tensor) -> torch.Tensor:
    """The logits gradient at the ``k`` columns, ``(c - ps C) * scale`` (renormalized) or
    ``c * scale`` (truncated: the dense ``-ps C`` part is added by the caller), fp32;
    ``scale = dL/dd / tau`` per row, 0 at ignored rows."""
    g = rows.c
    if rows.ps is not None:
        g = g - rows.ps * rows.c_sum.unsqueeze(-1)
    return g * scale.unsqueeze(-1)


def dense_truncated_grad(
    student: torch.Tensor,
    ids: torch.Tensor,
    g_k: torch.Tensor,
    c_sum_scaled: torch.Tensor,
    lse: torch.Tensor,
    valid: torch.Tensor,
    inv_tau: float,
    out: torch.Tensor,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """Truncated mode's logits gradient ``scatter(g_k) - ps * C * scale`` into ``out`` (the
    student's shape and dtype), one row chunk of fp32 temporaries at a time."""
    batch, seq, vocab = student.shape
    zero = torch.zeros((), device=student.device)
    for bs, ts in row_chunks(batch, seq, vocab, chunk_elements):
        ps = log_probs(student[bs, ts], inv_tau, lse[bs, ts]).exp_()
        g = ps.mul_(-c_sum_scaled[bs, ts].unsqueeze(-1))
        g.scatter_add_(-1, ids[bs, ts], g_k[bs, ts])
        g = torch.where(valid[bs, ts].unsqueeze(-1), g, zero)
        out[bs, ts] = g.to(out.dtype)
    return out
