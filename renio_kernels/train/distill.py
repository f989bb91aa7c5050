"""One distillation micro-batch: lay out the sequences, run both models, compute the loss.

The student's hidden state at sequence position ``P - 1 + t`` predicts completion token ``t``
(``P`` = prompt width; prompts are left-padded so every completion starts at column ``P``). The
fused-linear path hands those hidden states and the lm_head weights to
``fused_linear_renio_loss``, so the ``(B, T, V)`` logits never exist; the logits path asks the
model for the logits of the completion positions only (``logits_to_keep``).
"""

from __future__ import annotations

import torch

import renio_kernels

from .generation import Rollout, sequences_for
from .models import lm_head_of, trunk_of

__all__ = ["DistillLoss", "check_fused_consistency", "fused_available"]


def fused_available() -> bool:
    return hasattr(renio_kernels, "fused_linear_renio_loss")


def _hidden(model, ids, mask, pos, width: int, completion: int):
    out = trunk_of(model)(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    return out.last_hidden_state[:, width - 1 : width - 1 + completion]


def _logits(model, ids, mask, pos, completion: int):
    # completion + 1 states end at the last column; the last one predicts nothing we sampled
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        use_cache=False,
        logits_to_keep=completion + 1,
    )
    return out.logits[:, :completion]


@torch.no_grad()
def check_fused_consistency(model, role: str, vocab: int) -> None:
    """The fused-linear path assumes ``logits == final_hidden @ lm_head.weight.T (+ bias)``.

    Models that scale or soft-cap their logits break that; checked numerically on a short input
    so a mismatch is an error, not a silently different loss.
    """
    ids = (torch.arange(8, device=next(model.parameters()).device) * 7 % vocab).unsqueeze(0)
    mask = torch.ones_like(ids)
    pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    hidden = trunk_of(model)(
        input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False
    ).last_hidden_state
    head = lm_head_of(model)
    ours = torch.nn.functional.linear(
        hidden.float(), head.weight.float(), None if head.bias is None else head.bias.float()
    )
    err = (ours - logits.float()).abs().max().item()
    scale = logits.float().abs().max().item() + 1e-6
    if not err <= 1e-3 * scale + 1e-4:
        raise ValueError(
            f"the {role}'s logits are not final_hidden @ lm_head.weight.T (max difference "
            f"{err:.3g}; the model may scale or soft-cap its logits): use --loss-impl logits"
        )


class DistillLoss:
    """The objective over one rollout; keeps the ``"ema"`` weight normalization's running mean."""

    def __init__(self, cfg, options: dict):
        self.cfg = cfg
        self.options = options
        self.fused = cfg.loss_impl == "fused-linear"
        self.ema_state = torch.full((), float("nan"))

    def __call__(self, student, teacher, rollout: Rollout, teacher_prompt: tuple | None):
        """``(loss, stats)``; stats is None for the sampled reverse KL."""
        s_ids, s_mask, s_pos, labels = sequences_for(
            rollout.prompt_ids, rollout.prompt_mask, rollout, self.cfg.ignore_index
        )
        if teacher_prompt is None:
            t_ids, t_mask, t_pos, t_width = s_ids, s_mask, s_pos, rollout.prompt_ids.shape[1]
        else:
            t_ids, t_mask, t_pos, _ = sequences_for(*teacher_prompt, rollout)
            t_width = teacher_prompt[0].shape[1]
        width, completion = rollout.prompt_ids.shape[1], labels.shape[1]
        opts = dict(self.options)
        if self.cfg.objective == "sampled-reverse-kl":
            s_logits = _logits(student, s_ids, s_mask, s_pos, completion)
            with torch.no_grad():
                t_logits = _logits(teacher, t_ids, t_mask, t_pos, completion)
            loss = renio_kernels.sampled_reverse_kl_loss(
                s_logits,
                t_logits,
                labels,
                temperature=opts["temperature"],
                ignore_index=opts["ignore_index"],
                backend=opts["backend"],
            )
            return loss, None
        if self.ema_state.device != s_ids.device:
            self.ema_state = self.ema_state.to(s_ids.device)
        opts.update(return_stats=True, ema_state=self.ema_state)
        if self.fused:
            s_hidden = _hidden(student, s_ids, s_mask, s_pos, width, completion)
            with torch.no_grad():
                t_hidden = _hidden(teacher, t_ids, t_mask, t_pos, t_width, completion)
            s_head, t_head = lm_head_of(student), lm_head_of(teacher)
            return renio_kernels.fused_linear_renio_loss(
                s_hidden,
                s_head.weight,
                t_hidden,
                t_head.weight,
                labels,
                student_bias=s_head.bias,
                teacher_bias=t_head.bias,
                **opts,
            )
        s_logits = _logits(student, s_ids, s_mask, s_pos, completion)
        with torch.no_grad():
            t_logits = _logits(teacher, t_ids, t_mask, t_pos, completion)
        return renio_kernels.renio_loss(s_logits, t_logits, labels, **opts)
