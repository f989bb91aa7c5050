"""Backend selection: which row kernels serve a call.

``"auto"``: Triton for CUDA tensors (torch when Triton is missing), the native CPU kernel for CPU
tensors when it is built (torch otherwise); when the chosen one does not implement the requested
divergence or teacher kind, the torch backend, which implements all of them. ``"triton"`` forces
Triton; on CPU tensors that needs the interpreter (``TRITON_INTERPRET=1`` set before triton is
imported). ``"torch"`` is the chunked pure-PyTorch path. ``"cpu"`` forces the native CPU kernel.
"""

from __future__ import annotations

import importlib.util

import torch

from ..config import interpreting
from .rows import DenseTeacher, RowBackend

__all__ = ["BACKENDS", "resolve_backend", "triton_available"]

BACKENDS = ("auto", "triton", "torch", "cpu")


def _triton_backend() -> RowBackend:
    from .triton.bwd import renio_bwd
    from .triton.fwd import renio_fwd
    from .triton.topk import top_k_triton

    return RowBackend("triton", renio_fwd, renio_bwd, bwd_in_place=True, top_k=top_k_triton)


def _torch_backend() -> RowBackend:
    from .torch.chunked import renio_bwd_torch, renio_fwd_torch

    return RowBackend("torch", renio_fwd_torch, renio_bwd_torch, bwd_in_place=True)


def _cpu_backend() -> RowBackend | None:
    """The native extension's kernels, or None when it cannot be built here (warned once)."""
    from .cpu import native

    if native.load_extension() is None:
        return None
    return RowBackend(
        "cpu",
        native.renio_fwd_cpu,
        native.renio_bwd_cpu,
        native.divergences(),
        native.renio_fwd_grad_cpu,
        native.renio_scale_grad_cpu,
    )


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _supported(backend: RowBackend | None, divergence: str) -> RowBackend | None:
    return backend if backend is not None and divergence in backend.divergences else None


def resolve_backend(
    backend: str, device: torch.device, divergence: str = "forward_kl", teacher_kind: str = "dense"
) -> RowBackend:
    """The row kernels for ``backend`` on ``device``; ValueError saying how to fix the call."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if teacher_kind != DenseTeacher.kind:
        raise ValueError(f"no row kernels for a {teacher_kind!r} teacher")
    if backend == "auto":
        chosen = None
        if device.type == "cuda" and triton_available():
            chosen = _triton_backend()
        elif device.type == "cpu":
            chosen = _cpu_backend()
        return _supported(chosen, divergence) or _torch_backend()
    if backend == "torch":
        chosen = _torch_backend()
    elif backend == "triton":
        if not triton_available():
            raise ValueError(
                "backend='triton' needs the triton package (pip install triton); "
                "use backend='torch' instead"
            )
        if device.type == "cpu" and not interpreting():
            raise ValueError(
                "backend='triton' got CPU tensors: move them to a CUDA device, or set "
                "TRITON_INTERPRET=1 before triton is imported to run the kernels through "
                "Triton's CPU interpreter (slow; for tests), or use backend='cpu' / 'torch'"
            )
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' does not support {device.type} tensors")
        chosen = _triton_backend()
    else:
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got {device.type} tensors")
        chosen = _cpu_backend()
        if chosen is None:
            raise ValueError(
                "backend='cpu' needs the native extension (csrc/), which could not be built "
                "here; use backend='torch'"
            )
    if divergence not in chosen.divergences:
        raise ValueError(
            f"backend={backend!r} does not implement divergence={divergence!r} (it implements "
            f"{sorted(chosen.divergences)}); use backend='auto' or 'torch'"
        )
    return chosen
