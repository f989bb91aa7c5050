"""The weight scope inside a ``transformers.Trainer``: what ``ReNIOTrainerMixin`` and the TRL
trainer share.

``weight_scope="micro_batch"`` (default, the paper's): each micro-batch's loss has its weights
normalized within that micro-batch and the Trainer averages the micro-batch losses (it divides
each by the number of accumulation steps: ``loss_is_scaled_for_ga`` is False).

``weight_scope="global"``: one ``StepNormalizer`` per trainer (``renio_normalizer``, over the
default process group, which accelerate initializes for data parallelism) receives every
micro-batch's loss; the loss is not divided by the accumulation steps (``loss_is_scaled_for_ga``
is True), and ``training_step`` calls ``finish(model.parameters())`` after the backward of the
step's last micro-batch (``accelerator.sync_gradients``), so the gradients are rescaled after
DDP / FSDP2 have averaged them and before ``_inner_training_loop`` clips them and steps the
optimizer. The step's gradient is then that of one batch holding every sequence of every rank
and micro-batch. ``training_step`` returns 0 for the other micro-batches and
``StepResult.loss`` for the last, so the Trainer's logged ``loss`` is the step's loss.

Under DeepSpeed the optimizer step runs inside ``accelerator.backward``, before any code of the
trainer could rescale the gradients: ``weight_scope="global"`` is a ValueError there.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..core.options import ReNIOOptions
from ..core.step import StepNormalizer, StepResult

__all__ = ["TrainerWeightScope"]


class TrainerWeightScope:
    """Mixin for a ``transformers.Trainer`` subclass holding ``renio_options``: the loss keywords
    of the current call (``renio_scope_kwargs``) and, with ``weight_scope="global"``, the end of
    each optimizer step (``training_step``). See the module docstring.

    ``renio_normalizer``: the ``StepNormalizer`` (made on the first training call over the
    default process group; assign one before training for another data-parallel group).
    ``renio_step_result``: the last step's ``StepResult``. ``renio_ema_state``: the ``"ema"``
    running mean (the normalizer's under the global scope).
    """

    renio_options: ReNIOOptions = ReNIOOptions()
    renio_ema_state: torch.Tensor | None = None
    renio_normalizer: StepNormalizer | None = None
    renio_step_result: StepResult | None = None

    @property
    def loss_is_scaled_for_ga(self) -> bool:
        # Read by Trainer.training_step: False divides each micro-batch loss by the number of
        # accumulation steps (micro_batch scope averages the micro-batch losses); the global
        # scope's normalizer already normalizes over the whole step.
        options = getattr(self, "renio_options", None)
        return options is not None and options.weight_scope == "global"

    def _renio_global(self) -> bool:
        return self.renio_options.weight_scope == "global"

    def renio_scope_kwargs(self, device: torch.device, training: bool) -> dict:
        """``options``, ``ema_state`` and ``normalizer`` for this loss call (``training``: the
        model's mode). In eval mode the global scope computes the per-batch (micro_batch) loss
        and leaves the step untouched; the ``"ema"`` mean is read, not advanced."""
        opts = self.renio_options
        if self.renio_ema_state is None:
            self.renio_ema_state = torch.full((), math.nan, device=device)
        if not self._renio_global():
            ema = self.renio_ema_state if training else self.renio_ema_state.clone()
            return {"options": opts, "ema_state": ema, "normalizer": None}
        if not training:
            opts = dataclasses.replace(opts, weight_scope="micro_batch")
            return {"options": opts, "ema_state": self.renio_ema_state.clone(), "normalizer": None}
        if self.renio_normalizer is None:
            self._renio_check_global()
            self.renio_normalizer = StepNormalizer(ema_state=self.renio_ema_state)
        return {"options": opts, "ema_state": None, "normalizer": self.renio_normalizer}

    def _renio_check_global(self) -> None:
        from accelerate.utils import DistributedType

        accelerator = getattr(self, "accelerator", None)  # None: the mixin outside a Trainer
        if accelerator is not None and accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise ValueError(
                "weight_scope='global' rescales the gradients after the step's last backward, "
                "but under DeepSpeed the optimizer step runs inside accelerator.backward (and "
                "ZeRO keeps the gradients in its own partitions); use weight_scope='micro_batch' "
                "with DeepSpeed, or DDP / FSDP2 for the global scope"
            )

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        norm = self.renio_normalizer
        if norm is None or not norm.pending:
            return loss
        if not self.accelerator.sync_gradients:
            # The step's loss is known only after its last micro-batch: the Trainer sums what
            # training_step returns over the step, so the others count 0.
            return torch.zeros_like(loss)
        result = norm.finish(model.parameters())
        self.renio_step_result = result
        return result.loss.to(device=loss.device, dtype=loss.dtype)
