"""Checks at the public boundary. Each message says what was wrong and how to fix the call."""

from __future__ import annotations

import torch

__all__ = ["FLOAT_DTYPES", "check_logits_inputs", "check_labels_in_range", "last_dim_contiguous"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LABEL_DTYPES = (torch.int64, torch.int32)


def _tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """Views with a unit last stride are used in place; anything else is copied once."""
    return x if x.stride(-1) == 1 else x.contiguous()


def check_float(name: str, x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} has dtype {x.dtype}; supported: float32, float16, bfloat16 "
            f"(cast with {name}.float())"
        )


def check_labels_tensor(labels: torch.Tensor, batch_seq: tuple[int, int], what: str) -> None:
    _tensor("labels", labels)
    if labels.dtype not in LABEL_DTYPES:
        raise ValueError(
            f"labels has dtype {labels.dtype}; expected int64 (or int32) token ids "
            "(use labels.long())"
        )
    if labels.dim() != 2 or tuple(labels.shape) != batch_seq:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but {what} has (B, T) = {batch_seq}; "
            "labels[b, t] is the token predicted at position t (shift before calling)"
        )


def check_logits_inputs(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> None:
    _tensor("student_logits", student)
    _tensor("teacher_logits", teacher)
    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        if x.dim() != 3:
            raise ValueError(
                f"{name} must be (B, T, V), got shape {tuple(x.shape)}; for flat (N, V) "
                "inputs use x.unsqueeze(0) (one sequence) or reshape to (B, T, V)"
            )
        check_float(name, x)
    batch, seq, vocab = student.shape
    if tuple(teacher.shape[:2]) != (batch, seq):
        raise ValueError(
            f"student_logits (B, T) = {(batch, seq)} but teacher_logits (B, T) = "
            f"{tuple(teacher.shape[:2])}; both must score the same positions"
        )
    if vocab == 0:
        raise ValueError("student_logits has an empty vocabulary dimension")
    if teacher.shape[2] < vocab:
        raise ValueError(
            f"teacher vocabulary ({teacher.shape[2]}) is smaller than the student's ({vocab}); "
            "a larger (padded) teacher vocabulary is allowed, a smaller one is not"
        )
    if batch * seq == 0:
        raise ValueError(f"empty batch: (B, T) = {(batch, seq)}")
    check_labels_tensor(labels, (batch, seq), "student_logits")
    check_same_device(student_logits=student, teacher_logits=teacher, labels=labels)


def check_same_device(**tensors: torch.Tensor | None) -> None:
    named = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = named[0]
    for name, x in named[1:]:
        if x.device != first.device:
            raise ValueError(
                f"{name} is on {x.device} but {first_name} is on {first.device}; "
                "move all inputs to one device"
            )


def check_labels_in_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Raise on a label outside ``[0, vocab)`` that is not ``ignore_index``.

    This reads one boolean back from the device (a sync on CUDA); pass ``check_labels=False``
    to skip it, in which case out-of-range labels turn their row's outputs into NaN.
    """
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(
            f"labels contain {first}, outside [0, {vocab}) and not ignore_index "
            f"({ignore_index}); mark padding/prompt positions with ignore_index"
        )


def check_ema_state(weight_norm: str, use_renio: bool, ema_state, module: str) -> None:
    """``weight_norm="ema"`` needs somewhere to keep its running mean."""
    if weight_norm == "ema" and use_renio and ema_state is None:
        raise ValueError(
            f"weight_norm='ema' keeps a running mean across calls: use "
            f"renio_kernels.{module}(weight_norm='ema'), or pass "
            "ema_state=torch.full((), float('nan')) and keep it between calls"
        )
