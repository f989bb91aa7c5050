"""The loss options, defined once: name, default, allowed values and one line of documentation.

``ReNIOOptions`` is the record. Everything else derives from its fields: the eager validation
(``ReNIOOptions(...)``), the compile-safe validation (``traced_options``), the option sections
of the public docstrings (``options_doc``), the module constructors, the TRL config fields and the
training script's config keys and flags (``option_fields``). Adding an option is a field here,
the code that uses it, and a line in ``docs/SPEC.md``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections import namedtuple
from dataclasses import dataclass, field
from typing import Any

import torch

from ..ops.divergences import DIVERGENCES, resolve_divergence
from ..ops.rows import DivergenceParams

__all__ = [
    "REDUCTIONS",
    "WEIGHT_NORMS",
    "WEIGHT_SCOPES",
    "ReNIOOptions",
    "call_options",
    "option_fields",
    "options_doc",
    "traced_options",
    "with_options",
]

WEIGHT_NORMS = ("batch_mean", "clamp", "none", "ema")
REDUCTIONS = ("sequence_mean", "token_mean", "sum")
WEIGHT_SCOPES = ("micro_batch", "global")


def _opt(default: Any, kind: str, doc: str, paper: str | None = None, choices=None,
         script_flag=None):  # fmt: skip
    """A field of the record: ``kind`` names the check (``_CHECKS``), ``paper`` the trainer flag,
    ``script_flag`` the training script's flag when it is not ``--name-with-dashes`` (a name the
    script already uses for a setting of its own)."""
    meta = {"kind": kind, "doc": doc, "paper_flag": paper, "choices": choices}
    if script_flag is not None:
        meta["script_flag"] = script_flag
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ReNIOOptions:
    """Every option of the ReNIO loss (``docs/SPEC.md`` names and defaults), validated on
    construction with a ValueError that says how to fix the value."""

    beta: float = _opt(
        0.0, "unit", "0: forward KL(teacher||student), 1: reverse KL, between: generalized JSD",
        "--beta",
    )  # fmt: skip
    divergence: str | None = _opt(
        None, "divergence", "None: chosen by beta; or by name: " + ", ".join(DIVERGENCES),
        choices=(None, *DIVERGENCES),
    )  # fmt: skip
    temperature: float = _opt(
        1.0, "positive", "divides both sides' logits before the softmax", "--temperature"
    )
    token_clip: float | None = _opt(
        None, "clip", "clamp each element's divergence term to [0, token_clip] (None/0: off)",
        "--jsd_token_clip",
    )  # fmt: skip
    use_renio: bool = _opt(
        True, "bool", "False: plain on-policy distillation (all weights 1)", "--use_renio"
    )
    ratio_clip: float | None = _opt(
        2.5, "real_or_none", "upper clip of the sampled-token log ratio ls[x] - lt[x] (None: off)",
        "--kd_clamp",
    )  # fmt: skip
    threshold: float = _opt(
        0.8, "real", "tokens with log ratio >= threshold are pivotal", "--imp_token_threshold"
    )
    weight_temperature: float = _opt(
        1.0, "positive", "e_b = exp(rbar_b / weight_temperature)", "--kd_sgo_tem"
    )
    weight_norm: str = _opt(
        "batch_mean", "choice", "normalization of the per-sequence weights",
        "--weight_norm_type", WEIGHT_NORMS,
    )  # fmt: skip
    ignore_index: int = _opt(-100, "int", "label value of positions without a loss")
    reduction: str = _opt(
        "sequence_mean", "choice",
        "sequence_mean: mean over sequences of each one's token mean; token_mean: over all valid "
        "tokens; sum: their sum (each token carries its sequence's weight)",
        choices=REDUCTIONS,
    )  # fmt: skip
    weight_scope: str = _opt(
        "micro_batch", "choice",
        "micro_batch: weights normalized over the batch passed in (the paper's); global: over "
        "every rank and accumulation micro-batch of the step (needs a StepNormalizer)",
        choices=WEIGHT_SCOPES,
    )  # fmt: skip
    top_k: int | None = _opt(
        None, "top_k", "divergence over the teacher's top_k columns per position, both sides "
        "renormalized there (None: the full vocabulary; >= Vs: the full loss)", "--top_k_loss",
        script_flag=("--top-k-loss", "--top_k_loss"),
    )  # fmt: skip

    def __post_init__(self) -> None:
        validate(self, traced=False)

    def kernel_params(self) -> DivergenceParams:
        """What the row kernels need (plain Python numbers)."""
        return kernel_params(self)


def option_fields() -> tuple[dataclasses.Field, ...]:
    """The record's fields (``name``, ``default``, ``type``, ``metadata['doc' | 'paper_flag' |
    'choices' | 'kind']``)."""
    return dataclasses.fields(ReNIOOptions)


_NAMES = tuple(f.name for f in option_fields())
# Plain tuples, which a torch.compile trace reads without graph breaks.
_SPECS = tuple((f.name, f.metadata["kind"], f.metadata["choices"]) for f in option_fields())
# The record for a trace where some values are symbolic (see ``call_options``).
TracedOptions = namedtuple(
    "TracedOptions", _NAMES, defaults=tuple(f.default for f in option_fields())
)


_FP32_TINY_RECIPROCAL = 1.0 / 3.4028234663852886e38  # 1 / float32 max


def _real(name: str, v, traced: bool) -> None:
    if not traced and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise ValueError(f"{name} must be a real number, got {v!r}")
    # A comparison rather than math.isnan: it also works on a traced symbolic float.
    if not -math.inf <= v <= math.inf:
        raise ValueError(f"{name} must not be NaN")


def _check_unit(name, v, traced):
    _real(name, v, traced)
    if not 0.0 <= v <= 1.0:
        raise ValueError(
            f"{name} must be in [0, 1] (0: forward KL, 1: reverse KL, between: JSD), got {v}"
        )


def _check_positive(name, v, traced):
    _real(name, v, traced)
    if not 0.0 < v < math.inf:
        raise ValueError(f"{name} must be finite and > 0, got {v}")
    # The kernels multiply by 1 / value in fp32: a value whose reciprocal overflows would make
    # every logit inf and the loss NaN.
    if not v >= _FP32_TINY_RECIPROCAL:
        raise ValueError(
            f"{name} must be >= {_FP32_TINY_RECIPROCAL:.3g} (1 / {name} overflows float32 below "
            f"that), got {v}"
        )


def _check_clip(name, v, traced):
    if v is None:
        return
    _real(name, v, traced)
    if not v >= 0:
        raise ValueError(f"{name} must be None (off), 0 (off) or > 0, got {v}")


def _check_real_or_none(name, v, traced):
    if v is not None:
        _real(name, v, traced)


def _check_bool(name, v, traced):
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be a bool, got {v!r}")


def _check_int(name, v, traced):
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an int, got {v!r}")


def _check_top_k(name, v, traced):
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be None (the full vocabulary) or an int >= 1, got {v!r}")


def _check_choice(name, v, traced, choices):
    if v not in choices:
        raise ValueError(f"unknown {name} {v!r}; expected one of {choices}")


_CHECKS = {
    "unit": _check_unit,
    "positive": _check_positive,
    "clip": _check_clip,
    "real": _real,
    "real_or_none": _check_real_or_none,
    "bool": _check_bool,
    "int": _check_int,
    "top_k": _check_top_k,
}


def validate(opts, traced: bool) -> None:
    """Every field's check; ``traced`` skips the type checks a symbolic value cannot pass."""
    for name, kind, choices in _SPECS:
        value = getattr(opts, name)
        if kind == "choice":
            _check_choice(name, value, traced, choices)
        elif kind != "divergence":
            _CHECKS[kind](name, value, traced)
    resolve_divergence(opts.divergence, opts.beta)


def traced_options(**kw) -> TracedOptions:
    opts = TracedOptions(**kw)
    validate(opts, traced=True)
    return opts


def call_options(**kw) -> ReNIOOptions | TracedOptions:
    """Validated options. Under ``torch.compile`` a float option may be traced as a symbolic
    float (backed by a float64 tensor, Liger-Kernel #1362) that a dataclass's type checks cannot
    take, so there the same ranges are checked with comparisons (which become guards); the custom
    ops receive real Python floats at run time."""
    unknown = [k for k in kw if k not in _NAMES]
    if unknown:
        raise TypeError(f"unknown option {unknown[0]!r}; the options are {', '.join(_NAMES)}")
    if torch.compiler.is_compiling():
        return traced_options(**kw)
    return ReNIOOptions(**kw)


def kernel_params(opts) -> DivergenceParams:
    return DivergenceParams(
        divergence=resolve_divergence(opts.divergence, opts.beta).name,
        beta=float(opts.beta),
        temperature=float(opts.temperature),
        token_clip=None if opts.token_clip is None else float(opts.token_clip),
        ignore_index=int(opts.ignore_index),
    )


def options_doc(indent: int = 8) -> str:
    """The ``Args:`` lines of every option, for the public docstrings."""
    pad = " " * indent
    lines = []
    for f in option_fields():
        flag = f" (paper: ``{f.metadata['paper_flag']}``)" if f.metadata["paper_flag"] else ""
        lines.append(f"{pad}{f.name}: {f.metadata['doc']}; default ``{f.default!r}``{flag}.")
    return "\n".join(lines)


def with_options(fn):
    """Give a public function taking ``**options`` the record's fields as its documented
    keyword arguments: ``inspect.signature`` (and so ``help()`` and IDEs that read it) shows each
    field with its default and type, and the ``{options}`` placeholder of the docstring becomes
    the fields' documentation."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    first_kw = next((i for i, p in enumerate(params) if p.kind is p.KEYWORD_ONLY), len(params))
    fields = [
        inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type
        )  # fmt: skip
        for f in option_fields()
    ]
    fn.__signature__ = sig.replace(parameters=params[:first_kw] + fields + params[first_kw:])
    fn.__doc__ = fn.__doc__.replace("{options}", options_doc().lstrip())
    return fn
