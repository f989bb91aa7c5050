"""The float64-capable plain-PyTorch oracle (``core/reference.py``), under its public name:
``renio_kernels.reference.renio_loss(...)`` materializes every ``(B, T, V)`` intermediate the way
the paper's eager trainer does; the fused backends are tested against it."""

from .core.reference import *  # noqa: F403
from .core.reference import __all__  # noqa: F401
