"""The row kernels as ``torch.library`` custom ops, so ``torch.compile`` sees one opaque node.

``renio::row_stats_fwd`` runs a backend's forward row kernel and ``renio::row_stats_bwd`` its
backward; ``register_fake`` gives each a shape-only implementation for tracing, and
``register_autograd`` connects them. Dynamo therefore never looks inside the kernels (no graph
break on a Triton launch, a Python loop over chunks or a backend lookup) and Inductor treats them
as extern calls; the (B)-sized reduction around them in ``weights.py`` is ordinary torch code
that compiles with the rest of the user's graph.

The schema only carries plain types. Options travel as Python ``float``/``int``/``bool``/``str``
and are rebuilt into ``DivergenceParams`` inside the op, at run time, where they are real Python
numbers again: under ``torch.compile`` a float argument may be traced as a symbolic float backed
by a float64 tensor (Liger-Kernel #1362), and that never reaches a kernel this way. ``token_clip``
uses 0.0 for "off" (the same meaning as None). Outputs that a call does not need come back as
empty tensors (a custom op cannot return None): ``c`` when ``store_c`` is False, and the gradient
inputs of the backward op are optional tensors.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .backends import RowBackend, resolve_backend
from .ops.params import DivergenceParams, RowStats
from .weights import WEIGHT_NORMS

__all__ = [
    "check_labels_async",
    "row_stats_bwd",
    "row_stats_fwd",
    "row_stats_op",
    "traced_options",
]

_Stats = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _params(beta: float, temperature: float, token_clip: float, ignore_index: int):
    return DivergenceParams(
        beta=float(beta),
        temperature=float(temperature),
        token_clip=float(token_clip) if token_clip > 0 else None,
        ignore_index=int(ignore_index),
    )


def _backend(name: str, device: torch.device) -> RowBackend:
    return resolve_backend(name, device)


def _fresh(x: torch.Tensor, seen: set[int]) -> torch.Tensor:
    """Custom ops may not return outputs that share storage (the torch backend returns views of
    one buffer); copy the (B, T)-sized ones that do."""
    key = x.untyped_storage().data_ptr()
    if key in seen and x.numel() > 0:
        return x.clone()
    seen.add(key)
    return x


@torch.library.custom_op("renio::row_stats_fwd", mutates_args=())
def row_stats_fwd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    beta: float,
    temperature: float,
    token_clip: float,
    ignore_index: int,
    backend: str,
    with_divergence: bool,
    store_c: bool,
) -> _Stats:
    """``(lse_s, lse_t, ls_x, lt_x, d, c)``, each (B, T) fp32; ``c`` is empty without store_c."""
    params = _params(beta, temperature, token_clip, ignore_index)
    stats = _backend(backend, student.device).fwd(
        student, teacher, labels, params, with_divergence=with_divergence, store_c=store_c
    )
    c = stats.c if stats.c is not None else student.new_empty((0,), dtype=torch.float32)
    seen: set[int] = set()
    return tuple(_fresh(x, seen) for x in (*stats[:5], c))  # type: ignore[return-value]


@row_stats_fwd.register_fake
def _row_stats_fwd_fake(
    student, teacher, labels, beta, temperature, token_clip, ignore_index, backend,
    with_divergence, store_c,
):  # fmt: skip
    batch, seq, _ = student.shape
    rows = [student.new_empty((batch, seq), dtype=torch.float32) for _ in range(5)]
    c_shape = (batch, seq) if store_c and with_divergence else (0,)
    return (*rows, student.new_empty(c_shape, dtype=torch.float32))


@torch.library.custom_op("renio::row_stats_bwd", mutates_args=())
def row_stats_bwd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor,
    c: torch.Tensor,
    grad_d: torch.Tensor | None,
    grad_ls_x: torch.Tensor | None,
    beta: float,
    temperature: float,
    token_clip: float,
    ignore_index: int,
    backend: str,
) -> torch.Tensor:
    """The student's gradient (B, T, Vs) in its dtype, from the per-row upstream gradients."""
    params = _params(beta, temperature, token_clip, ignore_index)
    stats = RowStats(lse_s, lse_t, None, None, None, c if c.numel() > 0 else None)
    return _backend(backend, student.device).bwd(
        student, teacher, labels, params, stats, grad_d, grad_ls_x
    )


@row_stats_bwd.register_fake
def _row_stats_bwd_fake(
    student, teacher, labels, lse_s, lse_t, c, grad_d, grad_ls_x, beta, temperature, token_clip,
    ignore_index, backend,
):  # fmt: skip
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    student, teacher, labels, beta, temperature, token_clip, ignore_index, backend, with_div, _ = (
        inputs
    )
    lse_s, lse_t, _, lt_x, d, c = output
    # Unused outputs get None instead of zero tensors, so a loss that only uses d (ReNIO) or
    # only ls[x] (sampled reverse KL) costs the backward kernel no work for the other.
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(lse_s, lse_t, lt_x, c)
    if not with_div:
        ctx.mark_non_differentiable(d)
    ctx.options = (beta, temperature, token_clip, ignore_index, backend)
    ctx.with_divergence = with_div
    ctx.save_for_backward(student, teacher, labels, lse_s, lse_t, c)


def _backward(ctx, _g_lse_s, _g_lse_t, grad_ls_x, _g_lt_x, grad_d, _g_c):
    if not ctx.with_divergence:
        grad_d = None
    if grad_d is None and grad_ls_x is None:
        return (None,) * 10
    student, teacher, labels, lse_s, lse_t, c = ctx.saved_tensors
    if grad_d is not None and c.numel() == 0:
        raise RuntimeError(
            "renio::row_stats_fwd ran with store_c=False but the divergence needs a gradient; "
            "call it with store_c=True when the student requires grad"
        )
    grad = row_stats_bwd(student, teacher, labels, lse_s, lse_t, c, grad_d, grad_ls_x, *ctx.options)
    return (grad,) + (None,) * 9


row_stats_fwd.register_autograd(_backward, setup_context=_setup_context)


def row_stats_op(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    params: DivergenceParams,
    backend: str,
    with_divergence: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d, ls[x], lt[x])`` through the custom op; the same contract as ``RowStatsFunction``."""
    store_c = with_divergence and student.requires_grad and torch.is_grad_enabled()
    _, _, ls_x, lt_x, d, _ = row_stats_fwd(
        student,
        teacher,
        labels,
        params.beta,
        params.temperature,
        params.clip_value,
        params.ignore_index,
        backend,
        with_divergence,
        store_c,
    )
    return d, ls_x, lt_x


def check_labels_async(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """The label-range check without reading anything back to the host.

    ``torch._assert_async`` raises a RuntimeError when the check fails (on CUDA, at the next
    synchronizing call, as a device-side assert), so a compiled graph keeps no host sync and no
    graph break. The eager path raises the usual ValueError instead.
    """
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    torch._assert_async(
        torch.logical_not(bad.any()),
        "renio_kernels: labels outside [0, vocab) that are not ignore_index; mark padding/prompt "
        "positions with ignore_index",
    )


class TracedOptions(NamedTuple):
    """``ReNIOOptions``' fields, for a trace where some of them are symbolic."""

    beta: float = 0.0
    temperature: float = 1.0
    token_clip: float | None = None
    use_renio: bool = True
    ratio_clip: float | None = 2.5
    threshold: float = 0.8
    weight_temperature: float = 1.0
    weight_norm: str = "batch_mean"
    ignore_index: int = -100


def traced_options(**kw) -> TracedOptions:
    """``ReNIOOptions``' range checks written as comparisons, which Dynamo turns into guards
    (``math.isnan`` on a symbolic float would break the graph); NaN fails every range check."""
    o = TracedOptions(**kw)
    if not 0.0 <= o.beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0: forward KL, 1: reverse KL), got {o.beta}")
    if not 0.0 < o.temperature < math.inf:
        raise ValueError(f"temperature must be finite and > 0, got {o.temperature}")
    if not 0.0 < o.weight_temperature < math.inf:
        raise ValueError(f"weight_temperature must be finite and > 0, got {o.weight_temperature}")
    if o.token_clip is not None and not o.token_clip >= 0:
        raise ValueError(f"token_clip must be None (off), 0 (off) or > 0, got {o.token_clip}")
    if not -math.inf <= o.threshold <= math.inf:
        raise ValueError(f"threshold must be a real number, got {o.threshold}")
    if o.ratio_clip is not None and not -math.inf <= o.ratio_clip <= math.inf:
        raise ValueError(f"ratio_clip must be a real number, got {o.ratio_clip}")
    if o.weight_norm not in WEIGHT_NORMS:
        raise ValueError(f"unknown weight_norm {o.weight_norm!r}; expected one of {WEIGHT_NORMS}")
    return o


# --- the fused-linear loss -------------------------------------------------------------------
#
# ``renio::fused_linear_fwd`` runs the fused-linear forward sweep (both sides' logits chunk by
# chunk, never stored) and ``renio::fused_linear_bwd`` the weight/bias gradient sweep; the hidden
# gradient ``unit_h * dL/dd`` is formed in the autograd formula from the forward's ``unit_h``, as
# ``fused_linear.FusedLinearRowStatsFunction`` does. Under compile the ``use_renio=False``
# one-sweep shortcut is not used (the same loss through these ops costs two more matmul passes).

_Linear = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _linear_plan(h_s, w_s, h_t, labels, beta, temperature, token_clip, ignore_index, backend,
                 chunk_size, want):  # fmt: skip
    from .fused_linear import SweepPlan  # noqa: PLC0415 (fused_linear imports this module)
    from .ops.linear_chunks import plan_chunk_rows  # noqa: PLC0415

    rows = plan_chunk_rows(
        labels.numel(), w_s.shape[0], h_s.shape[-1], h_t.shape[-1], h_s.device, chunk_size or None
    )
    params = _params(beta, temperature, token_clip, ignore_index)
    return SweepPlan(params, _backend(backend, h_s.device), rows, want)


@torch.library.custom_op("renio::fused_linear_fwd", mutates_args=())
def fused_linear_fwd(
    h_s: torch.Tensor,
    w_s: torch.Tensor,
    b_s: torch.Tensor | None,
    h_t: torch.Tensor,
    w_t: torch.Tensor,
    b_t: torch.Tensor | None,
    labels: torch.Tensor,
    beta: float,
    temperature: float,
    token_clip: float,
    ignore_index: int,
    backend: str,
    chunk_size: int,
    want_h: bool,
    want_w: bool,
    want_b: bool,
) -> _Linear:
    """``(d, ls_x, lt_x)`` (B, T) fp32, ``unit_h`` (B*T, Hs) fp32 (``u @ Ws`` per token, empty
    without want_h) and ``(lse_s, lse_t, C)`` stacked (3, B*T) (empty without want_w/want_b)."""
    from .fused_linear import _flat, forward_sweep  # noqa: PLC0415

    want = (want_h, want_w, want_b)
    plan = _linear_plan(h_s, w_s, h_t, labels, beta, temperature, token_clip, ignore_index,
                        backend, chunk_size, want)  # fmt: skip
    empty = h_s.new_empty((0,), dtype=torch.float32)
    out, unit = forward_sweep(_flat(h_s), w_s, b_s, _flat(h_t), w_t, b_t, labels.reshape(-1), plan)
    lse_s, lse_t, ls_x, lt_x, d, c = out.unbind(0)
    stats = torch.stack((lse_s, lse_t, c)) if want_w or want_b else empty
    rows = (x.reshape(labels.shape).clone() for x in (d, ls_x, lt_x))
    return (*rows, unit.hidden if want_h else empty.clone(), stats)


@fused_linear_fwd.register_fake
def _fused_linear_fwd_fake(h_s, w_s, b_s, h_t, w_t, b_t, labels, beta, temperature, token_clip,
                           ignore_index, backend, chunk_size, want_h, want_w, want_b):  # fmt: skip
    n = labels.numel()
    rows = [labels.new_empty(labels.shape, dtype=torch.float32) for _ in range(3)]
    unit = h_s.new_empty((n, h_s.shape[-1]) if want_h else (0,), dtype=torch.float32)
    stats = h_s.new_empty((3, n) if want_w or want_b else (0,), dtype=torch.float32)
    return (*rows, unit, stats)


@torch.library.custom_op("renio::fused_linear_bwd", mutates_args=())
def fused_linear_bwd(
    h_s: torch.Tensor,
    w_s: torch.Tensor,
    b_s: torch.Tensor | None,
    h_t: torch.Tensor,
    w_t: torch.Tensor,
    b_t: torch.Tensor | None,
    labels: torch.Tensor,
    stats: torch.Tensor,
    grad_d: torch.Tensor,
    beta: float,
    temperature: float,
    token_clip: float,
    ignore_index: int,
    backend: str,
    chunk_size: int,
    want_w: bool,
    want_b: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's weight and bias gradients (in their dtypes; empty when not wanted)."""
    from .fused_linear import _flat, _grad_sweep, _no_autocast, _sides  # noqa: PLC0415
    from .ops.linear_chunks import GradBuffers  # noqa: PLC0415

    want = (False, want_w, want_b)
    plan = _linear_plan(h_s, w_s, h_t, labels, beta, temperature, token_clip, ignore_index,
                        backend, chunk_size, want)  # fmt: skip
    flat_s, flat_t = _flat(h_s), _flat(h_t)
    grads = GradBuffers.allocate(flat_s, w_s, want)
    grad_d = grad_d.reshape(-1).float().contiguous()
    with _no_autocast(h_s.device):
        student, teacher = _sides(flat_s, w_s, b_s, flat_t, w_t, b_t)
        _grad_sweep(student, teacher, labels.reshape(-1), plan, stats, grad_d, grads)
    empty = w_s.new_empty((0,))
    grad_w = grads.weight.to(w_s.dtype) if want_w else empty
    grad_b = grads.bias.to(b_s.dtype) if want_b else empty.clone()
    return grad_w, grad_b


@fused_linear_bwd.register_fake
def _fused_linear_bwd_fake(h_s, w_s, b_s, h_t, w_t, b_t, labels, stats, grad_d, beta,
                           temperature, token_clip, ignore_index, backend, chunk_size, want_w,
                           want_b):  # fmt: skip
    grad_w = w_s.new_empty(w_s.shape if want_w else (0,))
    grad_b = w_s.new_empty((w_s.shape[0],) if want_b else (0,), dtype=b_s.dtype if want_b else None)
    return grad_w, grad_b


def _fused_linear_setup(ctx, inputs, output) -> None:
    h_s, w_s, b_s, h_t, w_t, b_t, labels, *options = inputs
    _, ls_x, lt_x, unit_h, stats = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(ls_x, lt_x, unit_h, stats)
    ctx.options = tuple(options[:6])  # beta ... chunk_size
    ctx.want = tuple(options[6:])
    ctx.hidden = (h_s.shape, h_s.dtype)
    ctx.save_for_backward(h_s, w_s, b_s, h_t, w_t, b_t, labels, unit_h, stats)


def _fused_linear_backward(ctx, grad_d, *_unused):
    want_h, want_w, want_b = ctx.want
    nones = (None,) * 13
    if grad_d is None:
        return (None, None, None, *nones)
    h_s, w_s, b_s, h_t, w_t, b_t, labels, unit_h, stats = ctx.saved_tensors
    shape, dtype = ctx.hidden
    grad_h = grad_w = grad_b = None
    if want_h:
        grad_h = unit_h.mul(grad_d.reshape(-1, 1).float()).to(dtype).view(shape)
    if want_w or want_b:
        gw, gb = fused_linear_bwd(
            h_s, w_s, b_s, h_t, w_t, b_t, labels, stats, grad_d, *ctx.options, want_w, want_b
        )
        grad_w = gw if want_w else None
        grad_b = gb if want_b else None
    return (grad_h, grad_w, grad_b, *nones)


fused_linear_fwd.register_autograd(_fused_linear_backward, setup_context=_fused_linear_setup)


def fused_linear_op(
    student: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    labels: torch.Tensor,
    params: DivergenceParams,
    backend: str,
    chunk_size: int | None,
    want: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d, ls[x], lt[x])`` of the fused-linear loss through the custom ops."""
    d, ls_x, lt_x, _, _ = fused_linear_fwd(
        *student,
        *teacher,
        labels,
        params.beta,
        params.temperature,
        params.clip_value,
        params.ignore_index,
        backend,
        chunk_size or 0,
        *want,
    )
    return d, ls_x, lt_x
