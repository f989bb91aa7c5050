"""Shared test utilities: inputs, the float64 oracle call, tolerances."""

from __future__ import annotations

import os

import torch

from renio_kernels import reference

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
# Triton runs on CUDA tensors when a GPU is present, else on CPU tensors through the interpreter.
DEVICE = "cuda" if HAS_CUDA and not INTERPRET else "cpu"
TRITON_DTYPES = (
    (torch.float32, torch.float16)
    if DEVICE == "cpu"
    else (
        torch.float32,
        torch.float16,
        torch.bfloat16,
    )
)

# Tolerances against a float64 reference built from the same low-precision inputs.
LOSS_RTOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 2e-2}
LINEAR_GRAD_RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def make_inputs(
    batch: int = 2,
    seq: int = 5,
    vocab: int = 37,
    teacher_vocab: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    scale: float = 2.0,
    ignore: str = "some",
    ignore_index: int = -100,
    seed: int = 0,
):
    """Random student/teacher logits and labels; ``ignore`` in none/some/row/all."""
    g = torch.Generator().manual_seed(seed)
    tv = teacher_vocab or vocab
    s = (torch.randn(batch, seq, vocab, generator=g) * scale).to(dtype)
    # A teacher correlated with the student, so some sampled tokens cross the ReNIO threshold.
    t = torch.randn(batch, seq, tv, generator=g) * scale
    t[..., :vocab] = 0.5 * t[..., :vocab] + 0.7 * s.float()
    t = t.to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    if ignore == "some":
        labels[0, : max(1, seq // 3)] = ignore_index
        if batch > 1:
            labels[-1, -1] = ignore_index
    elif ignore == "row":
        labels[0] = ignore_index
    elif ignore == "all":
        labels[:] = ignore_index
    return s.to(device), t.to(device), labels.to(device)


def ref_loss_and_grad(s, t, labels, grad_scale=1.0, **kw):
    """Float64 reference loss and student gradient (of ``grad_scale * loss``)."""
    s64 = s.detach().double().cpu().requires_grad_()
    out = reference.renio_loss(s64, t.detach().double().cpu(), labels.cpu(), **kw)
    loss = out[0] if isinstance(out, tuple) else out
    (loss * grad_scale).backward()
    return out, s64.grad


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x = x.detach().double().cpu()
    ref = ref.detach().double().cpu()
    denom = ref.norm()
    if denom == 0:
        return float((x - ref).norm())
    return float((x - ref).norm() / denom)


def assert_parity(loss, grad, ref, ref_grad, dtype: torch.dtype) -> None:
    """The loss in fp32 and the gradient in the logits' dtype, finite, each within the dtype's
    tolerance of the float64 reference."""
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert torch.isfinite(grad).all()
    assert rel_err(loss, ref) <= LOSS_RTOL[dtype], (float(loss), float(ref))
    assert rel_err(grad, ref_grad) <= GRAD_RTOL[dtype]


def assert_compiled_matches_eager(fn, s: torch.Tensor, grad_scale: float = 1.7) -> None:
    """``torch.compile(fn, backend="aot_eager")`` gives eager's loss and gradient (of
    ``grad_scale * fn(x)`` at ``x = s``)."""

    def grads(f):
        x = s.clone().requires_grad_()
        loss = f(x)
        (loss * grad_scale).backward()
        return loss.detach(), x.grad

    torch._dynamo.reset()
    for got, want in zip(grads(torch.compile(fn, backend="aot_eager")), grads(fn), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def _core_backends() -> list:
    """Backends the core parity suite runs: torch and triton everywhere, plus the native CPU
    kernel when the tensors live on the CPU (skipped, with the build error, if it cannot build)."""
    import pytest

    backends: list = ["torch", "triton"]
    if DEVICE == "cpu":
        from renio_kernels.ops.cpu import native as cpu

        built = cpu.load_extension() is not None
        reason = f"native CPU kernel unavailable: {cpu.extension_error()}"
        backends.append(pytest.param("cpu", marks=pytest.mark.skipif(not built, reason=reason)))
    return backends


CORE_BACKENDS = _core_backends()
