"""Run the student and the teacher on one batch, then the ReNIO loss: the step that
``integrations.hf``, ``integrations.trl`` and ``train.distill`` share.

``distillation_loss`` runs the teacher (under ``no_grad``) and the student over the positions
that predict the last ``K`` tokens of each sequence (``labels`` is ``(B, K)``; position
``L - 1 - K + t`` of a length-``L`` input predicts ``labels[:, t]``), then either

* the **fused-linear** path: both models' final hidden states and ``lm_head`` weights go to
  ``fused_linear_renio_loss``, so the ``(B, K, V)`` logits are never stored, or
* the **logits** path: both models' logits go to ``renio_loss``.

What differs between callers is passed in, not re-implemented: how a model's hidden states,
logits and output layer are obtained (``LMAccess``; ``HF_ACCESS`` for ``transformers`` causal
LMs, optionally PEFT-wrapped), each model's inputs (e.g. ``position_ids``, multimodal tensors,
a teacher prompt that differs from the student's), the wrapper the teacher runs inside
(``run_teacher``), and how the caller names its fused-linear switch in errors (``names``).

Exactness. The fused path computes ``final_hidden @ lm_head.weight.T + bias``; a model that
post-processes its logits (soft caps, logit scales, ...) does not produce that. Instead of
guessing from config names, ``fused_linear_mismatch`` proves it numerically: it runs the model
on a short probe input through both paths and compares. ``use_fused_linear`` caches the answer
per model object (weakly), so each model is probed once. A mismatch is a ValueError naming the
logits path when the caller forced fused-linear, and a silent fall-back to the logits path when
it left the choice open.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.options import ReNIOOptions
from ..fused_linear import fused_linear_renio_loss
from ..loss import renio_loss

__all__ = [
    "HF_ACCESS",
    "LMAccess",
    "NotFusable",
    "backbone_hidden",
    "causal_logits",
    "distillation_loss",
    "fused_linear_mismatch",
    "gathered_lm_head",
    "output_layer",
    "use_fused_linear",
]


class NotFusable(ValueError):
    """Raised by an ``LMAccess`` function for a model the fused-linear path cannot use."""


def _core(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (whose LoRA layers stay in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone_hidden(model: nn.Module, keep: int, **inputs) -> torch.Tensor:
    """``(B, keep, H)``: the backbone's final hidden states (final norm included) at the
    positions that predict the last ``keep`` tokens."""
    core = _core(model)
    backbone = core.base_model
    if backbone is core:
        raise NotFusable(f"{type(core).__name__} has no backbone model apart from its lm_head")
    out = backbone(**inputs, use_cache=False)
    return out.last_hidden_state[:, :-1][:, -keep:]


def causal_logits(model: nn.Module, keep: int, **inputs) -> torch.Tensor:
    """``(B, keep, V)``: the model's logits at the same positions (only those computed when the
    model takes ``logits_to_keep``)."""
    kwargs: dict[str, Any] = dict(inputs, use_cache=False)
    if "logits_to_keep" in inspect.signature(_core(model).forward).parameters:
        kwargs["logits_to_keep"] = keep + 1
    return model(**kwargs).logits[:, :-1][:, -keep:]


def output_layer(model: nn.Module) -> nn.Module:
    return _core(model).get_output_embeddings()


@dataclass(frozen=True)
class LMAccess:
    """How a caller gets at a causal LM: ``hidden(model, keep, **inputs)`` and
    ``logits(model, keep, **inputs)`` as ``backbone_hidden`` / ``causal_logits`` (same
    positions), ``head(model)`` its output layer."""

    hidden: Callable[..., torch.Tensor] = backbone_hidden
    logits: Callable[..., torch.Tensor] = causal_logits
    head: Callable[[nn.Module], nn.Module] = output_layer


HF_ACCESS = LMAccess()


def _is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_status") and hasattr(p, "ds_shape")


@contextlib.contextmanager
def gathered_lm_head(weight: torch.Tensor, bias: torch.Tensor | None, *, grad: bool):
    """Yield ``(weight, bias)`` as full tensors usable after the block, gradients flowing back.

    Plain tensors pass through. DTensors (FSDP2) are gathered with ``full_tensor()``. DeepSpeed
    ZeRO-3 parameters are gathered for the block and copied (``clone`` keeps the autograd edge to
    the parameter, whose ZeRO-3 hooks then reduce-scatter the gradient). ``grad=False`` detaches.
    """
    params = [p for p in (weight, bias) if p is not None]
    if any(_is_zero3_param(p) for p in params):
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        # A parameter already AVAILABLE (a tied embedding inside its own module's forward) must
        # not be gathered again: releasing it on exit would collide with that module's tracking.
        todo = {id(p): p for p in params if p.ds_status != ZeroParamStatus.AVAILABLE}
        ctx = deepspeed.zero.GatheredParameters(list(todo.values()), modifier_rank=None)
        with ctx if todo else contextlib.nullcontext():
            yield tuple(None if p is None else _keep(p.clone(), grad) for p in (weight, bias))
        return
    dtensor = getattr(getattr(torch.distributed, "tensor", None), "DTensor", None)
    out = []
    for p in (weight, bias):
        if p is not None and dtensor is not None and isinstance(p, dtensor):
            p = p.full_tensor()
        out.append(None if p is None else _keep(p, grad))
    yield tuple(out)


def _keep(p: torch.Tensor, grad: bool) -> torch.Tensor:
    return p if grad else p.detach()


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Dropout off for the probe; every submodule's own mode restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


_PROBE_TOKENS = 8


@torch.no_grad()
def fused_linear_mismatch(model: nn.Module, access: LMAccess = HF_ACCESS) -> str | None:
    """None when ``model``'s logits are ``final_hidden @ head.weight.T (+ bias)``, else why not.

    Checked numerically on a short probe input (eval mode, no gradient, autocast off): the head
    must be an ``nn.Linear``, and its product with the hidden states must match the model's own
    logits to ``(1e-3 + 2 eps) * max|logits|`` (``eps`` of the logits' dtype, so a bf16 model's
    rounding passes while a soft cap or logit scale at realistic logit magnitudes does not).
    """
    head = access.head(model)
    if not isinstance(head, nn.Linear):
        return f"its output layer is a {type(head).__name__}, not a torch.nn.Linear"
    steps = torch.arange(_PROBE_TOKENS, device=head.weight.device)
    ids = ((steps * 7 + 3) % head.out_features).unsqueeze(0)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    keep = _PROBE_TOKENS - 1
    with _eval_mode(model), torch.autocast(head.weight.device.type, enabled=False):
        try:
            hidden = access.hidden(model, keep, **inputs)
        except NotFusable as err:
            return str(err)
        raw = access.logits(model, keep, **inputs)
        with gathered_lm_head(head.weight, head.bias, grad=False) as (w, b):
            w, b = (None if p is None else p.to(hidden.device, torch.float32) for p in (w, b))
            ours = nn.functional.linear(hidden.float(), w, b)
    logits = raw.float()
    if ours.shape != logits.shape:
        return f"hidden @ weight.T has shape {tuple(ours.shape)}, the logits {tuple(logits.shape)}"
    err = (ours - logits).abs().max().item()
    scale = logits.abs().max().item()
    rtol = 1e-3 + 2 * torch.finfo(raw.dtype).eps
    if err <= rtol * scale + 1e-4:
        return None
    return f"on a probe input they differ by up to {err:.3g} (max |logit| {scale:.3g})"


# model -> fused_linear_mismatch(model): each model is probed once.
_MISMATCH: weakref.WeakKeyDictionary[nn.Module, str | None] = weakref.WeakKeyDictionary()

HF_NAMES = ("fused_linear=True", "fused_linear=False (or None to fall back automatically)")


def use_fused_linear(
    model: nn.Module,
    role: str,
    fused_linear: bool | None,
    access: LMAccess = HF_ACCESS,
    names: tuple[str, str] = HF_NAMES,
) -> bool:
    """Whether ``model`` (the ``role``) may take the fused-linear path.

    ``fused_linear=False``: no. Otherwise ``fused_linear_mismatch`` decides (cached per model):
    a mismatch is False under ``None`` and a ValueError under ``True``, whose message names the
    caller's switch ``names = (how fused-linear was forced, how to choose the logits path)``.
    """
    if fused_linear is not None and not fused_linear:
        return False
    if model not in _MISMATCH:
        _MISMATCH[model] = fused_linear_mismatch(model, access)
    reason = _MISMATCH[model]
    if reason is None:
        return True
    if fused_linear:
        forced, logits_path = names
        raise ValueError(
            f"{forced} needs the {role}'s logits to be its final hidden state @ lm_head.weight.T "
            f"(+ bias), and they are not: {reason} (the model may scale or soft-cap its "
            f"logits); use {logits_path}"
        )
    return False


def distillation_loss(
    student: nn.Module,
    teacher: nn.Module,
    labels: torch.Tensor,
    student_inputs: dict[str, Any],
    teacher_inputs: dict[str, Any] | None = None,
    *,
    options: ReNIOOptions,
    fused_linear: bool | None,
    access: LMAccess = HF_ACCESS,
    names: tuple[str, str] = HF_NAMES,
    run_teacher: Callable[[Callable[[], Any]], Any] | None = None,
    **loss_kw,
):
    """The ReNIO loss of ``student`` against ``teacher`` (see the module docstring).

    Args:
        student, teacher: unwrapped models; the teacher runs under ``no_grad``.
        labels: ``(B, K)`` token ids of the last ``K`` positions, ``options.ignore_index`` where
            there is no loss; moved to the loss's device.
        student_inputs: keyword arguments of the student's forward (``input_ids``,
            ``attention_mask``, ...); ``teacher_inputs`` the teacher's (default: the same).
        options: the loss options; ``fused_linear``: True forces the fused-linear path,
            False the logits path, None picks fused-linear when both models pass the check.
        access, names: see ``LMAccess`` and ``use_fused_linear``.
        run_teacher: calls its argument inside the teacher's wrapper (DDP/FSDP/DeepSpeed), so the
            wrapper's hooks materialize its parameters; default: a plain call.
        loss_kw: ``backend``, ``return_stats``, ``ema_state``, ``check_labels`` of the loss.
    """
    keep = labels.shape[1]
    t_inputs = student_inputs if teacher_inputs is None else teacher_inputs
    student_fused = use_fused_linear(student, "student", fused_linear, access, names)

    def teacher_side():
        with torch.no_grad():
            fused = student_fused and use_fused_linear(
                teacher, "teacher", fused_linear, access, names
            )
            side = access.hidden if fused else access.logits
            return fused, side(teacher, keep, **t_inputs)

    fused, teacher_out = run_teacher(teacher_side) if run_teacher else teacher_side()
    kw = dict(vars(options), **loss_kw)
    if not fused:
        logits = access.logits(student, keep, **student_inputs)
        device = logits.device
        return renio_loss(logits, teacher_out.to(device), labels.to(device), **kw)
    hidden = access.hidden(student, keep, **student_inputs)
    s_head, t_head = access.head(student), access.head(teacher)
    with (
        gathered_lm_head(s_head.weight, s_head.bias, grad=True) as (w_s, b_s),
        gathered_lm_head(t_head.weight, t_head.bias, grad=False) as (w_t, b_t),
    ):
        device = w_s.device
        return fused_linear_renio_loss(
            hidden.to(device),
            w_s,
            teacher_out.to(device),
            w_t.to(device),
            labels.to(device),
            student_bias=b_s,
            teacher_bias=None if b_t is None else b_t.to(device),
            **kw,
        )
