"""``nn.Module`` wrappers that hold the options and the ``"ema"`` running mean."""

from __future__ import annotations

import torch
from torch import nn

from .core.options import ReNIOOptions, call_options
from .core.step import StepNormalizer, StepResult
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

    With ``weight_scope="global"`` the module holds a ``StepNormalizer`` (``normalizer``: pass
    one, e.g. with a process group, or a default one is made over the default group): call
    ``finish(model.parameters())`` once per optimizer step, after the last backward. In
    ``eval()`` mode it computes the per-batch loss (``weight_scope="micro_batch"``, with the
    current ``"ema"`` mean) and leaves the step untouched.
    """

    ema_mean: torch.Tensor

    def __init__(
        self,
        *,
        backend: str = "auto",
        return_stats: bool = False,
        check_labels: bool = True,
        normalizer: StepNormalizer | None = None,
        **options,
    ) -> None:
        super().__init__()
        self.options = call_options(**options)
        check_backend(backend)
        self.backend = backend
        self.return_stats = return_stats
        self.check_labels = check_labels
        self.register_buffer("ema_mean", torch.full((), float("nan")))
        self._owns_normalizer = self.options.weight_scope == "global" and normalizer is None
        if self._owns_normalizer:
            normalizer = StepNormalizer(ema_state=self.ema_mean)
        self.normalizer = normalizer

    def ema_state(self) -> torch.Tensor:
        """The state handed to the loss: the buffer itself when training, a copy in eval mode."""
        return self.ema_mean if self.training else self.ema_mean.clone()

    def finish(self, parameters=()) -> StepResult:
        """``weight_scope="global"``: end the optimizer step (see ``StepNormalizer.finish``)."""
        if self.normalizer is None:
            raise RuntimeError(
                "finish() ends an optimizer step of weight_scope='global'; this module was "
                f"built with weight_scope={self.options.weight_scope!r}"
            )
        return self.normalizer.finish(parameters)

    def loss_kwargs(self) -> dict:
        opts = vars(self.options)
        scope = {"ema_state": self.ema_state(), "normalizer": None}
        if self.options.weight_scope == "global":
            if self.training:
                if self._owns_normalizer:  # ``.to()`` and ``load_state_dict`` replace the buffer
                    self.normalizer.ema_mean = self.ema_mean
                scope = {"ema_state": None, "normalizer": self.normalizer}
            else:
                opts = dict(opts, weight_scope="micro_batch")
        return dict(
            opts,
            backend=self.backend,
            return_stats=self.return_stats,
            check_labels=self.check_labels,
            **scope,
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
