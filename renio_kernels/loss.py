"""Public functional API over logits: ``renio_loss`` and ``sampled_reverse_kl_loss``."""

from __future__ import annotations

import torch

from ._validation import (
    check_ema_state,
    check_labels_in_range,
    check_logits_inputs,
    last_dim_contiguous,
)
from .autograd import RowStatsFunction
from .backends import BACKENDS, resolve_backend
from .custom_ops import check_labels_async, row_stats_op, traced_options
from .ops.params import DivergenceParams
from .weights import ReNIOOptions, reduce_renio, reduce_sampled_rkl

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
    ``torch.compile`` the same kernels run through the ``renio::row_stats_*`` custom ops, which
    Dynamo traces as single nodes, and the label check becomes an asynchronous device assert
    (``check_labels_async``) instead of a host sync that would break the graph.
    """
    check_logits_inputs(student_logits, teacher_logits, labels)
    if torch.compiler.is_compiling():
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if check_labels:
            check_labels_async(labels, student_logits.shape[-1], params.ignore_index)
        return row_stats_op(
            last_dim_contiguous(student_logits),
            last_dim_contiguous(teacher_logits.detach()),
            labels,
            params,
            backend,
            with_divergence,
        )
    if check_labels:
        check_labels_in_range(labels, student_logits.shape[-1], params.ignore_index)
    ops = resolve_backend(backend, student_logits.device)
    return RowStatsFunction.apply(
        last_dim_contiguous(student_logits),
        last_dim_contiguous(teacher_logits.detach()),
        labels,
        params,
        ops,
        with_divergence,
        torch.is_grad_enabled(),
    )


def renio_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
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
):
    """The ReNIO on-policy distillation loss (``shared/SPEC.md``), fused.

    Args:
        student_logits: ``(B, T, Vs)`` fp32/fp16/bf16; position ``t`` predicts ``labels[b, t]``.
            Any view whose last dimension is contiguous (e.g. ``logits[:, :-1]``) is read in
            place. Receives the gradient.
        teacher_logits: ``(B, T, Vt)`` with ``Vt >= Vs``; columns ``>= Vs`` are ignored. Never
            receives a gradient.
        labels: ``(B, T)`` int64 sampled tokens; ``ignore_index`` marks positions to skip.
        beta: 0 forward KL(teacher||student), 1 reverse KL, otherwise generalized JSD.
        temperature: divides both sides' logits before the softmax.
        token_clip: clamp each element's divergence term to ``[0, token_clip]`` (None/0: off).
        use_renio: False gives plain on-policy distillation (all weights 1).
        ratio_clip: upper clip of the sampled-token log ratio ``ls[x] - lt[x]`` (None: off).
        threshold: tokens with ratio ``>= threshold`` are pivotal.
        weight_temperature: ``e_b = exp(rbar_b / weight_temperature)``.
        weight_norm: ``"batch_mean"``, ``"clamp"``, ``"none"`` or ``"ema"``.
        ignore_index: label value of positions without a loss.
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"cpu"`` (see ``backends``).
        return_stats: also return a dict of detached ``weights (B,)``, ``divergence (B,)``,
            ``log_ratio (B, T)`` (clipped, 0 at ignored positions) and ``selected (B, T)``.
        ema_state: for ``weight_norm="ema"``: a 0-dim float tensor holding the running mean
            (NaN before the first call), advanced in place. ``ReNIOLoss`` manages it for you.
        check_labels: verify every label is in ``[0, Vs)`` or ``ignore_index`` (one device
            sync on CUDA). With False, an out-of-range label makes the loss NaN.

    Returns:
        The scalar loss ``mean_b(w_b * D_b)`` in fp32, or ``(loss, stats)``.

    A fully ignored batch gives loss 0 and zero gradients. NaN logits give a NaN loss. ``-inf``
    teacher logits contribute nothing where the teacher's probability is 0 (forward KL, JSD);
    under reverse KL a student token with mass where the teacher has none makes ``d = +inf``
    unless ``token_clip`` bounds it. ``-inf`` student logits are fine for reverse KL and JSD; under
    forward KL they give ``d = +inf`` wherever the teacher has mass (unless clipped). A row that
    is ``-inf`` everywhere has no distribution and gives NaN.
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
    check_ema_state(weight_norm, use_renio, ema_state, "ReNIOLoss")
    params = params_from_options(opts)
    d, ls_x, lt_x = row_stats(
        student_logits,
        teacher_logits,
        labels,
        params,
        backend=backend,
        with_divergence=True,
        check_labels=check_labels,
    )
    return reduce_renio(d, ls_x, lt_x, labels != ignore_index, opts, ema_state, return_stats)


def call_options(**kw) -> ReNIOOptions:
    """Validated options. Under ``torch.compile`` a float option may be traced as a symbolic
    float (backed by a float64 tensor, Liger-Kernel #1362) on which ``ReNIOOptions``' checks
    cannot run, so there the same ranges are checked with comparisons (which become guards) and
    the values travel on symbolically; the custom ops receive real Python floats at run time."""
    if not torch.compiler.is_compiling():
        return ReNIOOptions(**kw)
    return traced_options(**kw)


def params_from_options(opts: ReNIOOptions) -> DivergenceParams:
    return DivergenceParams(
        beta=float(opts.beta),
        temperature=float(opts.temperature),
        token_clip=opts.token_clip,
        ignore_index=opts.ignore_index,
    )


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
    _, ls_x, lt_x = row_stats(
        student_logits,
        teacher_logits,
        labels,
        params_from_options(opts),
        backend=backend,
        with_divergence=False,
        check_labels=check_labels,
    )
    return reduce_sampled_rkl(ls_x, lt_x, labels != ignore_index)
