"""Tensor parallel: the ReNIO loss of logits sharded over the vocabulary (``docs/scaling.md``).

``vocab_parallel_renio_loss`` takes each rank's contiguous vocabulary slice of both sides'
logits (Megatron's vocab-parallel layout), ``vocab_parallel_fused_linear_renio_loss`` each rank's
rows of both lm_heads with replicated hidden states. ``renio_loss`` sends DTensor logits placed
``Shard(-1)`` on a 1-D mesh (torchtitan's loss parallelism) here. Every rank returns the same loss,
equal to ``renio_loss`` on the full logits; each rank's gradient is that of its own slice. The
math and its collectives: ``core.vocab_parallel``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .core.options import call_options, kernel_params, with_options
from .core.reduction import reduce_renio
from .core.step import StepNormalizer
from .core.validation import (
    check_chunk_size,
    check_ema_state,
    check_fused_linear_inputs,
    check_labels_in_range,
    check_logits_inputs,
    check_normalizer,
    is_dtensor,
    last_dim_contiguous,
)
from .core.vocab_parallel import VocabParallelLinearFunction, VocabParallelRowsFunction, VocabShard
from .ops.linear import chunk_cap

__all__ = ["vocab_parallel_fused_linear_renio_loss", "vocab_parallel_renio_loss"]


def _group_shard(group, width: int, vocab_size, fn: str) -> VocabShard:
    """Megatron's layout: rank ``r`` of ``group`` holds global columns ``[r W, (r + 1) W)``."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"{fn} needs torch.distributed initialized: call dist.init_process_group() and pass "
            "the tensor-parallel group as group= (None: the default group)"
        )
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError(f"this process is not a member of the group passed to {fn}")
    full = world * width
    if vocab_size is None:
        vocab_size = full
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ValueError(f"vocab_size must be None or an int, got {vocab_size!r}")
    if not 0 < vocab_size <= full:
        raise ValueError(
            f"vocab_size={vocab_size} must be in [1, {full}] (group size {world} x local width "
            f"{width}); columns at or past vocab_size are padding, ids below it are real tokens"
        )
    real = max(0, min(width, vocab_size - rank * width))
    return VocabShard(group, rank * width, real, vocab_size)


def _check_across_ranks(group, labels: torch.Tensor, sizes: tuple[int, ...], what: str) -> None:
    """Every rank must pass the same ``(B, T)``, local width (and chunking) and labels: one
    all-reduce of a few integers, one host read. Raised on every rank, so none hangs."""
    mine = torch.tensor([*sizes, 0], dtype=torch.int64, device=labels.device)
    mine[-1] = labels.long().sum()
    both = torch.cat((mine, -mine))
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    hi, neg_lo = both.chunk(2)
    if not torch.equal(hi, -neg_lo):
        raise ValueError(
            f"the ranks of the tensor-parallel group disagree on {what} or the labels; every "
            "rank must pass the same (B, T), the same labels, and shards of equal width"
        )


def _check_ema(opts, ema_state, normalizer) -> None:
    if opts.top_k is not None:
        raise ValueError(
            "top_k is not supported by the vocabulary-parallel loss (the top-k selection would "
            "need a distributed top-k over the shards); pass top_k=None, or gather the logits "
            "and call renio_loss"
        )
    check_normalizer(opts, normalizer)
    if (
        opts.weight_scope == "micro_batch"
        and opts.weight_norm == "ema"
        and opts.use_renio
        and (ema_state is None)
    ):
        raise ValueError(
            "weight_norm='ema' keeps a running mean across calls: pass "
            "ema_state=torch.full((), float('nan')) (the same on every rank) and keep it between "
            "calls"
        )
    check_ema_state(opts, ema_state, "ReNIOLoss")


def _check_widths(name_t: str, width_t: int, name_s: str, width_s: int) -> None:
    if width_t != width_s:
        raise ValueError(
            f"{name_t} has {width_t} local vocabulary columns but {name_s} has {width_s}; both "
            "sides must be sharded the same way (pad both to one vocabulary and mark the padding "
            "with vocab_size=)"
        )


def _rows_loss(student, teacher, labels, opts, shard, ema_state, normalizer, return_stats):
    student = last_dim_contiguous(student)
    teacher = last_dim_contiguous(teacher.detach())
    need_grad = torch.is_grad_enabled() and student.requires_grad
    d, ls_x, lt_x = VocabParallelRowsFunction.apply(
        student, teacher, labels, kernel_params(opts), shard, need_grad
    )
    mask = labels != opts.ignore_index
    return reduce_renio(d, ls_x, lt_x, mask, opts, ema_state, return_stats, normalizer)


@with_options
def vocab_parallel_renio_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    group=None,
    vocab_size: int | None = None,
    return_stats: bool = False,
    ema_state: torch.Tensor | None = None,
    normalizer: StepNormalizer | None = None,
    check_labels: bool = True,
    **options,
):
    """``renio_loss`` of logits sharded over the vocabulary across a tensor-parallel group.

    Args:
        student_logits: ``(B, T, W)``, this rank's slice of the student's logits: rank ``r`` of
            ``group`` holds global vocabulary columns ``[r W, (r + 1) W)`` (Megatron's
            vocab-parallel layout). Every rank's ``W`` must be the same. Gets the gradient of
            this slice only. A DTensor placed ``Shard(-1)`` on a 1-D mesh is also accepted
            (then ``group`` and ``vocab_size`` come from it and must be None).
        teacher_logits: ``(B, T, W)``, the teacher's logits sharded the same way.
        labels: ``(B, T)`` global token ids in ``[0, vocab_size)`` or ``ignore_index``, the same
            on every rank.
        group: the tensor-parallel process group (None: the default group).
        vocab_size: the real vocabulary; global columns ``>= vocab_size`` are padding (Megatron
            pads the vocabulary to a multiple of the group size) and are ignored. Default:
            ``world * W``.
        {options}
        return_stats, ema_state, normalizer: as in :func:`renio_kernels.renio_loss`
            (``ema_state`` is advanced identically on every rank). For ``weight_scope="global"``
            the normalizer's group is the data-parallel group, not ``group``.
        check_labels: verify the labels' range, and that every rank passes the same ``(B, T)``,
            width and labels (one small all-reduce and one host read).

    Returns:
        The scalar loss in fp32, bit-identical on every rank (or ``(loss, stats)``). The math is
        the chunked fp32 PyTorch of ``backend="torch"`` plus two all-gathers of ``(B, T)``-sized
        tensors (and ``check_labels``' all-reduce), none in the backward.
    """
    if is_dtensor(student_logits) or is_dtensor(teacher_logits):
        if group is not None or vocab_size is not None:
            raise ValueError(
                "DTensor logits carry their own mesh and vocabulary: leave group and vocab_size "
                "None (slice a padded vocabulary off before distributing the logits)"
            )
        return dtensor_renio_loss(
            student_logits, teacher_logits, labels, return_stats=return_stats,
            ema_state=ema_state, normalizer=normalizer, check_labels=check_labels, **options,
        )  # fmt: skip
    opts = call_options(**options)
    _check_ema(opts, ema_state, normalizer)
    check_logits_inputs(student_logits, teacher_logits, labels)
    width = student_logits.shape[-1]
    _check_widths("teacher_logits", teacher_logits.shape[-1], "student_logits", width)
    fn = "vocab_parallel_renio_loss"
    shard = _group_shard(group, width, vocab_size, fn)
    if check_labels:
        check_labels_in_range(labels, shard.vocab_size, opts.ignore_index)
        _check_across_ranks(group, labels, (*labels.shape, width), "(B, T) or the local width")
    return _rows_loss(
        student_logits, teacher_logits, labels, opts, shard, ema_state, normalizer, return_stats
    )


def _dtensor_locals(student, teacher, labels):
    """Local tensors and shard of DTensor logits placed ``Shard(-1)`` on a 1-D mesh."""
    from torch.distributed.tensor import DTensor

    if not (isinstance(student, DTensor) and isinstance(teacher, DTensor)):
        plain = "teacher_logits" if isinstance(student, DTensor) else "student_logits"
        raise ValueError(
            f"{plain} is a plain tensor but the other side is a DTensor: distribute it the same "
            "way (distribute_tensor(x, mesh, [Shard(-1)])), or pass plain tensors"
        )
    mesh = student.device_mesh
    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        place = x.placements
        sharded = len(place) == 1 and place[0].is_shard() and place[0].dim in (-1, x.dim() - 1)
        if x.device_mesh != mesh or mesh.ndim != 1 or not sharded:
            raise ValueError(
                f"{name} is a DTensor placed {tuple(place)} on a {x.device_mesh.ndim}-D mesh; "
                "supported: both logits placed Shard(-1) (the vocabulary) on one 1-D mesh, as "
                "torchtitan's loss parallelism gives; otherwise pass x.full_tensor(), or the "
                "local slices to vocab_parallel_renio_loss with the group"
            )
    if isinstance(labels, DTensor):
        if not all(p.is_replicate() for p in labels.placements):
            raise ValueError(
                f"labels is a DTensor placed {tuple(labels.placements)}; pass it replicated "
                "(Replicate()) or as a plain tensor, the same on every rank"
            )
        labels = labels.to_local()
    if teacher.shape[-1] != student.shape[-1]:
        raise ValueError(
            f"teacher_logits has a global vocabulary of {teacher.shape[-1]} columns, the "
            f"student {student.shape[-1]}; with Shard(-1) both must be equal (slice the "
            "teacher's padded columns off before distributing it)"
        )
    vocab, world, rank = student.shape[-1], mesh.size(), mesh.get_local_rank()
    # DTensor shards like torch.chunk: ceil(V / R) columns per rank, the last ones fewer.
    per = -(-vocab // world)
    offset = min(rank * per, vocab)
    local_s, local_t = student.to_local(), teacher.to_local()
    if local_s.shape[-1] != min(per, vocab - offset) or local_t.shape[-1] != local_s.shape[-1]:
        raise ValueError(
            f"unexpected DTensor shard: rank {rank} holds {local_s.shape[-1]} student and "
            f"{local_t.shape[-1]} teacher columns of {vocab}, expected torch.chunk's "
            f"{min(per, vocab - offset)}"
        )
    shard = VocabShard(mesh.get_group(), offset, local_s.shape[-1], vocab)
    return local_s, local_t, labels, shard


def dtensor_renio_loss(
    student_logits, teacher_logits, labels, *, backend: str = "auto", return_stats=False,
    ema_state=None, normalizer=None, check_labels=True, **options,
):  # fmt: skip
    """``renio_loss`` on DTensor logits placed ``Shard(-1)`` on a 1-D mesh (called by it)."""
    if backend not in ("auto", "torch"):
        raise ValueError(
            f"backend={backend!r} with DTensor logits: the vocabulary-parallel loss runs its own "
            "chunked PyTorch math; use backend='auto'"
        )
    opts = call_options(**options)
    _check_ema(opts, ema_state, normalizer)
    student, teacher, labels, shard = _dtensor_locals(student_logits, teacher_logits, labels)
    check_logits_inputs(student_logits, teacher_logits, labels)
    if check_labels:
        check_labels_in_range(labels, shard.vocab_size, opts.ignore_index)
        _check_across_ranks(shard.group, labels, tuple(labels.shape), "(B, T)")
    return _rows_loss(student, teacher, labels, opts, shard, ema_state, normalizer, return_stats)


@with_options
def vocab_parallel_fused_linear_renio_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    group=None,
    vocab_size: int | None = None,
    return_stats: bool = False,
    ema_state: torch.Tensor | None = None,
    normalizer: StepNormalizer | None = None,
    check_labels: bool = True,
    chunk_size: int | None = None,
    **options,
):
    """``fused_linear_renio_loss`` with both lm_heads sharded over the vocabulary.

    Args:
        student_hidden: ``(B, T, Hs)``, the same on every rank (replicated).
        student_weight: ``(W, Hs)``, this rank's rows of the student's lm_head: rank ``r`` of
            ``group`` holds global rows ``[r W, (r + 1) W)``; every rank's ``W`` the same.
        teacher_hidden: ``(B, T, Ht)``, replicated. Never gets a gradient.
        teacher_weight: ``(W, Ht)``, the teacher's rows, sharded the same way.
        labels: ``(B, T)`` global token ids, the same on every rank.
        student_bias, teacher_bias: optional ``(W,)`` local bias slices.
        group, vocab_size, check_labels: as in :func:`vocab_parallel_renio_loss`.
        {options}
        chunk_size: tokens per chunk (default: ``ops.linear.chunk_cap`` of the local width); the
            same on every rank. Each chunk runs two collectives.
        return_stats, ema_state, normalizer: as in :func:`vocab_parallel_renio_loss`.

    Gradients: ``student_weight`` and ``student_bias`` get this rank's rows. ``student_hidden``
    gets this rank's *partial* sum ``sum over local columns``: all-reduce it (SUM) over the
    group, as Megatron's column-parallel lm_head does in its backward (``docs/scaling.md``).
    """
    opts = call_options(**options)
    _check_ema(opts, ema_state, normalizer)
    check_chunk_size(chunk_size)
    check_fused_linear_inputs(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
        b_s=student_bias, b_t=teacher_bias,
    )  # fmt: skip
    width = student_weight.shape[0]
    _check_widths("teacher_weight", teacher_weight.shape[0], "student_weight", width)
    shard = _group_shard(group, width, vocab_size, "vocab_parallel_fused_linear_renio_loss")
    # From the full local width (not the padding-free one): every rank must chunk alike.
    rows = chunk_size or chunk_cap(
        width, student_hidden.shape[-1], teacher_hidden.shape[-1], student_hidden.device
    )
    if check_labels:
        check_labels_in_range(labels, shard.vocab_size, opts.ignore_index)
        _check_across_ranks(group, labels, (*labels.shape, width, rows),
                            "(B, T), the local width or chunk_size")  # fmt: skip
    student = (student_hidden, student_weight, student_bias)
    need_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in student)
    teacher = tuple(
        None if x is None else x.detach() for x in (teacher_hidden, teacher_weight, teacher_bias)
    )
    d, ls_x, lt_x = VocabParallelLinearFunction.apply(
        *student, *teacher, labels, kernel_params(opts), shard, rows, need_grad
    )
    mask = labels != opts.ignore_index
    return reduce_renio(d, ls_x, lt_x, mask, opts, ema_state, return_stats, normalizer)
