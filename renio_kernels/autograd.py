"""The autograd layer: one ``torch.autograd.Function`` around a backend's row kernels.

It maps ``(student, teacher, labels)`` to three ``(B, T)`` fp32 tensors: the divergence ``d``,
the sampled-token student log-probability ``ls[x]`` (both differentiable in the student), and
the teacher's ``lt[x]`` (never differentiable). Losses are ordinary torch code on these, so the
backward kernel receives ``dL/dd`` and ``dL/dls[x]`` per row and writes the logits' gradient in
one sweep; a loss that does not use one of the two outputs costs no work for it.

Backends with ``fwd_grad`` (the native CPU kernel) form the gradient through ``d`` at unit
scale in the forward, while each row is in cache, when a backward can follow
(``config.CPU_GRAD_IN_FORWARD``); the first backward then only scales it by ``dL/dd`` in place
and hands it out. A second backward through the same graph (``retain_graph=True``), or one that
also carries ``dL/dls[x]``, recomputes from the saved logits as the other backends do.
"""

from __future__ import annotations

import torch

from . import config
from .backends import RowBackend
from .ops.params import DivergenceParams, RowStats

__all__ = ["RowStatsFunction"]


class RowStatsFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        student: torch.Tensor,
        teacher: torch.Tensor,
        labels: torch.Tensor,
        params: DivergenceParams,
        backend: RowBackend,
        with_divergence: bool,
        grad_enabled: bool,
    ):
        # needs_input_grad stays True under torch.no_grad(), where no backward can follow:
        # then C is not summed and nothing is saved.
        need_grad = ctx.needs_input_grad[0] and grad_enabled
        ctx.unit_grad = None
        if (
            need_grad
            and with_divergence
            and backend.fwd_grad is not None
            and config.CPU_GRAD_IN_FORWARD
        ):
            stats, ctx.unit_grad = backend.fwd_grad(student, teacher, labels, params)
        else:
            stats = backend.fwd(
                student,
                teacher,
                labels,
                params,
                with_divergence=with_divergence,
                store_c=need_grad and with_divergence,
            )
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(stats.lt_x)
        if not with_divergence:
            ctx.mark_non_differentiable(stats.d)
        ctx.params, ctx.backend = params, backend
        if need_grad:
            ctx.save_for_backward(student, teacher, labels, stats.lse_s, stats.lse_t, stats.c)
        return stats.d, stats.ls_x, stats.lt_x

    @staticmethod
    def backward(ctx, grad_d, grad_ls_x, _grad_lt_x):
        unit, ctx.unit_grad = ctx.unit_grad, None  # handed out at most once
        if grad_d is None and grad_ls_x is None:
            return None, None, None, None, None, None, None
        student, teacher, labels, lse_s, lse_t, c = ctx.saved_tensors
        if unit is not None and grad_d is not None and grad_ls_x is None:
            grad = ctx.backend.scale_grad(unit, grad_d, labels, ctx.params.ignore_index)
            return grad, None, None, None, None, None, None
        del unit
        stats = RowStats(lse_s, lse_t, None, None, None, c)
        grad = ctx.backend.bwd(student, teacher, labels, ctx.params, stats, grad_d, grad_ls_x)
        return grad, None, None, None, None, None, None
