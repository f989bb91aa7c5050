"""TRL's on-policy ``DistillationTrainer`` with the ReNIO loss in place of its divergence.

Tested with TRL 1.16.0 (transformers 5.24, torch 2.13), where on-policy distillation is the
stable ``trl.DistillationTrainer`` (``GKDTrainer`` lives on in ``trl.experimental.gkd``; its
``lmbda=1`` setting is this trainer). Usage::

    from renio_kernels.integrations.trl import ReNIODistillationConfig, ReNIODistillationTrainer

    args = ReNIODistillationConfig(output_dir="out", beta=0.0, token_clip=0.05)  # SPEC options
    trainer = ReNIODistillationTrainer(model=student, teacher_model=teacher, args=args,
                                       train_dataset=prompts, processing_class=tokenizer)
    trainer.train()

Everything else (on-policy generation, vLLM, tools, PEFT, DeepSpeed/FSDP setup) is TRL's. What
changes is ``compute_loss``:

* the loss is ``renio_loss`` (SPEC.md) on the completion tokens (``completion_mask`` times the
  ``tool_mask`` when there is one), with every SPEC option from the config;
* the fused-linear path (``renio_kernels.fused_linear_renio_loss`` on both models' final hidden
  states and ``lm_head`` weights, as TRL's own chunked loss does) is used when it exists and both
  heads are plain linear maps, else both models' logits go to ``renio_loss``
  (``renio_fused_linear`` forces either). The ``lm_head`` is gathered as TRL gathers it for its
  fused loss: ``full_tensor()`` for FSDP2 DTensors, ``GatheredParameters`` for DeepSpeed ZeRO-3
  (plus one copy kept for our backward, which recomputes the logits; see
  ``integrations.hf.gathered_lm_head``), inside the model wrapper's forward via TRL's
  ``_forward_redirection``. Only the unsharded CPU path is tested here;
* gradient accumulation: each micro-batch's loss has its ReNIO weights normalized within that
  micro-batch (the paper trainer's semantics); ``loss_is_scaled_for_ga = False`` makes the Trainer
  average them over the accumulation steps (TRL's own loss is instead a token sum over
  ``num_items_in_batch``, which has no ReNIO meaning). Under DDP each process normalizes over
  its own micro-batch and the gradients are averaged;
* the logged metrics are the ReNIO weights' min/max, the mean per-sequence divergence and the
  fraction of pivotal (selected) tokens, instead of TRL's entropy.

TRL's config fields ``beta`` and ``temperature`` are SPEC's (``temperature`` also sets the
sampling temperature, as in TRL); ``beta`` defaults to SPEC's 0.0 (forward KL) here, not TRL's
1.0. TRL requires student and teacher to share ``vocab_size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..core.options import ReNIOOptions
from ..loss import renio_loss
from ..ops.backends import BACKENDS
from .hf import _fused_loss, fused_linear_supported, gathered_lm_head

try:
    from trl import DistillationConfig, DistillationTrainer
except ImportError as err:  # pragma: no cover - exercised with trl hidden
    raise ImportError(
        "renio_kernels.integrations.trl needs TRL with its DistillationTrainer (tested with "
        "trl 1.16.0): pip install renio-kernels[trl]"
    ) from err

__all__ = ["ReNIODistillationConfig", "ReNIODistillationTrainer"]

_MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


@dataclass
class ReNIODistillationConfig(DistillationConfig):
    """``DistillationConfig`` plus every ReNIO option (SPEC.md names and defaults).

    ``beta`` and ``temperature`` are TRL's fields with SPEC's meaning; the rest are added.
    """

    beta: float = field(
        default=0.0,
        metadata={"help": "0: forward KL(teacher||student), 1: reverse KL, between: JSD."},
    )
    token_clip: float | None = field(
        default=None,
        metadata={"help": "Clamp each element's divergence term to [0, token_clip] (paper: 0.05)."},
    )
    use_renio: bool = field(
        default=True, metadata={"help": "False: plain on-policy distillation (all weights 1)."}
    )
    ratio_clip: float | None = field(
        default=2.5, metadata={"help": "Upper clip of the sampled-token log ratio (kd_clamp)."}
    )
    threshold: float = field(
        default=0.8, metadata={"help": "Tokens with log ratio >= threshold are pivotal."}
    )
    weight_temperature: float = field(
        default=1.0, metadata={"help": "e_b = exp(rbar_b / weight_temperature) (kd_sgo_tem)."}
    )
    weight_norm: str = field(
        default="batch_mean",
        metadata={"help": "ReNIO weight normalization: batch_mean, clamp, none or ema."},
    )
    renio_backend: str = field(
        default="auto", metadata={"help": "Row-kernel backend: auto, triton, torch or cpu."}
    )
    renio_fused_linear: bool | None = field(
        default=None,
        metadata={"help": "True/False forces the fused-linear/logits path; None picks."},
    )
    renio_check_labels: bool = field(
        default=False,
        metadata={"help": "Check completion ids against the vocabulary (one host sync)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.renio_options()
        if self.renio_backend not in BACKENDS:
            raise ValueError(
                f"unknown renio_backend {self.renio_backend!r}; expected one of {BACKENDS}"
            )

    def renio_options(self) -> ReNIOOptions:
        """The validated ReNIO options (ValueError with the fix on a bad value)."""
        return ReNIOOptions(
            beta=float(self.beta),
            temperature=float(self.temperature),
            token_clip=self.token_clip,
            use_renio=self.use_renio,
            ratio_clip=self.ratio_clip,
            threshold=self.threshold,
            weight_temperature=self.weight_temperature,
            weight_norm=self.weight_norm,
        )


class ReNIODistillationTrainer(DistillationTrainer):
    """``trl.DistillationTrainer`` whose loss is ReNIO's (see the module docstring)."""

    _tag_names = ["trl", "distillation", "renio"]
    _name = "ReNIO Distillation"
    loss_is_scaled_for_ga = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, ReNIODistillationConfig):
            raise TypeError(
                "ReNIODistillationTrainer needs args=ReNIODistillationConfig(...), got "
                f"{type(self.args).__name__}"
            )
        if self.teacher_model is None:
            raise ValueError("ReNIODistillationTrainer needs a teacher_model")
        self.renio_options = self.args.renio_options()
        self.renio_ema_state = torch.full((), math.nan, device=self.accelerator.device)
        fused_ok = _fused_loss() is not None and all(
            fused_linear_supported(m) for m in (self.model, self.teacher_model)
        )
        if self.args.renio_fused_linear and not fused_ok:
            raise ValueError(
                "renio_fused_linear=True needs renio_kernels.fused_linear_renio_loss and models "
                "whose logits are lm_head(last_hidden_state) (no logit scaling/softcapping); "
                "set renio_fused_linear=None to fall back to the logits path"
            )
        choice = self.args.renio_fused_linear
        self.renio_fused = fused_ok if choice is None else bool(choice)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        unwrapped = self.accelerator.unwrap_model(model)
        loss, stats = self._forward_redirection(
            model, unwrapped, self._renio_loss, unwrapped, inputs
        )
        # Gathered after the wrapped forward returns, as TRL does for its entropy metric.
        mode = "train" if self.model.training else "eval"
        weights = self.accelerator.gather_for_metrics(stats["weights"])
        divergence = self.accelerator.gather_for_metrics(stats["divergence"])
        selected = self.accelerator.gather_for_metrics(stats["selected"].float().mean().view(1))
        metrics = self._metrics[mode]
        metrics["renio/weight_min"].append(weights.min().item())
        metrics["renio/weight_max"].append(weights.max().item())
        metrics["renio/divergence"].append(divergence.mean().item())
        metrics["renio/selected_frac"].append(selected.mean().item())
        return (loss, None) if return_outputs else loss

    def renio_batch(self, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """``(input_ids, attention_mask, labels (B, K), multimodal)`` of one micro-batch; the
        labels are the completion ids, -100 outside ``completion_mask * tool_mask``."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        labels = inputs["completion_ids"].masked_fill(loss_mask == 0, -100).long()
        multimodal = {k: inputs[k] for k in _MULTIMODAL_KEYS if k in inputs}
        return input_ids, attention_mask, labels, multimodal

    def _logits(self, model, input_ids, attention_mask, keep: int, **multimodal):
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        if "logits_to_keep" in self.model_kwarg_keys:
            kwargs["logits_to_keep"] = keep + 1
        logits = model(**kwargs, **multimodal).logits
        return logits[:, :-1][:, -keep:]

    def _renio_loss(self, student, inputs):
        input_ids, attention_mask, labels, multimodal = self.renio_batch(inputs)
        keep = labels.shape[1]
        self.teacher_model.eval()
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        side = self._get_last_hidden_state if self.renio_fused else self._logits
        student_out = side(student, input_ids, attention_mask, keep, **multimodal)
        with torch.no_grad():
            # Through the teacher's own wrapper, so FSDP/DeepSpeed materialize its parameters.
            teacher_out = self._forward_redirection(
                self.teacher_model, teacher, side, teacher, input_ids, attention_mask, keep,
                **multimodal,
            )  # fmt: skip
        training = self.model.training
        kw = dict(
            vars(self.renio_options),
            backend=self.args.renio_backend,
            return_stats=True,
            ema_state=self.renio_ema_state if training else self.renio_ema_state.clone(),
            check_labels=self.args.renio_check_labels,
        )
        if not self.renio_fused:
            return renio_loss(student_out, teacher_out, labels.to(student_out.device), **kw)
        s_head = student.get_output_embeddings()
        t_head = teacher.get_output_embeddings()
        device = s_head.weight.device
        with (
            gathered_lm_head(s_head.weight, s_head.bias, grad=True) as (w_s, b_s),
            gathered_lm_head(t_head.weight, t_head.bias, grad=False) as (w_t, b_t),
        ):
            return _fused_loss()(
                student_out.to(device),
                w_s,
                teacher_out.to(device),
                w_t.to(device),
                labels.to(device),
                student_bias=b_s,
                teacher_bias=None if b_t is None else b_t.to(device),
                **kw,
            )
