"""Fused-linear ReNIO loss: hidden states and lm_head weights in, never the (tokens x vocab) logits.

``fused_linear_renio_loss(hs, Ws, ht, Wt, labels)`` equals ``renio_loss(hs @ Ws.T + bs,
ht @ Wt.T + bt, labels)`` with the logits formed in fp32 (never rounded to bf16 before the
softmax), but only one chunk of tokens' logits exists at a time.

Design. The flattened ``N = B * T`` tokens are taken in chunks of rows (``ops.linear``; the
size comes from ``(V, Hs, Ht)`` and the device, or ``chunk_size=``). Per chunk, the student and
teacher logits are formed in fp32 and fed to the resolved backend's row kernels (Triton on CUDA,
the native kernel on CPU) as a ``(1, rows, V)`` batch, which return the row statistics and the
unit-scale logits gradient ``u_n = (c - ps C) / tau`` of each token (the native CPU kernel forms it
in the same sweeps as the statistics; the others with their backward kernel at scale 1). The
forward returns ``d, ls[x], lt[x]`` like the row losses; ``core.reduction.reduce_renio`` turns them
into the loss, so the ReNIO weights are exactly those of ``renio_loss``. The gradient scale is
``gd[b, t] = dL/dd = grad_output * w_b / (B * n_b)``, and the forward forms every gradient while
each chunk's logits are in hand:

* ``grad_hidden[n] = gd[n] * (u_n @ Ws)``: the forward keeps ``u @ Ws`` ((N, Hs) fp32); the
  backward scales its rows.
* ``grad_weight = sum_n gd[n] u_n^T hs_n`` (and ``grad_bias = sum_n gd[n] u_n``): for every
  ``weight_norm``, ``w_b`` is a factor ``f_b`` of sequence ``b``'s own rows (``e_b =
  exp(rbar_b / weight_temperature)``, ``clamp(e_b, 0.1, 10)`` for ``"clamp"``, 1 with
  ``use_renio=False``; ``reduction.sequence_factors``) times one batch-wide scalar (``1 /
  mean(f)``, ``1 / m`` for ``"ema"``, 1 for ``"none"``). So the forward accumulates ``G = sum_b
  f_b / (B n_b) U_b^T H_b`` in fp32, each sequence's rows once its last row is done: the automatic
  chunks end on sequence boundaries (whole sequences per chunk when they fit, else each sequence in
  pieces, whose rows wait at unit scale in ``G`` itself or, once ``G`` holds other sequences, in a
  second weight-sized fp32 buffer added to ``G`` when the sequence closes). ``G`` is kept relative
  to the largest factor, so factors beyond fp32's range are fine. The backward multiplies ``G`` by
  one scalar, ``k = <gd, s> / <s, s>`` on the sequence with the smallest factor (no host read).
* ``batch_mean`` caps ``w_b = min(e_b / mean(e), 10)``, which can bind only with more than 10
  sequences; there the backward compares ``gd`` with ``k s`` per sequence (one host read: free on
  CPU, one scalar sync on a GPU, only for ``batch_mean`` with ``B > 10``, or with
  ``weight_scope="global"``, where the micro-batch over all ranks may hold more than 10
  sequences) and recomputes the capped
  sequences' rows (logits and weight gradient) for the difference.

Each gradient is formed only for an input that requires grad, and none under ``torch.no_grad()``;
where it is formed in the forward, the work is spent even if no backward follows (as in every
fused-linear loss that does this).

Cost in (tokens x vocab x hidden) matmul passes, forward and backward together, against a floor
of four (student and teacher logits once, grad_hidden, grad_weight):

* hidden states and lm_head trained (the default), every ``weight_norm``, ``use_renio`` True or
  False: 4, the floor; plus, with ``batch_mean`` and ``B > 10``, 3 passes over the rows of the
  sequences whose weight the cap changed (none unless one sequence has over 10x the batch mean).
* frozen lm_head (e.g. LoRA on the student): 3 (both logits, grad_hidden). Frozen hidden states
  and a trained lm_head: 3 (both logits, grad_weight). No gradient: 2.
* Teacher rows ``>= Vs`` are never multiplied (SPEC ignores them), so a padded teacher
  vocabulary costs nothing; the teacher's pass costs ``Ht / Hs`` times the student's.

Memory (fp32 on CPU; ``benchmarks/results/fused_linear_memory.md`` has the measured figures):
the chunk buffers (``chunk_cap``
in ``ops.linear``, ``config.FUSED_LINEAR_TOTAL_PER_VOCAB``), the fp32 weight-gradient accumulator
``G`` (and the second one while a sequence spans chunks and ``G`` already holds others), the
``(N, Hs)`` fp32 ``u @ Ws`` and (B, T)-sized tensors. Hidden states that cannot be viewed as
``(B * T, H)`` (e.g. ``hidden[:, :-1]``, transposed views) are copied once into that layout. On
CPU, bf16/fp16 weights are upcast once per sweep, and the fp32 logits and ``u @ Ws`` matmuls run
through oneDNN (``config.FUSED_LINEAR_CPU_ONEDNN``; see ``ops.gemm``). Speed:
``docs/performance.md``.

GPU: the same schedule through the same Python sweep; the Triton row kernels run per chunk on the
logits the GEMM left in global memory, and the per-sequence weighting uses device scalars only
(no host sync, except the ``batch_mean`` cap check above). A blockwise matmul kernel that
keeps the log-sum-exp on chip would avoid the logits' round trip; it is not implemented, and no
GPU was available to measure whether it would be faster.
"""

from __future__ import annotations

import torch

from .core.autograd import FusedLinearFunction, linear_weights
from .core.custom_ops import check_labels_async, fused_linear_op
from .core.options import call_options, kernel_params, with_options
from .core.reduction import reduce_renio
from .core.sparse import check_sparse_teacher, sparse_linear_rows, uses_sparse_path
from .core.step import StepNormalizer
from .core.validation import (
    check_backend,
    check_chunk_size,
    check_ema_state,
    check_fused_linear_inputs,
    check_labels_in_range,
    check_normalizer,
)
from .ops.linear import SweepPlan
from .ops.sparse import SparseTeacher

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
    normalizer: StepNormalizer | None = None,
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
            Or a ``SparseTeacher`` (then ``teacher_weight`` and ``teacher_bias`` are None): the
            teacher's top-k ids and log-probs, e.g. from a teacher server (``docs/usage.md``).
        teacher_weight: ``(Vt, Ht)`` with ``Vt >= Vs``; rows ``>= Vs`` are ignored (and never
            multiplied). Never gets a gradient. None with a ``SparseTeacher``.
        labels: ``(B, T)`` int64 sampled tokens; ``ignore_index`` marks positions to skip.
        student_bias, teacher_bias: optional ``(Vs,)`` / ``(Vt,)`` lm_head biases.
        {options}
        chunk_size: tokens per chunk (default: from the vocabulary, hidden sizes and device, see
            ``config.FUSED_LINEAR_CHUNK_ELEMENTS``). Peak memory grows with it; the result does
            not depend on it beyond fp32 rounding.
        backend, return_stats, ema_state, normalizer, check_labels: as in
            :func:`renio_kernels.renio_loss`, with the same return value.

    Gradients reach ``student_hidden``, ``student_weight`` and ``student_bias``, each only if it
    requires grad (nothing is computed for the others, nor under ``torch.no_grad()``). The
    weight and bias gradients are accumulated in fp32 and returned in their own dtype. Mixed
    dtypes are fine (e.g. bf16 hidden states from autocast and an fp32 weight): the logits are
    always fp32, and autocast is switched off inside.
    """
    opts = call_options(**options)
    check_ema_state(opts, ema_state, "FusedLinearReNIOLoss")
    check_normalizer(opts, normalizer)
    check_chunk_size(chunk_size)
    check_backend(backend)
    sparse = isinstance(teacher_hidden, SparseTeacher)
    if sparse or opts.top_k is not None:
        if not sparse:  # the dense checks; top_k >= Vs is the full loss below
            check_fused_linear_inputs(
                student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                b_s=student_bias, b_t=teacher_bias,
            )  # fmt: skip
        if sparse or uses_sparse_path(teacher_hidden, opts.top_k, student_weight.shape[0]):
            d, ls_x, lt_x = _sparse_rows(
                (student_hidden, student_weight, student_bias),
                (teacher_hidden, teacher_weight, teacher_bias),
                labels, opts, backend, check_labels, chunk_size,
            )  # fmt: skip
            mask = labels != opts.ignore_index
            return reduce_renio(d, ls_x, lt_x, mask, opts, ema_state, return_stats, normalizer)
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
    params = kernel_params(opts)
    if torch.compiler.is_compiling():
        d, ls_x, lt_x = fused_linear_op(
            student, teacher, labels, params, backend, chunk_size, want, opts
        )
    else:
        plan = SweepPlan.build(
            params, backend, student_hidden, student_weight, teacher_hidden, labels, chunk_size,
            want, linear_weights(opts, labels, want),
        )  # fmt: skip
        d, ls_x, lt_x = FusedLinearFunction.apply(*student, *teacher, labels, plan)
    mask = labels != opts.ignore_index
    return reduce_renio(d, ls_x, lt_x, mask, opts, ema_state, return_stats, normalizer)


@torch.compiler.disable  # eager: value checks read back; see core.sparse
def _sparse_rows(student, teacher, labels, opts, backend, check_labels, chunk_size):
    """Validate, then ``(d, ls[x], lt[x])`` of a sparse teacher or ``top_k < Vs``."""
    h_s, w_s, b_s = student
    sparse = isinstance(teacher[0], SparseTeacher)
    if sparse:
        if teacher[1] is not None or teacher[2] is not None:
            raise ValueError(
                "with a SparseTeacher in place of teacher_hidden, pass teacher_weight=None and "
                "teacher_bias=None: the teacher's logits are not computed"
            )
        # The dense checks, with the student standing in for the teacher.
        check_fused_linear_inputs(h_s, w_s, h_s, w_s, labels, b_s=b_s)
        check_sparse_teacher(
            teacher[0], h_s.shape[:2], w_s.shape[0], labels, opts.ignore_index, opts.top_k
        )
        teacher = teacher[0]
    else:  # a dense teacher with top_k < Vs: its checks have run
        teacher = tuple(None if x is None else x.detach() for x in teacher)
    if check_labels:
        check_labels_in_range(labels, w_s.shape[0], opts.ignore_index)
    return sparse_linear_rows(
        student, teacher, labels, kernel_params(opts), backend, opts.top_k, chunk_size,
        _wanted(student),
    )  # fmt: skip
