"""renio-kernels: fused kernels for the ReNIO on-policy distillation loss.

Public API::

    renio_loss(student_logits, teacher_logits, labels, **options)      # scalar loss
    ReNIOLoss(**options)                                               # nn.Module (holds ema)
    sampled_reverse_kl_loss(student_logits, teacher_logits, labels)    # "OPD as RL" loss
    fused_linear_renio_loss(hs, Ws, ht, Wt, labels, **options)         # from hidden states
    FusedLinearReNIOLoss(**options)                                    # nn.Module of the above
    ReNIOOptions                                                       # the options, validated
    StepNormalizer(group)                                # weight_scope="global": one whole step
    SparseTeacher(ids, logprobs, sampled_logprob, mode)                # top-k teacher input
    renio_kernels.reference                                            # float64-capable oracle
    empty_cpu_grad_cache() / set_cpu_grad_cache(bool) / cpu_grad_cache_info()  # backend="cpu"

Layers: this module and ``loss`` / ``fused_linear`` / ``modules`` (public API) -> ``core``
(options, validation, reduction, autograd, custom ops, reference) -> ``ops`` (the row-kernel
contract, the divergence registry, the backends ``ops.triton``, ``ops.torch``, ``ops.cpu``, and
the fused-linear sweeps). ``integrations`` and ``train`` sit on top. The exact semantics are in
``docs/SPEC.md``.
"""

from . import reference
from .core.options import REDUCTIONS, WEIGHT_NORMS, WEIGHT_SCOPES, ReNIOOptions
from .core.step import StepNormalizer, StepResult
from .cpu_cache import cpu_grad_cache_info, empty_cpu_grad_cache, set_cpu_grad_cache
from .fused_linear import fused_linear_renio_loss
from .loss import renio_loss, sampled_reverse_kl_loss
from .modules import FusedLinearReNIOLoss, ReNIOLoss, SampledReverseKLLoss
from .ops.backends import BACKENDS
from .ops.divergences import DIVERGENCES
from .ops.sparse import SparseTeacher

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "DIVERGENCES",
    "FusedLinearReNIOLoss",
    "REDUCTIONS",
    "StepNormalizer",
    "StepResult",
    "WEIGHT_NORMS",
    "WEIGHT_SCOPES",
    "cpu_grad_cache_info",
    "empty_cpu_grad_cache",
    "ReNIOLoss",
    "ReNIOOptions",
    "SampledReverseKLLoss",
    "SparseTeacher",
    "fused_linear_renio_loss",
    "reference",
    "renio_loss",
    "sampled_reverse_kl_loss",
    "set_cpu_grad_cache",
]
