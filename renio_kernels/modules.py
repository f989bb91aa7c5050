"""``nn.Module`` wrappers that hold the options and the ``"ema"`` running mean."""

from __future__ import annotations

import torch
from torch import nn

from .core.options import ReNIOOptions, call_options
from .core.validation import check_backend, check_chunk_size
from .fused_linear import fused_linear_renio_loss
from .loss import renio_loss, sampled_reverse_kl_loss

__all__ = ["FusedLinearReNIOLoss", "ReNIOLoss", "ReNIOModuleBase", "SampledReverseKLLoss"]


class ReNIOModuleBase(nn.Module):
    """Options and the ``"ema"`` running mean shared by the ReNIO loss modules.

    Takes every field of ``ReNIOOptions`` as a keyword (validated at construction) plus
    ``backend``, ``return_stats`` and ``check_labels``. With ``weight_norm="ema"`` the running mean
    of the batch means lives in the ``ema_mean`` buffer (NaN until the first training call), so it
    follows ``.to(device)`` and survives ``state_dict()`` round trips. In ``eval()`` mode the
    running mean is used but not advanced.
    """

    ema_mean: torch.Tensor

    def __init__(
        self,
        *,
        backend: str = "auto",
        return_stats: bool = False,
        check_labels: bool = True,
        **options,
    ) -> None:
        super().__init__()
        self.options = call_options(**options)
        check_backend(backend)
        self.backend = backend
        self.return_stats = return_stats
        self.check_labels = check_labels
        self.register_buffer("ema_mean", torch.full((), float("nan")))

    def ema_state(self) -> torch.Tensor:
        """The state handed to the loss: the buffer itself when training, a copy in eval mode."""
        return self.ema_mean if self.training else self.ema_mean.clone()

    def loss_kwargs(self) -> dict:
        return dict(
            vars(self.options),
            backend=self.backend,
            return_stats=self.return_stats,
            ema_state=self.ema_state(),
            check_labels=self.check_labels,
        )

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self.options).items())
        return f"{opts}, backend={self.backend!r}"


class ReNIOLoss(ReNIOModuleBase):
    """The ReNIO loss as a module: ``loss = ReNIOLoss(beta=0.5)(student, teacher, labels)``.

    Takes every option of :func:`renio_kernels.renio_loss`; see ``ReNIOModuleBase`` for the
    ``"ema"`` state.
    """

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
    ):
        return renio_loss(student_logits, teacher_logits, labels, **self.loss_kwargs())


class FusedLinearReNIOLoss(ReNIOModuleBase):
    """The fused-linear loss as a module: ``FusedLinearReNIOLoss(beta=0.5)(hs, Ws, ht, Wt, y)``.

    Takes every option of :class:`ReNIOLoss` plus ``chunk_size`` (tokens per chunk; None picks it
    from the vocabulary and hidden sizes). The ``"ema"`` state behaves as in ``ReNIOLoss``.
    """

    def __init__(self, *, chunk_size: int | None = None, **options) -> None:
        super().__init__(**options)
        check_chunk_size(chunk_size)
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
            chunk_size=self.chunk_size,
            **self.loss_kwargs(),
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size!r}"


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
        check_backend(backend)
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
