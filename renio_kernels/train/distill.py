"""One distillation micro-batch: lay out the sequences, then run both models and the loss.

The student's hidden state at sequence position ``P - 1 + t`` predicts completion token ``t``
(``P`` = prompt width; prompts are left-padded so every completion starts at column ``P``), i.e.
the positions that predict the last ``C`` tokens of the ``P + C`` columns. Running the models and
the loss is ``integrations.run.distillation_loss`` (shared with the Hugging Face and TRL
integrations): ``--loss-impl fused-linear`` hands those hidden states and the lm_head weights to
``fused_linear_renio_loss``, so the ``(B, C, V)`` logits never exist; ``logits`` asks the models
for the logits of the completion positions only (``logits_to_keep``).

``--weight-scope global`` (the script's default): one ``StepNormalizer`` for the run normalizes
the weights and the reduction over every rank and micro-batch of an optimizer step; each
micro-batch's loss is backpropagated as it is (not divided by ``--grad-accum``) and
``finish_step`` rescales the gradients once, after their all-reduce (``dist.allreduce_grads``
averages them, the normalizer's ``grads_averaged=True``) and before clipping.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import renio_kernels

from ..core.options import ReNIOOptions
from ..core.step import StepNormalizer
from ..integrations.run import causal_logits, distillation_loss, use_fused_linear
from .generation import Rollout, sequences_for

__all__ = ["DistillLoss"]

# How errors name the fused-linear switch.
_NAMES = ("--loss-impl fused-linear", "--loss-impl logits")


class DistillLoss:
    """The objective over one rollout; keeps the ``"ema"`` weight normalization's running mean
    and, with ``weight_scope="global"``, the run's ``StepNormalizer``."""

    def __init__(self, cfg, options: ReNIOOptions):
        self.cfg = cfg
        self.options = options
        self.fused = cfg.loss_impl == "fused-linear"
        self._ema = torch.full((), float("nan"))
        self.normalizer = None  # the sampled reverse KL has no weights: per micro-batch
        if options.weight_scope == "global" and cfg.objective != "sampled-reverse-kl":
            self.normalizer = StepNormalizer(grads_averaged=True)
        self._first = None  # (sequences, valid tokens) of this rank's first call of the step

    @property
    def ema_state(self) -> torch.Tensor:
        """The ``"ema"`` running mean (checkpointed): the normalizer's with the global scope."""
        return self._ema if self.normalizer is None else self.normalizer.ema_mean

    def micro_batch_scale(self, grad_accum: int) -> float:
        """What a micro-batch's loss is multiplied by before its backward: the paper's
        per-micro-batch losses are averaged over the step's micro-batches (and over the ranks by
        the gradient all-reduce); a global-scope loss already is its share of the step's."""
        return 1.0 if self.normalizer is not None else 1.0 / grad_accum

    def contribute_nothing(self, device) -> None:
        """Global scope, a micro-batch with nothing to train on this rank (``--sgo-filter``)
        while other ranks have some: join the step's normalization with zero sequences (the
        other ranks wait for this rank's totals). Nothing to backpropagate."""
        empty = torch.zeros(0, dtype=torch.float64, device=device)
        mask = torch.zeros(0, 1, dtype=torch.bool, device=device)
        self._note_first(0, 0, device)
        self.normalizer.weigh(empty, empty, empty, mask, self.options)

    def _note_first(self, sequences: int, tokens, device) -> None:
        if not self.normalizer.pending:
            self._first = torch.tensor([sequences, int(tokens)], dtype=torch.float64, device=device)

    def finish_step(self, params) -> tuple[float | None, float]:
        """End the optimizer step after the gradient all-reduce, before clipping: with the global
        scope, rescale the gradients (``StepNormalizer.finish``). Returns the step's loss (None
        for the micro-batch scope, whose loss is the mean of the calls') and the factor from the
        weights the calls returned (the step's first micro-batch's normalization) to the step's
        final ones, for the logs."""
        if self.normalizer is None:
            return None, 1.0
        if not self.normalizer.pending:  # no sequence kept on any rank in this whole step
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)  # as the micro-batch scope's zero-times backward
            return None, 1.0
        first = self._first
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(first)
        result = self.normalizer.finish(params)
        reduction = self.options.reduction
        if reduction == "sequence_mean":
            z_first, z_step = first[0], result.sequences
        elif reduction == "token_mean":
            z_first, z_step = first[1].clamp(min=1), result.tokens.clamp(min=1)
        else:
            z_first = z_step = 1.0
        factor = float(result.grad_scale * z_step / z_first)
        return float(result.loss), factor

    def check_models(self, student, teacher) -> None:
        """Before the run: with ``--loss-impl fused-linear``, prove for each model (once) that its
        logits are ``final_hidden @ lm_head.weight.T``; ValueError naming ``--loss-impl logits``
        for a model that scales or soft-caps its logits."""
        if self.fused:
            for role, model in (("student", student), ("teacher", teacher)):
                use_fused_linear(model, role, True, names=_NAMES)

    def __call__(self, student, teacher, rollout: Rollout, teacher_prompt: tuple | None):
        """``(loss, stats)``; stats is None for the sampled reverse KL."""
        ignore = self.options.ignore_index
        s_ids, s_mask, s_pos, labels = sequences_for(
            rollout.prompt_ids, rollout.prompt_mask, rollout, ignore
        )
        s_in = {"input_ids": s_ids, "attention_mask": s_mask, "position_ids": s_pos}
        if teacher_prompt is None:
            t_in = s_in
        else:
            t_ids, t_mask, t_pos, _ = sequences_for(*teacher_prompt, rollout, ignore)
            t_in = {"input_ids": t_ids, "attention_mask": t_mask, "position_ids": t_pos}
        completion = labels.shape[1]
        if self.cfg.objective == "sampled-reverse-kl":
            s_logits = causal_logits(student, completion, **s_in)
            with torch.no_grad():
                t_logits = causal_logits(teacher, completion, **t_in)
            loss = renio_kernels.sampled_reverse_kl_loss(
                s_logits,
                t_logits,
                labels,
                temperature=self.options.temperature,
                ignore_index=ignore,
                backend=self.cfg.backend,
            )
            return loss, None
        scope = {"normalizer": self.normalizer, "ema_state": None}
        if self.normalizer is None:
            if self._ema.device != s_ids.device:
                self._ema = self._ema.to(s_ids.device)
            scope = {"ema_state": self._ema}
        else:
            self._note_first(labels.shape[0], (labels != ignore).sum(), labels.device)
        return distillation_loss(
            student,
            teacher,
            labels,
            s_in,
            t_in,
            options=self.options,
            fused_linear=self.fused,
            names=_NAMES,
            backend=self.cfg.backend,
            return_stats=True,
            **scope,
        )
