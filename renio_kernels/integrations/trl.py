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

* the loss is ``renio_loss`` (docs/SPEC.md) on the completion tokens (``completion_mask`` times the
  ``tool_mask`` when there is one), with every SPEC option from the config;
* the fused-linear path (``renio_kernels.fused_linear_renio_loss`` on both models' final hidden
  states, from TRL's ``_get_last_hidden_state``, and ``lm_head`` weights, as TRL's own chunked
  loss does) is used when both models' logits are ``lm_head(final hidden state)``, checked
  numerically once per model when the trainer is built; else both models' logits go to
  ``renio_loss`` (``renio_fused_linear`` forces either; forcing fused-linear on a model that
  soft-caps or scales its logits is a ValueError). The step is
  ``integrations.run.distillation_loss``, shared with ``integrations.hf`` and ``renio-train``.
  The ``lm_head`` is gathered as TRL gathers it for its fused loss: ``full_tensor()`` for FSDP2
  DTensors, ``GatheredParameters`` for DeepSpeed ZeRO-3 (plus one copy kept for our backward,
  which recomputes the logits; see ``integrations.run.gathered_lm_head``), inside the model
  wrapper's forward via TRL's ``_forward_redirection``. Only the unsharded CPU path is tested
  here;
* gradient accumulation (``integrations.steps``): with ``weight_scope="micro_batch"`` (default)
  each micro-batch's loss has its ReNIO weights normalized within that micro-batch (the paper
  trainer's semantics) and the Trainer averages them over the accumulation steps (TRL's own loss
  is instead a token sum over ``num_items_in_batch``, which has no ReNIO meaning); under DDP each
  process normalizes over its own micro-batch and the gradients are averaged. With
  ``weight_scope="global"`` one ``StepNormalizer`` normalizes the weights over every rank and
  micro-batch of the optimizer step and rescales the gradients before the Trainer clips them;
  the logged ``loss`` is the step's;
* the logged metrics are the ReNIO weights' min/max (under the global scope normalized with the
  step's first micro-batch, as the provisional loss is), the mean per-sequence divergence and the
  fraction of pivotal (selected) tokens, instead of TRL's entropy.

The config's ReNIO fields are derived from ``ReNIOOptions`` (``option_fields()``: name, default,
documentation), so a new option appears here without an edit. TRL's own fields ``beta`` and
``temperature`` are SPEC's (``temperature`` also sets the sampling temperature, as in TRL);
``beta`` defaults to SPEC's 0.0 (forward KL) here, not TRL's 1.0. TRL's ``top_k`` is its
sampling top-k, so the loss's ``top_k`` is the field ``renio_top_k`` here (``_CONFIG_NAMES``).
TRL requires student and teacher to share ``vocab_size``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..core.options import ReNIOOptions, option_fields
from ..ops.backends import BACKENDS
from .run import LMAccess, distillation_loss, use_fused_linear
from .steps import TrainerWeightScope

try:
    from trl import DistillationConfig, DistillationTrainer
except ImportError as err:  # pragma: no cover - exercised with trl hidden
    raise ImportError(
        "renio_kernels.integrations.trl needs TRL with its DistillationTrainer (tested with "
        "trl 1.16.0): pip install renio-kernels[trl]"
    ) from err

__all__ = ["ReNIODistillationConfig", "ReNIODistillationTrainer", "config_name"]

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
# How errors name the fused-linear switch.
_NAMES = ("renio_fused_linear=True", "renio_fused_linear=False (or None to fall back)")
# Options whose config field has another name: TRL's own field of that name means something else.
_CONFIG_NAMES = {"top_k": "renio_top_k"}


def config_name(option: str) -> str:
    """The config field of a loss option."""
    return _CONFIG_NAMES.get(option, option)


# What an option's help adds in this config, beyond the record's documentation.
_HELP_EXTRA = {"temperature": "; also TRL's sampling temperature"}


@dataclass
class _ReNIOConfigBase(DistillationConfig):
    """The fields that are not loss options, and the validation."""

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
        return ReNIOOptions(**{f.name: getattr(self, config_name(f.name)) for f in option_fields()})


def _option_help(f: dataclasses.Field) -> str:
    choices = f.metadata["choices"]
    listed = f" (one of {', '.join(map(str, choices))})" if choices else ""
    return f"{f.metadata['doc']}{listed}{_HELP_EXTRA.get(f.name, '')}."


ReNIODistillationConfig = dataclasses.make_dataclass(
    "ReNIODistillationConfig",
    [
        (config_name(f.name), f.type, field(default=f.default, metadata={"help": _option_help(f)}))
        for f in option_fields()
    ],
    bases=(_ReNIOConfigBase,),
    namespace={
        "__doc__": "``DistillationConfig`` plus every ReNIO option (docs/SPEC.md names and "
        "defaults, from ``ReNIOOptions``); ``beta`` and ``temperature`` are TRL's fields with "
        "SPEC's meaning and defaults."
    },
)
ReNIODistillationConfig.__module__ = __name__


class ReNIODistillationTrainer(TrainerWeightScope, DistillationTrainer):
    """``trl.DistillationTrainer`` whose loss is ReNIO's (see the module docstring)."""

    _tag_names = ["trl", "distillation", "renio"]
    _name = "ReNIO Distillation"

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
        if self.renio_options.weight_scope == "global":
            self._renio_check_global()  # before any generation
        self.renio_access = LMAccess(hidden=self._renio_hidden)
        # Both models are checked now (once each), so a forced fused-linear path on a model that
        # post-processes its logits fails before any generation.
        choice = self.args.renio_fused_linear
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        self.renio_fused = use_fused_linear(
            self.model, "student", choice, self.renio_access, _NAMES
        ) and self._forward_redirection(
            self.teacher_model, teacher, use_fused_linear,
            teacher, "teacher", choice, self.renio_access, _NAMES,
        )  # fmt: skip

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
        labels are the completion ids, ``ignore_index`` outside ``completion_mask * tool_mask``."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        ignore = self.renio_options.ignore_index
        labels = inputs["completion_ids"].masked_fill(loss_mask == 0, ignore).long()
        multimodal = {k: inputs[k] for k in _MULTIMODAL_KEYS if k in inputs}
        return input_ids, attention_mask, labels, multimodal

    def _renio_hidden(self, model, keep: int, input_ids, attention_mask, **multimodal):
        """TRL's final hidden states (its backbone choice for VLMs and PEFT models)."""
        return self._get_last_hidden_state(model, input_ids, attention_mask, keep, **multimodal)

    def _renio_loss(self, student, inputs):
        input_ids, attention_mask, labels, multimodal = self.renio_batch(inputs)
        self.teacher_model.eval()
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        scope = self.renio_scope_kwargs(input_ids.device, self.model.training)
        return distillation_loss(
            student,
            teacher,
            labels,
            {"input_ids": input_ids, "attention_mask": attention_mask, **multimodal},
            fused_linear=self.renio_fused,
            access=self.renio_access,
            names=_NAMES,
            # Through the teacher's own wrapper, so FSDP/DeepSpeed materialize its parameters.
            run_teacher=lambda fn: self._forward_redirection(self.teacher_model, teacher, fn),
            backend=self.args.renio_backend,
            return_stats=True,
            check_labels=self.args.renio_check_labels,
            **scope,
        )
