"""Checks at the public boundary. Each message says what was wrong and how to fix the call."""

from __future__ import annotations

import torch

from ..ops.backends import BACKENDS
from .step import StepNormalizer

__all__ = [
    "require_tensor",
    "check_normalizer",
    "FLOAT_DTYPES",
    "check_backend",
    "check_chunk_size",
    "check_fused_linear_inputs",
    "check_ema_state",
    "check_labels_in_range",
    "check_logits_inputs",
    "is_dtensor",
    "last_dim_contiguous",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LABEL_DTYPES = (torch.int64, torch.int32)


def require_tensor(name: str, x) -> torch.Tensor:
    """A dense, strided tensor (the kernels index memory directly), or a ValueError."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_nested:
        raise ValueError(
            f"{name} is a nested tensor; pad the sequences to one length (B, T, ...) and mark "
            "the padding with ignore_index in labels"
        )
    if x.layout != torch.strided:
        raise ValueError(f"{name} is a {x.layout} tensor; pass a dense one ({name}.to_dense())")
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
    require_tensor("labels", labels)
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
    require_tensor("student_logits", student)
    require_tensor("teacher_logits", teacher)
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


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


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
    if labels.is_meta:
        raise ValueError(
            "labels is on the meta device, so there are no values to check: pass "
            "check_labels=False (e.g. to trace shapes)"
        )
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(
            f"labels contain {first}, outside [0, {vocab}) and not ignore_index "
            f"({ignore_index}); mark padding/prompt positions with ignore_index"
        )


def check_ema_state(opts, ema_state, module: str) -> None:
    """``weight_norm="ema"`` needs somewhere to keep its running mean: a 0-dim float tensor."""
    if ema_state is not None and not (
        isinstance(ema_state, torch.Tensor)
        and ema_state.dim() == 0
        and ema_state.is_floating_point()
    ):
        got = (
            f"a {ema_state.dim()}-dim {ema_state.dtype} tensor"
            if isinstance(ema_state, torch.Tensor)
            else type(ema_state).__name__
        )
        raise ValueError(
            f"ema_state must be a 0-dim floating-point tensor (it is updated in place), got "
            f"{got}; create it with torch.full((), float('nan')) and keep it between calls"
        )
    if opts.weight_scope == "global":
        if ema_state is not None:
            raise ValueError(
                "with weight_scope='global' the 'ema' running mean lives in the StepNormalizer "
                "(its ema_state argument); do not pass ema_state to the loss"
            )
        return
    if opts.weight_norm == "ema" and opts.use_renio and ema_state is None:
        raise ValueError(
            f"weight_norm='ema' keeps a running mean across calls: use "
            f"renio_kernels.{module}(weight_norm='ema'), or pass "
            "ema_state=torch.full((), float('nan')) and keep it between calls"
        )


def check_normalizer(opts, normalizer) -> None:
    """``weight_scope="global"`` needs a ``StepNormalizer``; ``"micro_batch"`` takes none."""
    if opts.weight_scope == "global":
        if not isinstance(normalizer, StepNormalizer):
            got = "none" if normalizer is None else type(normalizer).__name__
            raise ValueError(
                f"weight_scope='global' normalizes the weights over the whole optimizer step and "
                f"needs normalizer=renio_kernels.StepNormalizer() (one per training run; call its "
                f"finish(model.parameters()) after the step's last backward), got {got}"
            )
    elif normalizer is not None:
        raise ValueError(
            "normalizer= is used only with weight_scope='global'; pass weight_scope='global' "
            "to normalize over the step, or drop the normalizer"
        )


def is_dtensor(x: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(x, DTensor)


def _check_side(side: str, hidden, weight, bias, batch_seq: tuple[int, int] | None) -> None:
    names = (f"{side}_hidden", f"{side}_weight", f"{side}_bias")
    for name, x in zip(names, (hidden, weight, bias), strict=True):
        if x is None and name.endswith("bias"):
            continue
        require_tensor(name, x)
        check_float(name, x)
        if is_dtensor(x):
            # An FSDP2 / tensor-parallel shard would silently score a slice of the vocabulary.
            raise ValueError(
                f"{name} is a sharded DTensor ({type(x).__name__}); pass the full tensor "
                f"({name}.full_tensor(), or gather it under FSDP/ZeRO-3), or use "
                "renio_kernels.integrations.hf, which gathers the lm_head for you; for a "
                "tensor-parallel lm_head sharded over the vocabulary, pass each rank's rows to "
                "renio_kernels.vocab_parallel.vocab_parallel_fused_linear_renio_loss"
            )
    if hidden.dim() != 3:
        raise ValueError(
            f"{names[0]} must be (B, T, H), got shape {tuple(hidden.shape)}; for flat (N, H) "
            "hidden states use hidden.unsqueeze(0)"
        )
    if batch_seq is not None and tuple(hidden.shape[:2]) != batch_seq:
        raise ValueError(
            f"student_hidden (B, T) = {batch_seq} but {names[0]} (B, T) = "
            f"{tuple(hidden.shape[:2])}; both must score the same positions"
        )
    width = hidden.shape[2]
    if width == 0:
        raise ValueError(f"{names[0]} has hidden size 0; pass the model's last hidden states")
    if weight.dim() != 2 or weight.shape[1] != width:
        raise ValueError(
            f"{names[1]} must be (V, H) with H = {width} (the last dim of {names[0]}), got "
            f"shape {tuple(weight.shape)}; pass lm_head.weight as stored (vocab x hidden), "
            "not its transpose"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{names[1]} has an empty vocabulary dimension")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(
            f"{names[2]} must be (V,) with V = {weight.shape[0]} (rows of {names[1]}), got "
            f"shape {tuple(bias.shape)}"
        )


def check_fused_linear_inputs(h_s, w_s, h_t, w_t, labels, b_s=None, b_t=None) -> None:
    """Shapes, dtypes and devices of the fused-linear inputs; ValueError saying how to fix."""
    _check_side("student", h_s, w_s, b_s, None)
    batch, seq = h_s.shape[:2]
    _check_side("teacher", h_t, w_t, b_t, (batch, seq))
    if w_t.shape[0] < w_s.shape[0]:
        raise ValueError(
            f"teacher vocabulary ({w_t.shape[0]} rows of teacher_weight) is smaller than the "
            f"student's ({w_s.shape[0]}); a larger (padded) teacher vocabulary is allowed, a "
            "smaller one is not"
        )
    if batch * seq == 0:
        raise ValueError(f"empty batch: (B, T) = {(batch, seq)}")
    check_labels_tensor(labels, (batch, seq), "student_hidden")
    check_same_device(
        student_hidden=h_s,
        student_weight=w_s,
        student_bias=b_s,
        teacher_hidden=h_t,
        teacher_weight=w_t,
        teacher_bias=b_t,
        labels=labels,
    )


def check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None (automatic) or an int >= 1, got {chunk_size!r}")
