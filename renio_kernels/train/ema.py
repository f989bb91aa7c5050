"""``--mode opsd --teacher-ema DECAY``: the self-distillation teacher as an exponential moving
average of the student's weights.

The teacher starts as a copy of the student and, after every optimizer step, each of its
trainable weights becomes ``DECAY * teacher + (1 - DECAY) * student`` (no gradient). Only the
student's trainable parameters are averaged (all weights, or the LoRA adapters); the others never
change, so the teacher's copies of them stay equal to the student's.

The average accumulates in fp32. The script loads the models in fp32 (``--bf16`` is autocast
only), so the teacher's own weights are the accumulator and no third copy exists; for weights
stored in another dtype an fp32 shadow is kept and the teacher's weights are its rounding.

Under ``torchrun`` every rank holds the same parameters after each step (the gradients are
all-reduced before the identical AdamW step), so each rank's average, a deterministic function of
those parameters, is bit-identical too: nothing is communicated.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TeacherEMA"]


class TeacherEMA:
    """Keeps ``teacher`` (a copy of ``student`` made at the start) the EMA of ``student``."""

    def __init__(self, student: nn.Module, teacher: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the EMA teacher's decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        teacher_params = dict(teacher.named_parameters())
        # (student parameter, teacher parameter, fp32 shadow or None: the teacher's own weight
        # accumulates) per averaged weight
        self._tracked: dict[str, tuple[nn.Parameter, nn.Parameter, torch.Tensor | None]] = {}
        for name, s in student.named_parameters():
            if not s.requires_grad:
                continue
            t = teacher_params.get(name)
            if t is None or t.shape != s.shape:
                raise ValueError(
                    f"the EMA teacher must be a copy of the student: its parameter {name!r} "
                    f"is {'missing' if t is None else tuple(t.shape)}"
                )
            if t.requires_grad:
                raise ValueError("the EMA teacher takes no gradient: call requires_grad_(False)")
            shadow = None if t.dtype == torch.float32 else t.detach().float()
            self._tracked[name] = (s, t, shadow)

    @torch.no_grad()
    def update(self) -> None:
        """``teacher <- decay * teacher + (1 - decay) * student``, after an optimizer step."""
        for s, t, shadow in self._tracked.values():
            acc = t if shadow is None else shadow
            acc.mul_(self.decay).add_(s.detach().float(), alpha=1.0 - self.decay)
            if shadow is not None:
                t.copy_(shadow)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fp32 averages by parameter name (what a checkpoint holds)."""
        return {
            name: (t if shadow is None else shadow).detach().cpu().clone()
            for name, (_, t, shadow) in self._tracked.items()
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Restore the averages (and the teacher's weights) exactly; ValueError naming ``where``
        when they are not this student's."""
        if set(state) != set(self._tracked):
            diff = sorted(set(state) ^ set(self._tracked))
            raise ValueError(
                f"{where}: the EMA teacher there does not match this model (e.g. {diff[:2]}); "
                "resume with the run's own config"
            )
        for name, (_, t, shadow) in self._tracked.items():
            value = state[name]
            if value.shape != t.shape or value.dtype != torch.float32:
                raise ValueError(
                    f"{where}: the EMA teacher's {name!r} is {tuple(value.shape)} "
                    f"{value.dtype}, expected {tuple(t.shape)} float32"
                )
            if shadow is not None:
                shadow.copy_(value)
            t.copy_(value)
