"""The row-kernel contract shared by every backend.

A row is one ``(b, t)`` position. A backend's forward reduces each row of the student logits and
the teacher input to a few fp32 numbers (``RowStats``); its backward writes the row's gradient
from per-row upstream scales. Everything after the row kernels (the ReNIO weights, the reduction,
autograd) needs only ``(d, ls[x], lt[x])`` per row, so the teacher side is a typed input: a new
kind of teacher is a new input type plus the kernels that read it, with no change above this
layer. (A top-k teacher, ``ops.sparse.SparseTeacher``, needs no kernel of its own: its k-sized
math is torch above the rows, and the rows' vocabulary sweep is ``with_divergence=False``.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .divergences import DIVERGENCES, Divergence, resolve_divergence

__all__ = [
    "DenseTeacher",
    "DivergenceParams",
    "RowBackend",
    "RowStats",
    "TEACHER_KINDS",
    "check_scales",
    "dense_logits",
]


@dataclass(frozen=True)
class DivergenceParams:
    """What a row kernel needs to know (validated upstream by ``ReNIOOptions``).

    ``divergence`` names an entry of ``divergences.DIVERGENCES``; None takes the one ``beta``
    selects.
    """

    divergence: str | None = None
    beta: float = 0.0
    temperature: float = 1.0
    token_clip: float | None = None
    ignore_index: int = -100

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "divergence", resolve_divergence(self.divergence, float(self.beta)).name
        )

    @property
    def spec(self) -> Divergence:
        return DIVERGENCES[self.divergence]

    @property
    def mode(self) -> int:
        """The divergence's compile-time id (``divergences.DIVERGENCES``)."""
        return self.spec.mode

    @property
    def clip_on(self) -> bool:
        return self.token_clip is not None and self.token_clip > 0

    @property
    def clip_value(self) -> float:
        return float(self.token_clip) if self.clip_on else 0.0

    @property
    def inv_tau(self) -> float:
        return 1.0 / float(self.temperature)


# A row's anchor is the largest of its first ANCHOR_COLUMNS logits / tau (0 when not finite). It is
# near the row's max, so max - anchor is exact (same sign, within a factor 2) and lse = log-sum-exp
# - anchor keeps the digits of log z: log-probabilities (x - anchor) - lse are (x - max) - log z in
# all but name, and a constant on the logits costs no digits (x - (max + log z) would round
# max + log z at the constant's scale). The backward recomputes it from the row, so only lse is
# stored. csrc/renio_cpu_rows.h (kAnchorColumns) uses the same number.
ANCHOR_COLUMNS = 64


class DenseTeacher(NamedTuple):
    """The teacher as full logits ``(B, T, Vt >= Vs)``; columns ``>= Vs`` are ignored."""

    logits: torch.Tensor

    kind = "dense"


def dense_logits(student: torch.Tensor, teacher_input: DenseTeacher, labels: torch.Tensor):
    """The teacher's logits, after the layout checks every dense row kernel relies on."""
    teacher = teacher_input.logits
    assert student.dim() == 3 and teacher.dim() == 3 and labels.dim() == 2
    assert teacher.shape[:2] == student.shape[:2] and teacher.shape[2] >= student.shape[2]
    assert student.stride(-1) == 1 and teacher.stride(-1) == 1
    assert student.device == teacher.device == labels.device
    return teacher


def check_scales(stats: RowStats, grad_d, grad_ls_x) -> None:
    """A backward needs at least one upstream scale, and ``C`` for the divergence's."""
    assert grad_d is not None or grad_ls_x is not None
    assert grad_d is None or stats.c is not None, "forward ran without store_c"


# Every teacher input type, by its ``kind`` (the custom ops carry the kind and the tensors).
TEACHER_KINDS: dict[str, type] = {DenseTeacher.kind: DenseTeacher}


class RowStats(NamedTuple):
    """Per-row forward results, each ``(B, T)`` float32, 0 at ignored positions.

    ``lse_s``/``lse_t``: log-sum-exp of ``logits / tau`` (student; teacher's first Vs columns)
    minus the row's anchor (``ANCHOR_COLUMNS``). Every backend forms log-probabilities as
    ``(logit / tau - anchor) - lse``, recomputing the anchor from the row.
    ``ls_x``/``lt_x``: log-probabilities of the sampled token. ``d``: divergence
    ``sum_v clamp(e_v)``. ``c``: ``C = sum_v c_v`` for the backward pass (None when not needed).
    """

    lse_s: torch.Tensor
    lse_t: torch.Tensor
    ls_x: torch.Tensor
    lt_x: torch.Tensor
    d: torch.Tensor
    c: torch.Tensor | None


@dataclass(frozen=True)
class RowBackend:
    """One backend's row kernels for one teacher kind.

    ``fwd(student, teacher, labels, params, *, with_divergence, store_c) -> RowStats`` and
    ``bwd(student, teacher, labels, params, stats, grad_d, grad_ls_x) -> grad`` are required.
    ``fwd_grad`` / ``scale_grad`` (optional) form the unit-scale gradient through ``d`` in the
    forward and scale it in place in the backward. ``divergences`` lists the names it computes.
    ``bwd_in_place``: ``bwd`` takes ``out=student`` and writes the gradient over the logits it
    reads (the fused-linear sweeps use it for the chunk's logits buffer). ``top_k(logits, vocab,
    k) -> (B, T, k) ids`` (optional): the backend's own teacher top-k selection, under the rule of
    ``ops.sparse.select_top_k`` (which runs it, or ``torch.topk`` without one).
    """

    name: str
    fwd: Callable
    bwd: Callable
    divergences: frozenset[str] = field(default_factory=lambda: frozenset(DIVERGENCES))
    fwd_grad: Callable | None = None
    scale_grad: Callable | None = None
    bwd_in_place: bool = False
    top_k: Callable | None = None
