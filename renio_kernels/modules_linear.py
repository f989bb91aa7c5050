"""``FusedLinearReNIOLoss``: the fused-linear loss as an ``nn.Module`` holding the ema state."""

from __future__ import annotations

import torch

from .fused_linear import fused_linear_renio_loss
from .modules import ReNIOModuleBase

__all__ = ["FusedLinearReNIOLoss"]


class FusedLinearReNIOLoss(ReNIOModuleBase):
    """The fused-linear loss as a module: ``FusedLinearReNIOLoss(beta=0.5)(hs, Ws, ht, Wt, y)``.

    Takes every option of :class:`renio_kernels.ReNIOLoss` plus ``chunk_size`` (tokens per chunk;
    None picks it from the vocabulary and hidden sizes). The ``"ema"`` state behaves as in
    ``ReNIOLoss`` (``ReNIOModuleBase``).
    """

    def __init__(self, *, chunk_size: int | None = None, **options) -> None:
        super().__init__(**options)
        self.chunk_size = chunk_size

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        labels: torch.Tensor,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
    ):
        return fused_linear_renio_loss(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            labels,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            **vars(self.options),
            backend=self.backend,
            return_stats=self.return_stats,
            ema_state=self.ema_state(),
            check_labels=self.check_labels,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size!r}"
