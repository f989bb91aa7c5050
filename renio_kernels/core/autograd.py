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
``direct`` is the case whose gradient scale is known in the forward up to one scalar
(``use_renio=False``: ``dL/dd = grad_output * mask / (B * n_b)``): the forward forms every
gradient at ``scale = mask / (B * n_b)`` and the backward multiplies by
``k = <dL/dd, scale> / <scale, scale>``, which is ``grad_output`` since ``d`` feeds only the
reduction.
"""

from __future__ import annotations

import torch

from ..ops.linear import SweepPlan, flat_rows, forward_sweep, grad_sweep
from ..ops.rows import DivergenceParams, RowBackend, RowStats

__all__ = [
    "FusedLinearFunction",
    "no_double_backward",
    "RowStatsFunction",
    "linear_backward",
    "linear_forward",
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


def _sequence_scale(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``mask / (B * n_b)`` per token, flat: ``dL/dd`` of the mean over sequences at w = 1."""
    mask = labels != ignore_index
    n = mask.sum(-1, keepdim=True).clamp(min=1).to(torch.float32)
    return (mask.to(torch.float32) / (labels.shape[0] * n)).reshape(-1)


def linear_forward(h_s, w_s, b_s, h_t, w_t, b_t, labels, plan: SweepPlan, direct: bool):
    """``(d, ls_x, lt_x)`` (B, T) fp32 and what the backward needs: ``(grads, saved, scale)``.

    ``grads``: the buffers the forward formed (``u @ Ws`` at unit scale, or every gradient at
    ``scale`` when ``direct``); ``saved``: ``(lse_s, lse_t, C)`` stacked (3, N) when the
    backward recomputes the weight/bias gradient, else None.
    """
    flat_s, flat_t, flat_labels = flat_rows(h_s), flat_rows(h_t), labels.reshape(-1)
    scale = _sequence_scale(labels, plan.params.ignore_index) if direct else None
    out, grads = forward_sweep(flat_s, w_s, b_s, flat_t, w_t, b_t, flat_labels, plan, scale)
    lse_s, lse_t, ls_x, lt_x, d, c = out.unbind(0)
    recompute = not direct and (plan.want[1] or plan.want[2])
    saved = torch.stack((lse_s, lse_t, c)) if recompute else None
    rows = tuple(x.view(labels.shape) for x in (d, ls_x, lt_x))
    return rows, grads, saved, scale


def linear_backward(inputs, shapes, plan: SweepPlan, direct: bool, grads, saved, scale, grad_d):
    """``(grad_hidden, grad_weight, grad_bias)`` of the student (None where not wanted);
    ``shapes`` is ``(hidden shape, hidden dtype, weight dtype, bias dtype)``."""
    h_s, w_s, b_s, h_t, w_t, b_t, labels = inputs
    h_shape, h_dtype, w_dtype, b_dtype = shapes
    want_h, want_w, want_b = plan.want
    grad_d = grad_d.reshape(-1).float()
    g_h = g_w = g_b = None
    if direct:
        k = (grad_d * scale).sum() / (scale * scale).sum().clamp(
            min=torch.finfo(torch.float32).tiny
        )
        g_h = None if grads.hidden is None else grads.hidden * k
        g_w = None if grads.weight is None else grads.weight * k
        g_b = None if grads.bias is None else grads.bias * k
    else:
        if want_h:
            g_h = grads.hidden * grad_d.unsqueeze(-1)
        if want_w or want_b:
            flat_s, flat_t = flat_rows(h_s), flat_rows(h_t)
            swept = grad_sweep(
                flat_s, w_s, b_s, flat_t, w_t, b_t, labels.reshape(-1), plan, saved, grad_d
            )
            g_w, g_b = swept.weight, swept.bias
    return (
        None if g_h is None else g_h.to(h_dtype).view(h_shape),
        None if g_w is None else g_w.to(w_dtype),
        None if g_b is None else g_b.to(b_dtype),
    )


class FusedLinearFunction(torch.autograd.Function):
    """Eager form of the fused-linear autograd (the compiled form is ``renio::fused_linear_fwd``).

    Outputs ``d, ls[x], lt[x]``; only ``d`` is differentiable (the reduction uses ``ls[x]``
    detached, for the weights). ``plan.want`` says which student gradients to form; it must be
    False for everything under ``torch.no_grad()``.
    """

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, labels, plan: SweepPlan, direct: bool):
        rows, grads, saved, scale = linear_forward(
            h_s, w_s, b_s, h_t, w_t, b_t, labels, plan, direct
        )
        ctx.set_materialize_grads(False)
        ctx.plan, ctx.direct, ctx.grads = plan, direct, grads
        ctx.shapes = (h_s.shape, h_s.dtype, w_s.dtype, None if b_s is None else b_s.dtype)
        # The inputs are kept only for the weight-gradient recompute (the teacher's hidden
        # states would otherwise be freed after the forward).
        inputs = (h_s, w_s, b_s, h_t, w_t, b_t, labels) if saved is not None else (None,) * 7
        ctx.save_for_backward(*inputs, saved, scale)
        ctx.mark_non_differentiable(rows[1], rows[2])
        return rows

    @staticmethod
    def backward(ctx, grad_d, _grad_ls_x, _grad_lt_x):
        no_double_backward()
        nones = (None,) * 6
        if grad_d is None or not any(ctx.plan.want):
            return (None, None, None, *nones)
        *inputs, saved, scale = ctx.saved_tensors
        grads = linear_backward(
            inputs, ctx.shapes, ctx.plan, ctx.direct, ctx.grads, saved, scale, grad_d
        )
        return (*grads, *nones)
