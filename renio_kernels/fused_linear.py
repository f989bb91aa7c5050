"""Fused-linear ReNIO loss: hidden states and lm_head weights in, never the (tokens x vocab) logits.

``fused_linear_renio_loss(hs, Ws, ht, Wt, labels)`` equals ``renio_loss(hs @ Ws.T + bs,
ht @ Wt.T + bt, labels)`` with the logits formed in fp32 (never rounded to bf16 before the
softmax), but only one chunk of tokens' logits exists at a time.

Design. The flattened ``N = B * T`` tokens are taken in chunks of rows (``ops.linear``; the
size comes from ``(V, Hs, Ht)`` and the device, or ``chunk_size=``). Per chunk, the student and
teacher logits are formed in fp32 and fed to the resolved backend's row kernels (Triton on CUDA,
the native kernel on CPU, whose forward also forms the chunk's gradient in the same sweeps) as a
``(1, rows, V)`` batch. The forward keeps per-token
``lse_s, lse_t, C`` and returns ``d, ls[x], lt[x]`` like the row losses (``core.autograd``);
``core.reduction.reduce_renio`` turns them into the loss, so the ReNIO weights are exactly those of
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
weights are upcast once per sweep (see ``ops.linear``).

GPU: the Triton row kernels run per chunk on the logits the GEMM left in global memory. A
blockwise matmul kernel that keeps the log-sum-exp on chip would avoid that round trip; it is not
implemented, and no GPU was available to measure whether it would be faster.
"""

from __future__ import annotations

import torch

from .core.autograd import FusedLinearFunction
from .core.custom_ops import check_labels_async, fused_linear_op
from .core.options import call_options, kernel_params, with_options
from .core.reduction import reduce_renio
from .core.validation import (
    check_backend,
    check_chunk_size,
    check_ema_state,
    check_fused_linear_inputs,
    check_labels_in_range,
)
from .ops.linear import SweepPlan

__all__ = ["fused_linear_renio_loss"]


def _wanted(tensors) -> tuple[bool, ...]:
    """Which of the student's tensors get a gradient (none under ``torch.no_grad()``)."""
    grad_on = torch.is_grad_enabled()
    return tuple(grad_on and x is not None and x.requires_grad for x in tensors)


@with_options
def fused_linear_renio_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    backend: str = "auto",
    return_stats: bool = False,
    ema_state: torch.Tensor | None = None,
    check_labels: bool = True,
    chunk_size: int | None = None,
    **options,
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
        {options}
        chunk_size: tokens per chunk (default: from the vocabulary, hidden sizes and device, see
            ``config.FUSED_LINEAR_CHUNK_ELEMENTS``). Peak memory grows with it; the result does
            not depend on it beyond fp32 rounding.
        backend, return_stats, ema_state, check_labels: as in :func:`renio_kernels.renio_loss`,
            with the same return value.

    Gradients reach ``student_hidden``, ``student_weight`` and ``student_bias``, each only if it
    requires grad (nothing is computed for the others, nor under ``torch.no_grad()``). The
    weight and bias gradients are accumulated in fp32 and returned in their own dtype. Mixed
    dtypes are fine (e.g. bf16 hidden states from autocast and an fp32 weight): the logits are
    always fp32, and autocast is switched off inside.
    """
    opts = call_options(**options)
    check_ema_state(opts, ema_state, "FusedLinearReNIOLoss")
    check_chunk_size(chunk_size)
    check_backend(backend)
    check_fused_linear_inputs(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
        b_s=student_bias, b_t=teacher_bias,
    )  # fmt: skip
    if check_labels:
        check = check_labels_async if torch.compiler.is_compiling() else check_labels_in_range
        check(labels, student_weight.shape[0], opts.ignore_index)
    student = (student_hidden, student_weight, student_bias)
    want = _wanted(student)
    teacher = tuple(
        None if x is None else x.detach() for x in (teacher_hidden, teacher_weight, teacher_bias)
    )
    # With every weight 1, dL/dd is known in the forward up to grad_output (autograd module).
    direct = not opts.use_renio and any(want)
    params = kernel_params(opts)
    if torch.compiler.is_compiling():
        d, ls_x, lt_x = fused_linear_op(
            student, teacher, labels, params, backend, chunk_size, want, direct
        )
    else:
        plan = SweepPlan.build(
            params, backend, student_hidden, student_weight, teacher_hidden, labels, chunk_size,
            want,
        )  # fmt: skip
        d, ls_x, lt_x = FusedLinearFunction.apply(*student, *teacher, labels, plan, direct)
    mask = labels != opts.ignore_index
    return reduce_renio(d, ls_x, lt_x, mask, opts, ema_state, return_stats)
