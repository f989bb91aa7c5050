"""``FusedLinearReNIOLoss``: the fused-linear loss as an ``nn.Module`` holding the ema state."""

from __future__ import annotations

import torch
from torch import nn

from .fused_linear import fused_linear_renio_loss
from .weights import ReNIOOptions

__all__ = ["FusedLinearReNIOLoss"]


class FusedLinearReNIOLoss(nn.Module):
    """The fused-linear loss as a module: ``FusedLinearReNIOLoss(beta=0.5)(hs, Ws, ht, Wt, y)``.

    Takes every option of :func:`renio_kernels.fused_linear_renio_loss`. As in ``ReNIOLoss``, with
    ``weight_norm="ema"`` the running mean lives in the ``ema_mean`` buffer (NaN until the first
    training call): it follows ``.to(device)``, survives ``state_dict()`` round trips, and is used
    but not advanced in ``eval()`` mode.
    """

    ema_mean: torch.Tensor

    def __init__(
        self,
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
        check_labels: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.options = ReNIOOptions(
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
        self.backend = backend
        self.return_stats = return_stats
        self.check_labels = check_labels
        self.chunk_size = chunk_size
        self.register_buffer("ema_mean", torch.full((), float("nan")))

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
            ema_state=self.ema_mean if self.training else self.ema_mean.clone(),
            check_labels=self.check_labels,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self.options).items())
        return f"{opts}, backend={self.backend!r}, chunk_size={self.chunk_size!r}"
