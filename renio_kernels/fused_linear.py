"""Fused-linear ReNIO loss: hidden states and lm_head weights in, never the (tokens x vocab) logits.

``fused_linear_renio_loss(hs, Ws, ht, Wt, labels)`` equals ``renio_loss(hs @ Ws.T + bs,
ht @ Wt.T + bt, labels)`` with the logits formed in fp32 (never rounded to bf16 before the
softmax), but only one chunk of tokens' logits exists at a time.

Design. The flattened ``N = B * T`` tokens are taken in chunks of rows (``ops.linear_chunks``; the
size comes from ``(V, Hs, Ht)`` and the device, or ``chunk_size=``). Per chunk, the student and
teacher logits are formed in fp32 and fed to the resolved backend's row kernels (Triton on CUDA,
the native kernel on CPU, whose forward also forms the chunk's gradient in the same sweeps) as a
``(1, rows, V)`` batch. The forward keeps per-token
``lse_s, lse_t, C`` and returns ``d, ls[x], lt[x]`` like ``RowStatsFunction``;
``weights.reduce_renio`` turns them into the loss, so the ReNIO weights are exactly those of
``renio_loss``. Those weights depend on every sequence of the batch, so the per-token gradient
scale ``gd = dL/dd`` is only known once the whole forward has run. Two consequences:

* ``grad_hidden`` is row-local and linear in ``gd``: ``grad_hidden[n] = gd[n] * (u_n @ Ws)`` with
  ``u_n = (c - ps C) / tau`` the unit-scale logits gradient of token ``n``. The forward forms
  ``u @ Ws`` from the logits it already has and keeps it ((N, Hs) fp32); the backward only scales
  the rows.
* ``grad_weight = sum_n gd[n] u_n^T hs_n`` and ``grad_bias`` mix rows with their scales, so the
  backward recomputes both sides' logits chunk by chunk, gets ``g = gd * u`` from the backend's
  ``bwd`` and accumulates ``g.T @ hs`` (fp32 accumulator, returned in the weight's dtype) and
  ``sum(g)``.

Each of these runs only for an input that requires grad, and none under ``torch.no_grad()``.

Cost in (tokens x vocab x hidden) matmul passes, against a floor of four (student and teacher
logits once, grad_hidden, grad_weight):

* ``use_renio=True`` (default), hidden states and lm_head trained: 6. Forward 3 (student and
  teacher logits, ``u @ Ws``); backward 3 (both logits again, grad_weight). The recompute is the
  price of not storing (N, V) logits while the gradient scale waits for the batch-wide weights.
* ``use_renio=True`` with a frozen lm_head (e.g. LoRA on the student): 3, all in the forward; the
  backward does no matmul. With frozen hidden states and a trained lm_head: 5.
* ``use_renio=False`` with a gradient to compute: 4, the floor. The weights are all 1, so
  ``gd[b, t] = grad_output * mask / (B * n_b)`` is known up to the scalar ``grad_output`` in
  the forward: the forward sweep forms every gradient at once and the backward only scales them
  (held from forward to backward: a weight-sized and a (B, T, H)-sized fp32 buffer).
* In both forward-gradient cases the work is spent even if no backward follows, as in every
  fused-linear loss that does this.
* Teacher rows ``>= Vs`` are never multiplied (SPEC ignores them), so a padded teacher
  vocabulary costs nothing; the teacher's passes cost ``Ht / Hs`` times the student's.

Memory (fp32 on CPU; ``benchmarks/results/fused_linear_memory.md`` has the measured figures):
the chunk buffers (``FUSED_LINEAR_CHUNK_ELEMENTS``), the fp32 weight-gradient accumulator, and
(B, T)- and (B, T, H)-sized tensors. Hidden states that cannot be viewed as ``(B * T, H)``
(e.g. ``hidden[:, :-1]``, transposed views) are copied once into that layout. On CPU, bf16/fp16
weights are upcast once per sweep (see ``ops.linear_chunks``).

GPU: the Triton row kernels run per chunk on the logits the GEMM left in global memory. A
blockwise matmul kernel that keeps the log-sum-exp on chip would avoid that round trip; it is not
implemented, and no GPU was available to measure whether it would be faster.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ._validation import (
    check_ema_state,
    check_float,
    check_labels_in_range,
    check_labels_tensor,
    check_same_device,
)
from .backends import RowBackend, resolve_backend
from .custom_ops import check_labels_async, fused_linear_op
from .loss import call_options, params_from_options
from .ops.linear_chunks import GradBuffers, LinearSide, chunk_bounds, plan_chunk_rows
from .ops.params import DivergenceParams, RowStats
from .weights import reduce_renio

__all__ = ["fused_linear_renio_loss", "FusedLinearRowStatsFunction", "FusedLinearDirectFunction"]


@dataclass(frozen=True)
class SweepPlan:
    """What every sweep of one call needs besides the tensors."""

    params: DivergenceParams
    backend: RowBackend
    rows: int  # tokens per chunk
    want: tuple[bool, bool, bool]  # gradients wanted: student hidden, weight, bias


def _no_autocast(device: torch.device):
    # Under autocast the chunk matmuls would run in bf16 and round the logits (Liger #305/#1432).
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _flat(hidden: torch.Tensor) -> torch.Tensor:
    """``(B * T, H)`` rows: a view when the layout allows, else one copy."""
    return hidden.reshape(-1, hidden.shape[-1])


def _sides(h_s, w_s, b_s, h_t, w_t, b_t) -> tuple[LinearSide, LinearSide]:
    vocab = w_s.shape[0]
    # The teacher's columns >= Vs are ignored by the loss, so they are never computed.
    teacher = LinearSide.build(h_t, w_t[:vocab], None if b_t is None else b_t[:vocab])
    return LinearSide.build(h_s, w_s, b_s), teacher


def _chunk(x: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows ``[r0, r1)`` of a flat per-token tensor, shaped as the row kernels' ``(1, rows)``."""
    return x[r0:r1].view(1, r1 - r0, *x.shape[1:])


def _stats_sweep(
    student: LinearSide,
    teacher: LinearSide,
    labels: torch.Tensor,
    plan: SweepPlan,
    store_c: bool,
    grad_scale: torch.Tensor | None = None,
    grads: GradBuffers | None = None,
    unit_scale: bool = False,
) -> torch.Tensor:
    """Forward sweep: a ``(6, N)`` fp32 tensor of ``lse_s, lse_t, ls_x, lt_x, d, C`` per token.

    With ``grad_scale`` (``dL/dd`` per token, or ones for the unit-scale ``u @ Ws``, flagged by
    ``unit_scale``) it also accumulates the student's gradients into ``grads`` from the logits
    already in hand.
    """
    n_rows = labels.shape[0]
    out = torch.zeros((6, n_rows), dtype=torch.float32, device=labels.device)
    for r0, r1 in chunk_bounds(n_rows, plan.rows):
        logits_s = student.logits(r0, r1)
        logits_t = teacher.logits(r0, r1)
        lab = _chunk(labels, r0, r1)
        g = None
        if grad_scale is not None and plan.backend.fwd_grad is not None:
            # The native CPU kernel forms the unit-scale gradient in the same sweeps as the stats.
            stats, g = plan.backend.fwd_grad(
                logits_s.unsqueeze(0), logits_t.unsqueeze(0), lab, plan.params
            )
            if not unit_scale:
                plan.backend.scale_grad(
                    g, _chunk(grad_scale, r0, r1), lab, plan.params.ignore_index
                )
        else:
            stats = plan.backend.fwd(
                logits_s.unsqueeze(0),
                logits_t.unsqueeze(0),
                lab,
                plan.params,
                with_divergence=True,
                store_c=store_c,
            )
        for i, x in enumerate(stats):
            if x is not None:
                out[i, r0:r1] = x.view(-1)
        if grad_scale is not None:
            if g is None:
                g = plan.backend.bwd(
                    logits_s.unsqueeze(0),
                    logits_t.unsqueeze(0),
                    lab,
                    plan.params,
                    stats,
                    _chunk(grad_scale, r0, r1),
                    None,
                )
            del logits_s, logits_t
            grads.accumulate(g.view(r1 - r0, -1), student, r0, r1)
            del g
        else:
            # Freed before the next chunk's logits exist, so at most one chunk is alive.
            del logits_s, logits_t
    return out


def _grad_sweep(
    student: LinearSide,
    teacher: LinearSide,
    labels: torch.Tensor,
    plan: SweepPlan,
    saved: torch.Tensor,
    grad_d: torch.Tensor,
    grads: GradBuffers,
) -> None:
    """Backward sweep: recompute the logits per chunk and accumulate the student's gradients."""
    lse_s, lse_t, c = saved.unbind(0)
    for r0, r1 in chunk_bounds(labels.shape[0], plan.rows):
        logits_s = student.logits(r0, r1).unsqueeze(0)
        logits_t = teacher.logits(r0, r1).unsqueeze(0)
        stats = RowStats(
            _chunk(lse_s, r0, r1), _chunk(lse_t, r0, r1), None, None, None, _chunk(c, r0, r1)
        )
        g = plan.backend.bwd(
            logits_s,
            logits_t,
            _chunk(labels, r0, r1),
            plan.params,
            stats,
            _chunk(grad_d, r0, r1),
            None,
        )
        del logits_s, logits_t
        grads.accumulate(g.view(r1 - r0, -1), student, r0, r1)
        del g


def forward_sweep(flat_s, w_s, b_s, flat_t, w_t, b_t, flat_labels, plan: SweepPlan):
    """The forward sweep over token chunks: stacked per-row stats ``(6, N)`` and the buffers
    holding ``u @ Ws`` per token when ``plan.want`` asks for grad_hidden (scaled by ``dL/dd`` in
    the backward; see the module docstring). Shared by the autograd Function and the custom op.
    """
    want_h = plan.want[0]
    unit = GradBuffers(
        torch.empty(flat_s.shape, dtype=torch.float32, device=flat_s.device) if want_h else None,
        None,
        None,
    )
    with _no_autocast(flat_s.device):
        student, teacher = _sides(flat_s, w_s, b_s, flat_t, w_t, b_t)
        out = _stats_sweep(
            student,
            teacher,
            flat_labels,
            plan,
            store_c=any(plan.want),
            grad_scale=torch.ones_like(flat_labels, dtype=torch.float32) if want_h else None,
            grads=unit,
            unit_scale=True,
        )
    return out, unit


class FusedLinearRowStatsFunction(torch.autograd.Function):
    """``(hidden, weight, bias) x 2, labels -> d, ls[x], lt[x]`` (each (B, T) fp32), chunked.

    The outputs are those of ``RowStatsFunction`` on the materialized logits, but only ``d`` is
    differentiable (``reduce_renio`` uses ``ls[x]`` detached, for the weights). ``plan.want``
    says which student gradients to form; it must be False for everything under
    ``torch.no_grad()`` (where ``ctx.needs_input_grad`` still reports True).
    """

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, labels, plan: SweepPlan):
        batch_seq = labels.shape
        flat_s, flat_t, flat_labels = _flat(h_s), _flat(h_t), labels.reshape(-1)
        want_h, want_w, want_b = plan.want
        out, unit = forward_sweep(flat_s, w_s, b_s, flat_t, w_t, b_t, flat_labels, plan)
        lse_s, lse_t, ls_x, lt_x, d, c = out.unbind(0)
        ctx.set_materialize_grads(False)
        ctx.plan, ctx.hidden_shape, ctx.hidden_dtype = plan, h_s.shape, h_s.dtype
        if want_w or want_b:
            stats = torch.stack((lse_s, lse_t, c))
            tensors = (flat_s, w_s, b_s, flat_t, w_t, b_t, flat_labels, stats)
            ctx.save_for_backward(unit.hidden, *tensors)
        elif want_h:
            ctx.save_for_backward(unit.hidden)
        d, ls_x, lt_x = (x.view(batch_seq) for x in (d, ls_x, lt_x))
        ctx.mark_non_differentiable(ls_x, lt_x)
        return d, ls_x, lt_x

    @staticmethod
    def backward(ctx, grad_d, _grad_ls_x, _grad_lt_x):
        plan: SweepPlan = ctx.plan
        want_h, want_w, want_b = plan.want
        nones = (None,) * 5
        if grad_d is None or not any(plan.want):
            return (None, None, None, *nones)
        saved = ctx.saved_tensors
        unit_h = saved[0]
        n_rows = grad_d.numel()
        grad_d = grad_d.reshape(n_rows).float().contiguous()
        grad_h = grad_w = grad_b = None
        if want_h:
            grad_h = unit_h.mul(grad_d.unsqueeze(-1)).to(ctx.hidden_dtype).view(ctx.hidden_shape)
        if want_w or want_b:
            _, flat_s, w_s, b_s, flat_t, w_t, b_t, labels, stats = saved
            grads = GradBuffers.allocate(flat_s, w_s, (False, want_w, want_b))
            with _no_autocast(flat_s.device):
                student, teacher = _sides(flat_s, w_s, b_s, flat_t, w_t, b_t)
                _grad_sweep(student, teacher, labels, plan, stats, grad_d, grads)
            if want_w:
                grad_w = grads.weight.to(w_s.dtype)
            if want_b:
                grad_b = grads.bias.to(b_s.dtype)
        return (grad_h, grad_w, grad_b, *nones)


class FusedLinearDirectFunction(torch.autograd.Function):
    """``use_renio=False``: the loss and the student's gradients from one forward sweep.

    With every weight 1, ``dL/dd[b, t] = grad_output * mask[b, t] / (B * n_b)``: the forward forms
    the gradients for ``grad_output = 1`` and the backward scales them by the actual
    ``grad_output`` (into new tensors, so a second backward sees the same saved gradients).
    Outputs ``loss, d, ls[x], lt[x]``; only the loss is differentiable.
    """

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, labels, mask, plan: SweepPlan):
        batch_seq = labels.shape
        flat_s, flat_t, flat_labels = _flat(h_s), _flat(h_t), labels.reshape(-1)
        n = mask.sum(-1).clamp(min=1).to(torch.float32)
        scale = (mask.to(torch.float32) / (batch_seq[0] * n).unsqueeze(-1)).reshape(-1)
        # fp32 until scaled by grad_output in the backward: one rounding to the hidden dtype.
        grads = GradBuffers.allocate(flat_s, w_s, plan.want, hidden_dtype=torch.float32)
        with _no_autocast(h_s.device):
            student, teacher = _sides(flat_s, w_s, b_s, flat_t, w_t, b_t)
            out = _stats_sweep(
                student, teacher, flat_labels, plan, store_c=True, grad_scale=scale, grads=grads
            )
        del student, teacher
        _, _, ls_x, lt_x, d, _ = (x.view(batch_seq) for x in out.unbind(0))
        # The same ops as weights.reduce_renio with w = 1, so the value matches renio_loss's.
        loss = (d.sum(-1) / n).mean()
        ctx.set_materialize_grads(False)
        ctx.hidden_shape = h_s.shape
        ctx.dtypes = (h_s.dtype, w_s.dtype, None if b_s is None else b_s.dtype)
        ctx.save_for_backward(grads.hidden, grads.weight, grads.bias)
        ctx.mark_non_differentiable(d, ls_x, lt_x)
        return loss, d, ls_x, lt_x

    @staticmethod
    def backward(ctx, grad_loss, _grad_d, _grad_ls_x, _grad_lt_x):
        nones = (None,) * 6
        if grad_loss is None:
            return (None, None, None, *nones)
        g_h, g_w, g_b = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        grad_loss = grad_loss.to(torch.float32)
        return (
            None if g_h is None else g_h.mul(grad_loss).to(h_dtype).view(ctx.hidden_shape),
            None if g_w is None else g_w.mul(grad_loss).to(w_dtype),
            None if g_b is None else g_b.mul(grad_loss).to(b_dtype),
            *nones,
        )


def _is_dtensor(x: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor  # noqa: PLC0415
    except ImportError:  # torch built without distributed
        return False
    return isinstance(x, DTensor)


def _check_side(side: str, hidden, weight, bias, batch_seq: tuple[int, int] | None) -> None:
    names = (f"{side}_hidden", f"{side}_weight", f"{side}_bias")
    for name, x in zip(names, (hidden, weight, bias), strict=True):
        if x is None and name.endswith("bias"):
            continue
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        check_float(name, x)
        if _is_dtensor(x):
            # An FSDP2 / tensor-parallel shard would silently score a slice of the vocabulary.
            raise ValueError(
                f"{name} is a sharded DTensor ({type(x).__name__}); pass the full tensor "
                f"({name}.full_tensor(), or gather it under FSDP/ZeRO-3), or use "
                "renio_kernels.integrations.hf, which gathers the lm_head for you"
            )
    if hidden.dim() != 3:
        raise ValueError(
            f"{names[0]} must be (B, T, H), got shape {tuple(hidden.shape)}; for flat (N, H) "
            "hidden states use hidden.unsqueeze(0)"
        )
    if batch_seq is not None and tuple(hidden.shape[:2]) != batch_seq:
        raise ValueError(
            f"student_hidden (B, T) = {batch_seq} but {names[0]} (B, T) = "
            f"{tuple(hidden.shape[:2])}; both must score the same positions"
        )
    width = hidden.shape[2]
    if weight.dim() != 2 or weight.shape[1] != width:
        raise ValueError(
            f"{names[1]} must be (V, H) with H = {width} (the last dim of {names[0]}), got "
            f"shape {tuple(weight.shape)}; pass lm_head.weight as stored (vocab x hidden), "
            "not its transpose"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{names[1]} has an empty vocabulary dimension")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(
            f"{names[2]} must be (V,) with V = {weight.shape[0]} (rows of {names[1]}), got "
            f"shape {tuple(bias.shape)}"
        )


def check_fused_linear_inputs(h_s, w_s, h_t, w_t, labels, b_s=None, b_t=None) -> None:
    """Shapes, dtypes and devices of the fused-linear inputs; ValueError saying how to fix."""
    _check_side("student", h_s, w_s, b_s, None)
    batch, seq = h_s.shape[:2]
    _check_side("teacher", h_t, w_t, b_t, (batch, seq))
    if w_t.shape[0] < w_s.shape[0]:
        raise ValueError(
            f"teacher vocabulary ({w_t.shape[0]} rows of teacher_weight) is smaller than the "
            f"student's ({w_s.shape[0]}); a larger (padded) teacher vocabulary is allowed, a "
            "smaller one is not"
        )
    if batch * seq == 0:
        raise ValueError(f"empty batch: (B, T) = {(batch, seq)}")
    check_labels_tensor(labels, (batch, seq), "student_hidden")
    check_same_device(
        student_hidden=h_s,
        student_weight=w_s,
        student_bias=b_s,
        teacher_hidden=h_t,
        teacher_weight=w_t,
        teacher_bias=b_t,
        labels=labels,
    )


def fused_linear_renio_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    beta: float = 0.0,
    temperature: float = 1.0,
    token_clip: float | None = None,
    use_renio: bool = True,
    ratio_clip: float | None = 2.5,
    threshold: float = 0.8,
    weight_temperature: float = 1.0,
    weight_norm: str = "batch_mean",
    ignore_index: int = -100,
    backend: str = "auto",
    return_stats: bool = False,
    ema_state: torch.Tensor | None = None,
    check_labels: bool = True,
    chunk_size: int | None = None,
):
    """The ReNIO loss of ``hidden @ weight.T (+ bias)`` for each side, without the logits.

    Same result as ``renio_loss(student_hidden @ student_weight.T + student_bias,
    teacher_hidden @ teacher_weight.T + teacher_bias, labels, ...)`` with fp32 logits.

    Args:
        student_hidden: ``(B, T, Hs)`` fp32/fp16/bf16, the student's last hidden states at the
            completion positions (position ``t`` predicts ``labels[b, t]``; shift before calling).
            Any strided view is accepted (one ``(B, T, Hs)`` copy if it is not row-flattenable).
        student_weight: ``(Vs, Hs)``, e.g. ``lm_head.weight``.
        teacher_hidden: ``(B, T, Ht)``; ``Ht`` may differ from ``Hs``. Never gets a gradient.
        teacher_weight: ``(Vt, Ht)`` with ``Vt >= Vs``; rows ``>= Vs`` are ignored (and never
            multiplied). Never gets a gradient.
        labels: ``(B, T)`` int64 sampled tokens; ``ignore_index`` marks positions to skip.
        student_bias, teacher_bias: optional ``(Vs,)`` / ``(Vt,)`` lm_head biases.
        chunk_size: tokens per chunk (default: from the vocabulary, hidden sizes and device, see
            ``config.FUSED_LINEAR_CHUNK_ELEMENTS``). Peak memory grows with it; the result does
            not depend on it beyond fp32 rounding.
        Every other option is that of :func:`renio_kernels.renio_loss`, with the same meaning,
        defaults, ``"ema"`` state handling and return value.

    Gradients reach ``student_hidden``, ``student_weight`` and ``student_bias``, each only if it
    requires grad (nothing is computed for the others, nor under ``torch.no_grad()``). The
    weight and bias gradients are accumulated in fp32 and returned in their own dtype. Mixed
    dtypes are fine (e.g. bf16 hidden states from autocast and an fp32 weight): the logits are
    always fp32, and autocast is switched off inside.
    """
    opts = call_options(
        beta=beta,
        temperature=temperature,
        token_clip=token_clip,
        use_renio=use_renio,
        ratio_clip=ratio_clip,
        threshold=threshold,
        weight_temperature=weight_temperature,
        weight_norm=weight_norm,
        ignore_index=ignore_index,
    )
    check_ema_state(weight_norm, use_renio, ema_state, "FusedLinearReNIOLoss")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None (automatic) or an int >= 1, got {chunk_size!r}")
    s_args = (student_hidden, student_weight, teacher_hidden, teacher_weight, labels)
    check_fused_linear_inputs(*s_args, b_s=student_bias, b_t=teacher_bias)
    vocab = student_weight.shape[0]
    compiling = torch.compiler.is_compiling()
    if check_labels:
        check = check_labels_async if compiling else check_labels_in_range
        check(labels, vocab, ignore_index)
    device = student_hidden.device
    grad_on = torch.is_grad_enabled()
    want = tuple(
        grad_on and x is not None and x.requires_grad
        for x in (student_hidden, student_weight, student_bias)
    )
    if compiling:
        # torch.compile: the same sweeps as single custom-op nodes (see custom_ops.py).
        d, ls_x, lt_x = fused_linear_op(
            (student_hidden, student_weight, student_bias),
            tuple(
                None if x is None else x.detach()
                for x in (teacher_hidden, teacher_weight, teacher_bias)
            ),
            labels,
            params_from_options(opts),
            backend,
            chunk_size,
            want,
        )
        return reduce_renio(d, ls_x, lt_x, labels != ignore_index, opts, ema_state, return_stats)
    plan = SweepPlan(
        params=params_from_options(opts),
        backend=resolve_backend(backend, device),
        rows=plan_chunk_rows(
            labels.numel(),
            vocab,
            student_hidden.shape[-1],
            teacher_hidden.shape[-1],
            device,
            chunk_size,
        ),
        want=want,
    )
    teacher = tuple(
        None if x is None else x.detach() for x in (teacher_hidden, teacher_weight, teacher_bias)
    )
    student = (student_hidden, student_weight, student_bias)
    mask = labels != ignore_index
    if not use_renio and any(want):
        loss, d, ls_x, lt_x = FusedLinearDirectFunction.apply(
            *student, *teacher, labels, mask, plan
        )
        if not (return_stats or weight_norm == "ema"):
            return loss
        # For the stats and the ema state, which renio_loss advances even with use_renio=False.
        _, stats = reduce_renio(d, ls_x, lt_x, mask, opts, ema_state, return_stats=True)
        return (loss, stats) if return_stats else loss
    d, ls_x, lt_x = FusedLinearRowStatsFunction.apply(*student, *teacher, labels, plan)
    return reduce_renio(d, ls_x, lt_x, mask, opts, ema_state, return_stats)
