"""The ReNIO loss for a student and a teacher on a batch of prompt + completion token ids.

``renio_distillation_loss(student, teacher, input_ids, attention_mask, completion_mask)`` does
what every on-policy distillation trainer repeats: labels from the completion mask (-100
elsewhere), the causal shift, the teacher under ``no_grad``, and then either

* the **fused-linear** path: the final hidden states of both backbones and their ``lm_head``
  weights go to ``renio_kernels.fused_linear_renio_loss``, so the ``(tokens x vocab)`` logits
  are never stored; used when both models' logits are ``lm_head(final hidden state)``, which is
  checked numerically once per model (``fused_linear_supported``): models that soft-cap or scale
  their logits fail it;
* the **logits** path otherwise: both models' logits go to ``renio_kernels.renio_loss``.

Both give ``renio_loss`` on the logits at the completion positions, i.e. docs/SPEC.md's loss. The
step itself (teacher, student, loss) is ``integrations.run.distillation_loss``, shared with the
TRL trainer and ``renio-train``.

Gradient accumulation. The ReNIO loss is a mean over sequences whose weights are normalized
within the batch it is given (``mean_b(e)``). With ``weight_scope="micro_batch"`` (default) the
helper returns the loss of one micro-batch, weights normalized per micro-batch: the semantics of
the paper's trainer, where each ``per_device_batch`` is one ReNIO batch; the optimizer step must
then average the micro-batch losses, i.e. the Trainer must divide each by the number of
accumulation steps. transformers >= 5.19 (where ``Trainer.loss_is_scaled_for_ga`` first exists)
does that only when it is False (or when it can prove nothing normalized the loss by
``num_items_in_batch``); ``ReNIOTrainerMixin`` sets it. With equal micro-batch sizes and weights
that do not depend on the batch (``use_renio=False`` or ``weight_norm="none"``) the result equals
one large batch exactly; with batch-normalized weights it is, by design, the mean of
per-micro-batch losses (a token-count normalization via ``num_items_in_batch`` would change the
loss's meaning and is not used). With ``weight_scope="global"`` the weights are normalized over
every rank and micro-batch of the optimizer step (``normalizer=StepNormalizer()``, then
``finish``); the mixin does that inside the Trainer (``integrations.steps``).

Sharded heads. Under FSDP2 the ``lm_head`` weight is a DTensor: it is gathered once with
``full_tensor()`` (its gradient is reduce-scattered by autograd). Under DeepSpeed ZeRO-3 the
weight is partitioned and only materialized inside its module's forward, which the fused path
never calls: it is gathered with ``deepspeed.zero.GatheredParameters`` and copied (the
fused-linear backward recomputes the logits, after the gather has ended), so one ``V x H`` copy
per model lives from the forward to the backward. A wrapped model (DDP / FSDP / DeepSpeed engine)
is run through its wrapper's ``forward`` so the wrapper's hooks (DDP's gradient reduction, FSDP's
unsharding) fire. DDP and FSDP2 are tested on CPU with gloo; ZeRO-3 is not (no DeepSpeed here).
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import nn

from ..core.options import ReNIOOptions
from ..core.step import StepNormalizer
from .run import distillation_loss, fused_linear_mismatch, gathered_lm_head
from .steps import TrainerWeightScope

__all__ = [
    "ReNIOTrainerMixin",
    "completion_labels",
    "fused_linear_supported",
    "gathered_lm_head",
    "renio_distillation_loss",
]


def completion_labels(
    input_ids: torch.Tensor, completion_mask: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Shifted labels ``(B, L - 1)``: ``input_ids[:, t + 1]`` where the completion mask is set,
    ``ignore_index`` elsewhere (prompt, padding). Position ``t`` of the logits predicts them."""
    if input_ids.shape != completion_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and completion_mask "
            f"{tuple(completion_mask.shape)} must have the same (B, L) shape"
        )
    keep = completion_mask[:, 1:].bool()
    return input_ids[:, 1:].masked_fill(~keep, ignore_index).long()


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / FSDP1 / DeepSpeed wrappers (each keeps it as ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def fused_linear_supported(model: nn.Module) -> bool:
    """True when ``model``'s logits are exactly ``lm_head(hidden)`` of its backbone output,
    checked now on a short probe input (``integrations.run.fused_linear_mismatch``)."""
    return fused_linear_mismatch(_unwrap(model)) is None


def _redirect(wrapper: nn.Module, inner: nn.Module, fn: Callable, *args):
    """Run ``fn(*args)`` inside ``wrapper.forward`` by swapping ``inner.forward`` for one call,
    so the wrapper's hooks fire: DDP's gradient reduction, FSDP1/DeepSpeed gathering, and, when
    the wrapper is the model itself, FSDP2's root-module unsharding."""
    patched_before = "forward" in vars(inner)
    original = inner.forward

    def restore() -> None:
        # Leave no instance attribute behind (it would be a model -> bound method cycle).
        if patched_before:
            inner.forward = original
        else:
            vars(inner).pop("forward", None)

    def forward(*_a, **_k):
        restore()
        return fn(*args)

    inner.forward = forward
    try:
        return wrapper()
    finally:
        restore()


def renio_distillation_loss(
    student: nn.Module,
    teacher: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    completion_mask: torch.Tensor,
    *,
    options: ReNIOOptions | None = None,
    fused_linear: bool | None = None,
    logits_to_keep: int | None = None,
    ema_state: torch.Tensor | None = None,
    normalizer: StepNormalizer | None = None,
    return_stats: bool = False,
    backend: str = "auto",
    check_labels: bool = True,
):
    """The ReNIO loss of ``student`` against ``teacher`` on prompt + completion ids.

    Args:
        student: a causal LM (``transformers`` ``*ForCausalLM``, optionally PEFT- or
            DDP/FSDP/DeepSpeed-wrapped); receives the gradient.
        teacher: a causal LM with a vocabulary at least the student's (extra columns ignored);
            run under ``torch.no_grad()`` in whatever mode it is in (put it in ``eval()``).
        input_ids: ``(B, L)`` prompt followed by completion, padded.
        attention_mask: ``(B, L)`` or None (all ones).
        completion_mask: ``(B, L)``; nonzero at the completion tokens that get a loss.
        options: every SPEC option (``ReNIOOptions``); default: SPEC defaults.
        fused_linear: True forces the fused-linear path (ValueError when a model's logits are
            not ``lm_head(final hidden state)``), False the logits path, None picks fused-linear
            when both models pass that check (see the module docstring).
        logits_to_keep: score only the last ``logits_to_keep`` positions (all completion tokens
            must lie there, e.g. the completion width with right-padded completions); saves
            the lm_head work on the prompt. A window that would drop a completion label is a
            ValueError naming the completion width (one host sync).
        ema_state: the running mean for ``weight_norm="ema"`` (see ``renio_loss``).
        normalizer: the ``StepNormalizer`` that ``options.weight_scope == "global"`` needs (the
            same one for every micro-batch of the optimizer step; see ``renio_loss``).
        return_stats, backend, check_labels: as in ``renio_loss``.

    Returns:
        The micro-batch loss (weights normalized within this batch; provisional under the global
        scope, see ``StepNormalizer``), or ``(loss, stats)``.
    """
    return _distillation_loss(
        student,
        teacher,
        input_ids,
        attention_mask,
        completion_mask,
        options=options,
        fused_linear=fused_linear,
        logits_to_keep=logits_to_keep,
        ema_state=ema_state,
        normalizer=normalizer,
        return_stats=return_stats,
        backend=backend,
        check_labels=check_labels,
        keep_name="logits_to_keep",
    )


def _keep_last(labels: torch.Tensor, keep: int, ignore_index: int, name: str) -> torch.Tensor:
    """``labels[:, -keep:]``; ValueError (naming the argument ``name``) when that would drop a
    completion label: every label left of the kept window must be ``ignore_index``."""
    width = labels.shape[1]
    try:
        valid = not isinstance(keep, bool) and 0 < operator.index(keep) <= width
    except TypeError:
        valid = False
    if not valid:
        raise ValueError(
            f"{name} must be an int in [1, {width}] (sequence length - 1), got {keep!r}"
        )
    keep = operator.index(keep)
    dropped = labels[:, : width - keep] != ignore_index  # read back once: a host sync
    if bool(dropped.any()):
        first = int(dropped.any(0).int().argmax())  # leftmost column holding a completion label
        needed = width - first
        raise ValueError(
            f"{name}={keep} scores only the last {keep} positions, but the completion labels "
            f"span the last {needed} (completion width {needed}): {int(dropped.sum())} "
            f"completion label(s) would be silently dropped. Pass {name} >= {needed} (the "
            f"completion width: the padded completion length when every completion starts "
            f"right after its prompt), or {name}=None to score every position"
        )
    return labels[:, -keep:]


def _distillation_loss(
    student,
    teacher,
    input_ids,
    attention_mask,
    completion_mask,
    *,
    options,
    fused_linear,
    logits_to_keep,
    ema_state,
    normalizer,
    return_stats,
    backend,
    check_labels,
    keep_name: str,
):
    """``renio_distillation_loss``; ``keep_name`` is how errors name ``logits_to_keep``."""
    opts = options or ReNIOOptions()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    labels = completion_labels(input_ids, completion_mask, opts.ignore_index)
    if logits_to_keep is not None:
        labels = _keep_last(labels, logits_to_keep, opts.ignore_index, keep_name)
    s_inner, t_inner = _unwrap(student), _unwrap(teacher)

    def student_side():
        return distillation_loss(
            s_inner,
            t_inner,
            labels,
            {"input_ids": input_ids, "attention_mask": attention_mask},
            options=opts,
            fused_linear=fused_linear,
            run_teacher=lambda fn: _redirect(teacher, t_inner, fn),
            backend=backend,
            return_stats=return_stats,
            ema_state=ema_state,
            normalizer=normalizer,
            check_labels=check_labels,
        )

    return _redirect(student, s_inner, student_side)


class ReNIOTrainerMixin(TrainerWeightScope):
    """``compute_loss`` for a ``transformers.Trainer`` subclass::

        class DistillTrainer(ReNIOTrainerMixin, Trainer):
            ...

        trainer = DistillTrainer(model=student, args=TrainingArguments(...,
                                 remove_unused_columns=False), train_dataset=...)
        trainer.teacher_model = teacher.eval()
        trainer.renio_options = ReNIOOptions(beta=0.5, token_clip=0.05)

    Batches need ``input_ids``, ``completion_mask`` and optionally ``attention_mask``. Gradient
    accumulation and ``weight_scope="global"`` (one ``StepNormalizer`` over every rank and
    micro-batch of the step, ``finish`` before the Trainer's clipping): see
    ``integrations.steps``. ``weight_norm="ema"`` keeps its running mean in
    ``self.renio_ema_state``.
    """

    teacher_model: nn.Module
    renio_fused_linear: bool | None = None
    renio_logits_to_keep: int | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "completion_mask" not in inputs:
            raise ValueError(
                "the batch has no 'completion_mask': build it in the collator, and pass "
                "TrainingArguments(remove_unused_columns=False) so the Trainer keeps it"
            )
        loss = _distillation_loss(
            model,
            self.teacher_model,
            inputs["input_ids"],
            inputs.get("attention_mask"),
            inputs["completion_mask"],
            fused_linear=self.renio_fused_linear,
            logits_to_keep=self.renio_logits_to_keep,
            return_stats=False,
            backend="auto",
            check_labels=True,
            keep_name="renio_logits_to_keep",
            **self.renio_scope_kwargs(inputs["input_ids"].device, model.training),
        )
        return (loss, None) if return_outputs else loss
