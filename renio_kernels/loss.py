"""Public functional API over logits: ``renio_loss`` and ``sampled_reverse_kl_loss``."""

from __future__ import annotations

import torch

from . import config
from .core.autograd import RowStatsFunction
from .core.custom_ops import check_labels_async, row_stats_op
from .core.options import call_options, kernel_params, with_options
from .core.reduction import reduce_renio, reduce_sampled_rkl
from .core.sparse import check_sparse_teacher, sparse_row_stats, uses_sparse_path
from .core.step import StepNormalizer
from .core.validation import (
    check_backend,
    check_ema_state,
    check_labels_in_range,
    check_logits_inputs,
    check_normalizer,
    is_dtensor,
    last_dim_contiguous,
)
from .ops.backends import resolve_backend
from .ops.rows import DenseTeacher, DivergenceParams
from .ops.sparse import SparseTeacher
from .vocab_parallel import dtensor_renio_loss

__all__ = ["renio_loss", "sampled_reverse_kl_loss", "row_stats"]


def row_stats(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    params: DivergenceParams,
    *,
    backend: str,
    with_divergence: bool,
    check_labels: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate, pick the backend, and run the row kernels: ``(d, ls[x], lt[x])``, each (B, T).

    Eager calls go straight to ``RowStatsFunction`` (no dispatcher overhead). Under
    ``torch.compile`` the same formulas run through the ``renio::row_stats_*`` custom ops, which
    Dynamo traces as single nodes, and the label check becomes an asynchronous device assert
    (``check_labels_async``) instead of a host sync that would break the graph.
    """
    check_logits_inputs(student_logits, teacher_logits, labels)
    check_backend(backend)
    student = last_dim_contiguous(student_logits)
    teacher = DenseTeacher(last_dim_contiguous(teacher_logits.detach()))
    unit_grad = config.cpu_grad_in_forward_enabled()
    vocab = student.shape[-1]
    if torch.compiler.is_compiling():
        if check_labels:
            check_labels_async(labels, vocab, params.ignore_index)
        return row_stats_op(student, teacher, labels, params, backend, with_divergence, unit_grad)
    if check_labels:
        check_labels_in_range(labels, vocab, params.ignore_index)
    kernels = resolve_backend(backend, student.device, params.divergence, teacher.kind)
    need_grad = student.requires_grad and torch.is_grad_enabled()
    return RowStatsFunction.apply(
        student, labels, teacher, params, kernels, with_divergence, need_grad, unit_grad
    )


@with_options
def renio_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    backend: str = "auto",
    return_stats: bool = False,
    ema_state: torch.Tensor | None = None,
    normalizer: StepNormalizer | None = None,
    check_labels: bool = True,
    **options,
):
    """The ReNIO on-policy distillation loss (``docs/SPEC.md``), fused.

    Args:
        student_logits: ``(B, T, Vs)`` fp32/fp16/bf16; position ``t`` predicts ``labels[b, t]``.
            Any view whose last dimension is contiguous (e.g. ``logits[:, :-1]``) is read in
            place. Receives the gradient.
        teacher_logits: ``(B, T, Vt)`` with ``Vt >= Vs``; columns ``>= Vs`` are ignored. Never
            receives a gradient. Or a ``SparseTeacher`` (the teacher's top-k ids and log-probs
            and the sampled token's log-prob, e.g. from a teacher server; ``docs/usage.md``).
        labels: ``(B, T)`` int64 sampled tokens; ``ignore_index`` marks positions to skip.
        {options}
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"cpu"`` (see ``docs/backends.md``).
        return_stats: also return a dict of detached ``weights (B,)``, ``divergence (B,)``,
            ``log_ratio (B, T)`` (clipped, 0 at ignored positions) and ``selected (B, T)``.
        ema_state: for ``weight_norm="ema"``: a 0-dim float tensor holding the running mean
            (NaN before the first call), advanced in place. ``ReNIOLoss`` manages it for you.
        normalizer: the ``StepNormalizer`` that ``weight_scope="global"`` needs (the same one
            for every call of a training run; call its ``finish`` once per optimizer step).
        check_labels: verify every label is in ``[0, Vs)`` or ``ignore_index`` (one device
            sync on CUDA). With False, an out-of-range label makes the loss NaN.

    Returns:
        The scalar loss ``mean_b(w_b * D_b)`` in fp32 (``reduction`` changes the mean), or
        ``(loss, stats)``. With ``weight_scope="global"`` it is provisional (normalized as if
        the step were the first micro-batch; the gradients are rescaled by
        ``normalizer.finish``, which also returns the step's loss).

    A fully ignored batch gives loss 0 and zero gradients. NaN logits give a NaN loss. ``-inf``
    teacher logits contribute nothing where the teacher's probability is 0 (forward KL, JSD);
    under reverse KL a student token with mass where the teacher has none makes ``d = +inf``
    unless ``token_clip`` bounds it. ``-inf`` student logits are fine for reverse KL and JSD; under
    forward KL they give ``d = +inf`` wherever the teacher has mass (unless clipped). A row that
    is ``-inf`` everywhere has no distribution and gives NaN.

    DTensor logits placed ``Shard(-1)`` on a 1-D device mesh (tensor-parallel logits sharded over
    the vocabulary, e.g. torchtitan's loss parallelism) go to the vocabulary-parallel loss
    (``renio_kernels.vocab_parallel``, ``docs/scaling.md``): the same loss on every rank, each
    rank's gradient on its own shard. Other DTensor placements are refused.
    """
    if is_dtensor(student_logits) or is_dtensor(teacher_logits):
        return dtensor_renio_loss(
            student_logits, teacher_logits, labels, backend=backend, return_stats=return_stats,
            ema_state=ema_state, normalizer=normalizer, check_labels=check_labels, **options,
        )  # fmt: skip
    opts = call_options(**options)
    check_ema_state(opts, ema_state, "ReNIOLoss")
    check_normalizer(opts, normalizer)
    sparse = isinstance(teacher_logits, SparseTeacher)
    if sparse or opts.top_k is not None:
        # The dense checks (a sparse teacher's are in _sparse_rows), then top_k >= Vs is the
        # full loss below.
        check_logits_inputs(student_logits, student_logits if sparse else teacher_logits, labels)
        if uses_sparse_path(teacher_logits, opts.top_k, student_logits.shape[-1]):
            d, ls_x, lt_x = _sparse_rows(
                student_logits, teacher_logits, labels, opts, backend, check_labels
            )
            mask = labels != opts.ignore_index
            return reduce_renio(d, ls_x, lt_x, mask, opts, ema_state, return_stats, normalizer)
    d, ls_x, lt_x = row_stats(
        student_logits,
        teacher_logits,
        labels,
        kernel_params(opts),
        backend=backend,
        with_divergence=True,
        check_labels=check_labels,
    )
    mask = labels != opts.ignore_index
    return reduce_renio(d, ls_x, lt_x, mask, opts, ema_state, return_stats, normalizer)


@torch.compiler.disable  # eager: value checks read back; see core.sparse
def _sparse_rows(student_logits, teacher, labels, opts, backend: str, check_labels: bool):
    """Validate (the dense checks have run), then ``(d, ls[x], lt[x])`` of a sparse teacher or
    ``top_k < Vs``."""
    sparse = isinstance(teacher, SparseTeacher)
    check_backend(backend)
    vocab = student_logits.shape[-1]
    if sparse:
        check_sparse_teacher(
            teacher, student_logits.shape[:2], vocab, labels, opts.ignore_index, opts.top_k
        )
    if check_labels:
        check_labels_in_range(labels, vocab, opts.ignore_index)
    student = last_dim_contiguous(student_logits)
    if not sparse:
        teacher = last_dim_contiguous(teacher)
    return sparse_row_stats(student, teacher, labels, kernel_params(opts), backend, opts.top_k)


def sampled_reverse_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    check_labels: bool = True,
) -> torch.Tensor:
    """Sampled-token reverse KL ("on-policy distillation as RL").

    ``loss = -mean over valid tokens of A * ls[x]`` with the detached per-token advantage
    ``A = lt[x] - ls[x]``. Needs only the two log-normalizers and the sampled logits: one sweep
    over the vocabulary forward, one backward. A fully ignored batch gives 0.
    """
    opts = call_options(temperature=temperature, ignore_index=ignore_index)
    if isinstance(teacher_logits, SparseTeacher):
        raise ValueError(
            "sampled_reverse_kl_loss takes dense teacher logits, not a SparseTeacher; "
            "its advantage needs only lt[x]: compute it from SparseTeacher.sampled_logprob"
        )
    _, ls_x, lt_x = row_stats(
        student_logits,
        teacher_logits,
        labels,
        kernel_params(opts),
        backend=backend,
        with_divergence=False,
        check_labels=check_labels,
    )
    return reduce_sampled_rkl(ls_x, lt_x, labels != ignore_index)
