"""``nn.Module`` wrappers that hold the options and the ``"ema"`` running mean."""

from __future__ import annotations

import torch
from torch import nn

from .loss import renio_loss, sampled_reverse_kl_loss
from .weights import ReNIOOptions

__all__ = ["ReNIOLoss", "ReNIOModuleBase", "SampledReverseKLLoss"]


class ReNIOModuleBase(nn.Module):
    """Options and the ``"ema"`` running mean shared by the ReNIO loss modules.

    With ``weight_norm="ema"`` the running mean of the batch means lives in the ``ema_mean``
    buffer (NaN until the first training call), so it follows ``.to(device)`` and survives
    ``state_dict()`` round trips. In ``eval()`` mode the running mean is used but not advanced.
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
        self.register_buffer("ema_mean", torch.full((), float("nan")))

    def ema_state(self) -> torch.Tensor:
        """The state handed to the loss: the buffer itself when training, a copy in eval mode."""
        return self.ema_mean if self.training else self.ema_mean.clone()

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self.options).items())
        return f"{opts}, backend={self.backend!r}"


class ReNIOLoss(ReNIOModuleBase):
    """The ReNIO loss as a module: ``loss = ReNIOLoss(beta=0.5)(student, teacher, labels)``.

    Takes every option of :func:`renio_kernels.renio_loss`; see ``ReNIOModuleBase`` for the
    ``"ema"`` state.
    """

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor,
    ):
        return renio_loss(
            student_logits,
            teacher_logits,
            labels,
            **vars(self.options),
            backend=self.backend,
            return_stats=self.return_stats,
            ema_state=self.ema_state(),
            check_labels=self.check_labels,
        )


class SampledReverseKLLoss(nn.Module):
    """Module form of :func:`renio_kernels.sampled_reverse_kl_loss`."""

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        ignore_index: int = -100,
        backend: str = "auto",
        check_labels: bool = True,
    ) -> None:
        super().__init__()
        ReNIOOptions(temperature=temperature, ignore_index=ignore_index)
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.backend = backend
        self.check_labels = check_labels

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        return sampled_reverse_kl_loss(
            student_logits,
            teacher_logits,
            labels,
            temperature=self.temperature,
            ignore_index=self.ignore_index,
            backend=self.backend,
            check_labels=self.check_labels,
        )
