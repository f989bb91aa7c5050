"""One distillation micro-batch: lay out the sequences, then run both models and the loss.

The student's hidden state at sequence position ``P - 1 + t`` predicts completion token ``t``
(``P`` = prompt width; prompts are left-padded so every completion starts at column ``P``), i.e.
the positions that predict the last ``C`` tokens of the ``P + C`` columns. Running the models and
the loss is ``integrations.run.distillation_loss`` (shared with the Hugging Face and TRL
integrations): ``--loss-impl fused-linear`` hands those hidden states and the lm_head weights to
``fused_linear_renio_loss``, so the ``(B, C, V)`` logits never exist; ``logits`` asks the models
for the logits of the completion positions only (``logits_to_keep``).
"""

from __future__ import annotations

import torch

import renio_kernels

from ..core.options import ReNIOOptions
from ..integrations.run import causal_logits, distillation_loss, use_fused_linear
from .generation import Rollout, sequences_for

__all__ = ["DistillLoss"]

# How errors name the fused-linear switch.
_NAMES = ("--loss-impl fused-linear", "--loss-impl logits")


class DistillLoss:
    """The objective over one rollout; keeps the ``"ema"`` weight normalization's running mean."""

    def __init__(self, cfg, options: ReNIOOptions):
        self.cfg = cfg
        self.options = options
        self.fused = cfg.loss_impl == "fused-linear"
        self.ema_state = torch.full((), float("nan"))

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
        if self.ema_state.device != s_ids.device:
            self.ema_state = self.ema_state.to(s_ids.device)
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
            ema_state=self.ema_state,
        )
