"""Backend selection: which row kernels serve a call.

``"auto"``: Triton for CUDA tensors (torch when Triton is missing), the native CPU kernel for CPU
tensors when it is built (torch otherwise). ``"triton"`` forces Triton; on CPU tensors that needs
the interpreter (``TRITON_INTERPRET=1`` set before triton is imported). ``"torch"`` is the
chunked pure-PyTorch path. ``"cpu"`` forces the native CPU kernel.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import interpreting

__all__ = ["BACKENDS", "RowBackend", "resolve_backend"]

BACKENDS = ("auto", "triton", "torch", "cpu")


@dataclass(frozen=True)
class RowBackend:
    name: str
    fwd: Callable
    bwd: Callable
    # Optional: a forward that also returns the unit-scale gradient through d, and the in-place
    # row scaling that finishes it in the backward (the native CPU kernel has both).
    fwd_grad: Callable | None = None
    scale_grad: Callable | None = None


def _triton_backend() -> RowBackend:
    from .ops.triton_bwd import renio_bwd
    from .ops.triton_fwd import renio_fwd

    return RowBackend("triton", renio_fwd, renio_bwd)


def _torch_backend() -> RowBackend:
    from .ops.torch_chunked import renio_bwd_torch, renio_fwd_torch

    return RowBackend("torch", renio_fwd_torch, renio_bwd_torch)


def _cpu_backend() -> RowBackend | None:
    """The native extension's kernels, or None when it cannot be built here (warned once)."""
    from .ops import cpu

    if cpu.load_extension() is None:
        return None
    return RowBackend(
        "cpu",
        cpu.renio_fwd_cpu,
        cpu.renio_bwd_cpu,
        cpu.renio_fwd_grad_cpu,
        cpu.renio_scale_grad_cpu,
    )


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device) -> RowBackend:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return _triton_backend()
        if device.type == "cpu":
            return _cpu_backend() or _torch_backend()
        return _torch_backend()
    if backend == "torch":
        return _torch_backend()
    if backend == "triton":
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
        return _triton_backend()
    cpu = _cpu_backend()
    if device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got {device.type} tensors")
    if cpu is None:
        raise ValueError(
            "backend='cpu' needs the native extension (csrc/), which could not be built here; "
            "use backend='torch'"
        )
    return cpu
