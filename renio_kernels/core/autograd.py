"""One autograd path per loss: the forward and backward formulas, and the eager Functions.

Each loss has one forward formula and one backward formula, written here once. The eager
``torch.autograd.Function`` calls them directly (no dispatcher in the way); under
``torch.compile`` the custom ops of ``custom_ops`` call the same two functions, so eager and
compiled runs take the same numerical path.

Row losses (``renio_loss``, ``sampled_reverse_kl_loss``): ``(student, teacher, labels) -> d,
ls[x], lt[x]``, each ``(B, T)`` fp32; ``d`` and ``ls[x]`` are differentiable in the student,
``lt[x]`` never. Losses are ordinary torch code on these, so the backward kernel receives
``dL/dd`` and ``dL/dls[x]`` per row and writes the logits' gradient in one sweep; a loss that does
not use one of the two costs no work for it. Backends with ``fwd_grad`` (the native CPU kernel)
form the gradient through ``d`` at unit scale in the forward, while each row is in cache
(``config.cpu_grad_in_forward``); the backward then only scales it by ``dL/dd`` (in place in
eager mode, where it is handed out once; into a new tensor under compile, the same products). A
second backward, or one that also carries ``dL/dls[x]``, recomputes from the saved logits.

Fused-linear loss (hidden states and lm_head weights in): see ``fused_linear`` for the schedule.
The forward (``ops.linear.forward_sweep``) forms ``u @ Ws`` per row at unit scale and ``G =
sum_n s[n] u_n^T h_n`` with ``s`` proportional, within each sequence and across sequences, to
``dL/dd``: ``s = f_b / (B n_b)`` up to one batch-wide constant, ``f_b`` the sequence's ReNIO factor
(``reduction.sequence_log_factors``; 1 with ``use_renio=False``). The backward scales row ``n`` of
``u @ Ws`` by ``dL/dd[n]`` and ``G`` by ``k = <dL/dd, s> / <s, s>``, taken on one sequence that
no cap can bind (the smallest factor); sequences whose ``dL/dd`` is not ``k s`` (only
``batch_mean``'s cap, with more than 10 sequences) have their rows recomputed for the difference.
"""

from __future__ import annotations

import functools
import math

import torch

from ..ops.gemm import GradBuffers, flat_rows
from ..ops.linear import ForwardGrads, SequenceWeights, SweepPlan, forward_sweep, grad_sweep
from ..ops.rows import DivergenceParams, RowBackend, RowStats
from .reduction import cap_can_bind, factor_span, sequence_log_factors

__all__ = [
    "FusedLinearFunction",
    "no_double_backward",
    "RowStatsFunction",
    "linear_backward",
    "linear_forward",
    "linear_weights",
    "rows_backward",
    "rows_forward",
]


def no_double_backward() -> None:
    """The kernels' backward is not itself differentiable: a backward with ``create_graph=True``
    (a Hessian-vector product, a gradient penalty through the loss) would silently get a wrong
    second derivative, so it is refused."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "renio_kernels: double backward is not supported (the loss's gradient was requested "
            "with create_graph=True, e.g. for a Hessian-vector product or a gradient penalty); "
            "use renio_kernels.reference.renio_loss, which is plain differentiable PyTorch"
        )


def rows_forward(
    backend: RowBackend,
    student: torch.Tensor,
    teacher,
    labels: torch.Tensor,
    params: DivergenceParams,
    with_divergence: bool,
    need_grad: bool,
    unit_grad: bool,
) -> tuple[RowStats, torch.Tensor | None]:
    """Row statistics, and the unit-scale gradient through ``d`` when it is formed here."""
    if need_grad and with_divergence and unit_grad and backend.fwd_grad is not None:
        return backend.fwd_grad(student, teacher, labels, params)
    stats = backend.fwd(
        student,
        teacher,
        labels,
        params,
        with_divergence=with_divergence,
        store_c=need_grad and with_divergence,
    )
    return stats, None


def rows_backward(
    backend: RowBackend,
    params: DivergenceParams,
    student: torch.Tensor,
    teacher,
    labels: torch.Tensor,
    stats: RowStats,
    unit: torch.Tensor | None,
    grad_d: torch.Tensor | None,
    grad_ls_x: torch.Tensor | None,
    in_place: bool,
) -> torch.Tensor | None:
    """The student's gradient from the per-row upstream gradients (None when both are None).

    ``unit``: the forward's unit-scale gradient, scaled in place when ``in_place`` (the caller
    hands it out only once), else into a new tensor.
    """
    if grad_d is None and grad_ls_x is None:
        return None
    if unit is not None and grad_d is not None and grad_ls_x is None:
        target = unit if in_place else unit.clone()
        return backend.scale_grad(target, grad_d, labels, params.ignore_index)
    return backend.bwd(student, teacher, labels, params, stats, grad_d, grad_ls_x)


class RowStatsFunction(torch.autograd.Function):
    """Eager form of the row losses' autograd (the compiled form is ``renio::row_stats_fwd``)."""

    @staticmethod
    def forward(
        ctx, student, labels, teacher, params, backend, with_divergence, need_grad, unit_grad
    ):
        # ``teacher`` is the typed teacher input (detached tensors: it never gets a gradient).
        stats, ctx.unit = rows_forward(
            backend, student, teacher, labels, params, with_divergence, need_grad, unit_grad
        )
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(stats.lt_x)
        if not with_divergence:
            ctx.mark_non_differentiable(stats.d)
        ctx.params, ctx.backend, ctx.teacher = params, backend, teacher
        if need_grad:
            ctx.save_for_backward(student, labels, stats.lse_s, stats.lse_t, stats.c)
        return stats.d, stats.ls_x, stats.lt_x

    @staticmethod
    def backward(ctx, grad_d, grad_ls_x, _grad_lt_x):
        no_double_backward()
        unit, ctx.unit = ctx.unit, None  # handed out at most once
        nones = (None,) * 7
        if grad_d is None and grad_ls_x is None:
            return (None, *nones)
        student, labels, lse_s, lse_t, c = ctx.saved_tensors
        stats = RowStats(lse_s, lse_t, None, None, None, c)
        grad = rows_backward(
            ctx.backend, ctx.params, student, ctx.teacher, labels, stats, unit, grad_d, grad_ls_x,
            in_place=True,
        )  # fmt: skip
        return (grad, *nones)


def linear_weights(opts, labels: torch.Tensor, want) -> SequenceWeights | None:
    """What the forward sweep needs to weight each sequence (None when no weight or bias
    gradient is wanted). ``opts``: a ``ReNIOOptions``, with real Python values."""
    if not (want[1] or want[2]):
        return None
    batch, seq_len = labels.shape
    return SequenceWeights(
        seq_len,
        functools.partial(sequence_log_factors, opts=opts),
        factor_span(opts),
        cap_can_bind(opts, batch),
        per_token_mean=opts.reduction == "sequence_mean",
    )


def linear_forward(h_s, w_s, b_s, h_t, w_t, b_t, labels, plan: SweepPlan):
    """``(d, ls_x, lt_x)`` (B, T) fp32 and what the backward needs: ``(grads, saved)``.

    ``grads``: the ``ForwardGrads`` of the sweep (None when no gradient is wanted); ``saved``:
    ``(lse_s, lse_t, C)`` stacked (3, N) when the weight or bias gradient is wanted (for the
    recompute of capped sequences, or of everything in a second eager backward), else None.
    """
    flat_s, flat_t, flat_labels = flat_rows(h_s), flat_rows(h_t), labels.reshape(-1)
    out, grads = forward_sweep(flat_s, w_s, b_s, flat_t, w_t, b_t, flat_labels, plan)
    lse_s, lse_t, ls_x, lt_x, d, c = out.unbind(0)
    saved = torch.stack((lse_s, lse_t, c)) if plan.weights is not None else None
    rows = tuple(x.view(labels.shape) for x in (d, ls_x, lt_x))
    return rows, grads, saved


# A sequence's dL/dd counts as k * s when they agree to this relative difference: its weight is
# then not capped, or capped within fp32 rounding of it (float64 k_b: 2-3 fp32 ulps apart).
_CAP_RTOL = 1e-5
# The sequence k is taken from has a factor within exp(30) of the largest, so its scale is a
# normal fp32 number whatever the spread of the factors.
_REF_LOG_RANGE = 30.0


def _weight_scale(grad_d: torch.Tensor, mask: torch.Tensor, seq: torch.Tensor):
    """``k`` (0-dim float64) with ``dL/dd = k * s`` on uncapped sequences, and per sequence the
    mean ``dL/dd`` over its valid rows and ``k * s_b`` (B,) float64. No host read."""
    scale, rel = seq.unbind(0)
    count = mask.sum(-1).to(torch.float64)
    gd = torch.where(mask, grad_d.to(torch.float64), torch.zeros((), dtype=torch.float64))
    # Per sequence, <grad_d_b, s_b> / <s_b, s_b> with s_b constant over its valid rows.
    mean_gd = gd.sum(-1) / count.clamp(min=1)
    valid = (count > 0) & (scale > 0)
    k_b = mean_gd / torch.where(valid, scale, torch.ones_like(scale))
    # The smallest factor cannot be capped (its weight is at most 1).
    eligible = valid & (rel >= -_REF_LOG_RANGE)
    pick = torch.where(eligible, rel, torch.full_like(rel, math.inf)).argmin()
    k = torch.where(eligible.any(), k_b[pick], torch.zeros((), dtype=torch.float64))
    return k, mean_gd, k * scale


def linear_backward(inputs, shapes, plan: SweepPlan, grads: ForwardGrads, saved, grad_d,
                    in_place: bool = False):  # fmt: skip
    """``(grad_hidden, grad_weight, grad_bias)`` of the student (None where not wanted);
    ``shapes`` is ``(hidden shape, hidden dtype, weight dtype, bias dtype)``.

    ``in_place``: scale the forward's weight and bias sums in place and hand them out (the eager
    Function does, once; a weight-sized buffer less at the backward's peak). Without them (a second
    eager backward), both are recomputed from the inputs: both logits and the weight gradient.
    """
    h_s, w_s, b_s, h_t, w_t, b_t, labels = inputs
    h_shape, h_dtype, w_dtype, b_dtype = shapes
    want_h, want_w, want_b = plan.want
    grad_d = grad_d.reshape(labels.shape).float()
    g_h = g_w = g_b = None
    if want_h:
        g_h = grads.hidden * grad_d.reshape(-1, 1)
    if want_w or want_b:
        if (want_w and grads.weight is None) or (want_b and grads.bias is None):
            g_w, g_b = _recompute(inputs, plan, saved, grad_d, [(0, labels.numel())])
        else:
            g_w, g_b = _scaled_sums(inputs, plan, grads, saved, grad_d, in_place)
    return (
        None if g_h is None else g_h.to(h_dtype).view(h_shape),
        None if g_w is None else g_w.to(w_dtype),
        None if g_b is None else g_b.to(b_dtype),
    )


def _recompute(inputs, plan: SweepPlan, saved, grad_d, ranges, into=None):
    """The weight and bias gradients of the rows in ``ranges`` at ``dL/dd = grad_d`` (B, T),
    recomputed from the inputs (added into ``into = (g_w, g_b)`` when given)."""
    h_s, w_s, b_s, h_t, w_t, b_t, labels = inputs
    want_w, want_b = plan.want[1:]
    if into is None:
        into = tuple(
            torch.zeros(shape, dtype=torch.float32, device=w_s.device) if on else None
            for shape, on in ((w_s.shape, want_w), (w_s.shape[:1], want_b))
        )
    grad_sweep(
        flat_rows(h_s), w_s, b_s, flat_rows(h_t), w_t, b_t, labels.reshape(-1), plan, saved,
        grad_d.reshape(-1), ranges, GradBuffers(None, *into),
    )  # fmt: skip
    return into


def _scaled_sums(inputs, plan: SweepPlan, grads: ForwardGrads, saved, grad_d, in_place: bool):
    """``k G`` and ``k Gb``, corrected for capped sequences."""
    labels = inputs[-1]
    mask = labels != plan.params.ignore_index
    k, mean_gd, expected = _weight_scale(grad_d, mask, grads.seq)
    k32 = k.float()
    sums = (grads.weight, grads.bias)
    if in_place:
        g_w, g_b = (None if x is None else x.mul_(k32) for x in sums)
    else:
        g_w, g_b = (None if x is None else x * k32 for x in sums)
    if plan.weights.capped:
        # One host read, only for batch_mean with more than 10 sequences.
        off = (mean_gd - expected).abs() > _CAP_RTOL * mean_gd.abs()
        capped = off.nonzero().flatten().tolist()
        if capped:
            seq_len = labels.shape[1]
            rows = grad_d - expected.float().unsqueeze(1)
            ranges = [(b * seq_len, (b + 1) * seq_len) for b in capped]
            _recompute(inputs, plan, saved, rows, ranges, (g_w, g_b))
    return g_w, g_b


class FusedLinearFunction(torch.autograd.Function):
    """Eager form of the fused-linear autograd (the compiled form is ``renio::fused_linear_fwd``).

    Outputs ``d, ls[x], lt[x]``; only ``d`` is differentiable (the reduction uses ``ls[x]``
    detached, for the weights). ``plan.want`` says which student gradients to form; it must be
    False for everything under ``torch.no_grad()``.
    """

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, labels, plan: SweepPlan):
        rows, grads, saved = linear_forward(h_s, w_s, b_s, h_t, w_t, b_t, labels, plan)
        ctx.set_materialize_grads(False)
        ctx.plan, ctx.grads = plan, grads
        ctx.shapes = (h_s.shape, h_s.dtype, w_s.dtype, None if b_s is None else b_s.dtype)
        # The inputs are kept only where the backward may recompute rows (the weight or bias
        # gradient: capped sequences, a second backward).
        inputs = (h_s, w_s, b_s, h_t, w_t, b_t) if saved is not None else (None,) * 6
        ctx.save_for_backward(*inputs, labels, saved)
        ctx.mark_non_differentiable(rows[1], rows[2])
        return rows

    @staticmethod
    def backward(ctx, grad_d, _grad_ls_x, _grad_lt_x):
        no_double_backward()
        nones = (None,) * 5
        if grad_d is None or not any(ctx.plan.want):
            return (None, None, None, *nones)
        *inputs, saved = ctx.saved_tensors
        grads = linear_backward(
            inputs, ctx.shapes, ctx.plan, ctx.grads, saved, grad_d, in_place=True
        )
        # The weight and bias sums were handed out (scaled in place): a second backward
        # recomputes them.
        ctx.grads.weight = ctx.grads.bias = None
        return (*grads, *nones)
