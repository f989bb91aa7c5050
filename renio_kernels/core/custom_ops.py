"""The losses' autograd as ``torch.library`` custom ops, so ``torch.compile`` sees opaque nodes.

``renio::row_stats_fwd`` / ``renio::row_stats_bwd`` (row losses) and ``renio::fused_linear_fwd``
/ ``renio::fused_linear_bwd`` (fused-linear loss) run the forward and backward formulas of
``autograd`` (the same functions the eager Functions call); ``register_fake`` gives each a
shape-only implementation for tracing and ``register_autograd`` connects them. Dynamo therefore
never looks inside the kernels (no graph break on a Triton launch, a Python loop over chunks or a
backend lookup); the (B)-sized reduction around them is ordinary torch code that compiles with
the rest of the user's graph.

The schemas carry plain types. Options travel as Python ``float``/``int``/``bool``/``str`` and
are rebuilt into ``DivergenceParams`` inside the op, at run time, where they are real Python
numbers again (under compile a float argument may be traced as a symbolic float backed by a
float64 tensor, Liger-Kernel #1362; it never reaches a kernel this way). ``token_clip`` uses 0.0
for "off". The teacher input travels as its kind and its tensors. Outputs that a call does not
need come back as empty tensors (a custom op cannot return None).
"""

from __future__ import annotations

import torch

from ..ops.backends import resolve_backend
from ..ops.linear import ForwardGrads, SweepPlan
from ..ops.rows import TEACHER_KINDS, DivergenceParams, RowStats
from .autograd import (
    linear_backward,
    linear_forward,
    linear_weights,
    rows_backward,
    rows_forward,
)
from .options import ReNIOOptions

__all__ = ["check_labels_async", "fused_linear_op", "row_stats_op"]

# The options every op takes, in this order (``_schema_options``); plain types only.
_OPTIONS = "str divergence, float beta, float temperature, float token_clip, int ignore_index, "
_OPTIONS += "str backend"
_N_OPTIONS = 6
_TEACHER = "Tensor[] teacher, Tensor labels, str teacher_kind"
_LINEAR = "Tensor h_s, Tensor w_s, Tensor? b_s, Tensor h_t, Tensor w_t, Tensor? b_t, Tensor labels"
_WANT = "int chunk_size, bool want_h, bool want_w, bool want_b, "
# The options of the per-sequence weights (``autograd.linear_weights``).
_WANT += "bool use_renio, float? ratio_clip, float threshold, float weight_temperature, "
_WANT += "str weight_norm"
_N_WANT = 9


def _returns(n: int) -> str:
    return "(" + ", ".join(["Tensor"] * n) + ")"


def _params(divergence: str, beta: float, temperature: float, token_clip: float, ignore_index: int):
    return DivergenceParams(
        divergence=divergence,
        beta=float(beta),
        temperature=float(temperature),
        token_clip=float(token_clip) if token_clip > 0 else None,
        ignore_index=int(ignore_index),
    )


def _schema_options(params: DivergenceParams) -> tuple:
    return (params.divergence, params.beta, params.temperature, params.clip_value,
            params.ignore_index)  # fmt: skip


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,), dtype=torch.float32)


def _fresh(x: torch.Tensor, seen: set[int]) -> torch.Tensor:
    """Custom ops may not return outputs that share storage (the torch backend returns views of
    one buffer); copy the ones that do."""
    key = x.untyped_storage().data_ptr()
    if key in seen and x.numel() > 0:
        return x.clone()
    seen.add(key)
    return x


def _forms_unit(backend: str, student, divergence, kind, with_div, store_c, unit_grad) -> bool:
    if not (with_div and store_c and unit_grad):
        return False
    return resolve_backend(backend, student.device, divergence, kind).fwd_grad is not None


# --- row losses --------------------------------------------------------------------------------


@torch.library.custom_op(
    "renio::row_stats_fwd",
    mutates_args=(),
    schema=f"(Tensor student, {_TEACHER}, {_OPTIONS}, bool with_divergence, bool store_c, "
    f"bool unit_grad) -> {_returns(7)}",
)
def row_stats_fwd(student, teacher, labels, teacher_kind, *args):
    """``(lse_s, lse_t, ls_x, lt_x, d, c, unit)``: five (B, T) fp32 rows, ``c`` (empty without
    store_c) and the unit-scale gradient (empty unless the backend forms it in the forward)."""
    options, (with_divergence, store_c, unit_grad) = args[:_N_OPTIONS], args[_N_OPTIONS:]
    params = _params(*options[:5])
    kernels = resolve_backend(options[5], student.device, params.divergence, teacher_kind)
    stats, unit = rows_forward(
        kernels, student, TEACHER_KINDS[teacher_kind](*teacher), labels, params,
        with_divergence, store_c, unit_grad,
    )  # fmt: skip
    c = stats.c if stats.c is not None else _empty(student)
    seen: set[int] = set()
    outs = (*stats[:5], c, unit if unit is not None else _empty(student))
    return tuple(_fresh(x, seen) for x in outs)


@row_stats_fwd.register_fake
def _row_stats_fwd_fake(student, teacher, labels, teacher_kind, *args):
    options, (with_divergence, store_c, unit_grad) = args[:_N_OPTIONS], args[_N_OPTIONS:]
    batch, seq, _ = student.shape
    rows = [student.new_empty((batch, seq), dtype=torch.float32) for _ in range(5)]
    c_shape = (batch, seq) if store_c and with_divergence else (0,)
    formed = with_divergence and store_c and unit_grad
    if formed:
        kernels = resolve_backend(options[5], student.device, options[0], teacher_kind)
        formed = kernels.fwd_grad is not None
    unit = torch.empty_like(student, memory_format=torch.contiguous_format) if formed else None
    return (*rows, student.new_empty(c_shape, dtype=torch.float32),
            unit if unit is not None else _empty(student))  # fmt: skip


@torch.library.custom_op(
    "renio::row_stats_bwd",
    mutates_args=(),
    schema=f"(Tensor student, {_TEACHER}, Tensor lse_s, Tensor lse_t, Tensor c, Tensor unit, "
    f"Tensor? grad_d, Tensor? grad_ls_x, {_OPTIONS}) -> Tensor",
)
def row_stats_bwd(student, teacher, labels, teacher_kind, lse_s, lse_t, c, unit, grad_d,
                  grad_ls_x, *options):  # fmt: skip
    """The student's gradient (B, T, Vs) in its dtype, from the per-row upstream gradients."""
    params = _params(*options[:5])
    kernels = resolve_backend(options[5], student.device, params.divergence, teacher_kind)
    stats = RowStats(lse_s, lse_t, None, None, None, c if c.numel() > 0 else None)
    return rows_backward(
        kernels, params, student, TEACHER_KINDS[teacher_kind](*teacher), labels, stats,
        unit if unit.numel() > 0 else None, grad_d, grad_ls_x, in_place=False,
    )  # fmt: skip


@row_stats_bwd.register_fake
def _row_stats_bwd_fake(student, *_args):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _row_stats_setup(ctx, inputs, output) -> None:
    student, teacher, labels, kind, *args = inputs
    options, with_div = args[:_N_OPTIONS], args[_N_OPTIONS]
    lse_s, lse_t, _, lt_x, d, c, unit = output
    # Unused outputs get None instead of zero tensors, so a loss that only uses d (ReNIO) or
    # only ls[x] (sampled reverse KL) costs the backward kernel no work for the other.
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(lse_s, lse_t, lt_x, c, unit)
    if not with_div:
        ctx.mark_non_differentiable(d)
    ctx.kind, ctx.options, ctx.with_divergence = kind, options, with_div
    ctx.n_teacher = len(teacher)
    ctx.save_for_backward(student, labels, lse_s, lse_t, c, unit, *teacher)


def _row_stats_backward(ctx, _g_lse_s, _g_lse_t, grad_ls_x, _g_lt_x, grad_d, _g_c, _g_unit):
    if not ctx.with_divergence:
        grad_d = None
    # The teacher's tensors (a list input) get a list of Nones: they never receive a gradient.
    nones = ([None] * ctx.n_teacher,) + (None,) * 11
    if grad_d is None and grad_ls_x is None:
        return (None, *nones)
    student, labels, lse_s, lse_t, c, unit, *teacher = ctx.saved_tensors
    grad = row_stats_bwd(
        student, teacher, labels, ctx.kind, lse_s, lse_t, c, unit, grad_d, grad_ls_x, *ctx.options
    )
    return (grad, *nones)


row_stats_fwd.register_autograd(_row_stats_backward, setup_context=_row_stats_setup)


def row_stats_op(student, teacher, labels, params: DivergenceParams, backend: str,
                 with_divergence: bool, unit_grad: bool):  # fmt: skip
    """``(d, ls[x], lt[x])`` through the custom op; the same contract as ``RowStatsFunction``."""
    store_c = with_divergence and student.requires_grad and torch.is_grad_enabled()
    _, _, ls_x, lt_x, d, _, _ = row_stats_fwd(
        student, list(teacher), labels, teacher.kind, *_schema_options(params), backend,
        with_divergence, store_c, unit_grad,
    )  # fmt: skip
    return d, ls_x, lt_x


def check_labels_async(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """The label-range check without reading anything back to the host.

    ``torch._assert_async`` raises a RuntimeError when the check fails (on CUDA, at the next
    synchronizing call, as a device-side assert), so a compiled graph keeps no host sync and no
    graph break. The eager path raises the usual ValueError instead.
    """
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    torch._assert_async(
        torch.logical_not(bad.any()),
        "renio_kernels: labels outside [0, vocab) that are not ignore_index; mark padding/prompt "
        "positions with ignore_index",
    )


# --- the fused-linear loss -----------------------------------------------------------------------


def _linear_options(params: DivergenceParams, weight_args) -> ReNIOOptions:
    use_renio, ratio_clip, threshold, weight_temperature, weight_norm = weight_args
    return ReNIOOptions(
        use_renio=bool(use_renio), ratio_clip=ratio_clip, threshold=threshold,
        weight_temperature=weight_temperature, weight_norm=weight_norm,
        ignore_index=params.ignore_index,
    )  # fmt: skip


def _plan(h_s, w_s, h_t, labels, args) -> SweepPlan:
    """The plan from the ops' ``{_OPTIONS}, {_WANT}`` arguments."""
    options, (chunk_size, *rest) = args[:_N_OPTIONS], args[_N_OPTIONS:]
    want, weight_args = rest[:3], rest[3:]
    params = _params(*options[:5])
    opts = _linear_options(params, weight_args)
    return SweepPlan.build(
        params, options[5], h_s, w_s, h_t, labels, chunk_size or None, want,
        linear_weights(opts, labels, want),
    )  # fmt: skip


@torch.library.custom_op(
    "renio::fused_linear_fwd",
    mutates_args=(),
    schema=f"({_LINEAR}, {_OPTIONS}, {_WANT}) -> {_returns(8)}",
)
def fused_linear_fwd(h_s, w_s, b_s, h_t, w_t, b_t, labels, *args):
    """``(d, ls_x, lt_x)`` (B, T) fp32, the gradient buffers the forward formed ``(hidden,
    weight, bias)`` (fp32, empty where not formed), and ``saved`` (3, N) and ``seq`` (2, B)
    float64 (both empty without a weight or bias gradient); see ``autograd.linear_forward``."""
    plan = _plan(h_s, w_s, h_t, labels, args)
    rows, grads, saved = linear_forward(h_s, w_s, b_s, h_t, w_t, b_t, labels, plan)
    empty = _empty(h_s)
    grads = grads or ForwardGrads(None)
    extra = (grads.hidden, grads.weight, grads.bias, saved, grads.seq)
    return (*(x.clone() for x in rows), *(empty.clone() if x is None else x for x in extra))


@fused_linear_fwd.register_fake
def _fused_linear_fwd_fake(h_s, w_s, b_s, h_t, w_t, b_t, labels, *args):
    want_h, want_w, want_b = args[_N_OPTIONS + 1 : _N_OPTIONS + 4]
    n = labels.numel()

    def f32(shape, on: bool, dtype=torch.float32):
        return h_s.new_empty(shape if on else (0,), dtype=dtype)

    rows = [f32(labels.shape, True) for _ in range(3)]
    grads = (
        f32((n, h_s.shape[-1]), want_h),
        f32(tuple(w_s.shape), want_w),
        f32((w_s.shape[0],), want_b),
    )
    saved = f32((3, n), want_w or want_b)
    seq = f32((2, labels.shape[0]), want_w or want_b, torch.float64)
    return (*rows, *grads, saved, seq)


@torch.library.custom_op(
    "renio::fused_linear_bwd",
    mutates_args=(),
    schema=f"({_LINEAR}, Tensor g_h, Tensor g_w, Tensor g_b, Tensor saved, Tensor seq, "
    f"Tensor grad_d, {_OPTIONS}, {_WANT}) -> {_returns(3)}",
)
def fused_linear_bwd(h_s, w_s, b_s, h_t, w_t, b_t, labels, g_h, g_w, g_b, saved, seq, grad_d,
                     *args):  # fmt: skip
    """The student's hidden, weight and bias gradients (in their dtypes; empty when not wanted)."""
    plan = _plan(h_s, w_s, h_t, labels, args)
    grads = ForwardGrads(*(x if x.numel() > 0 else None for x in (g_h, g_w, g_b, seq)))
    shapes = (h_s.shape, h_s.dtype, w_s.dtype, None if b_s is None else b_s.dtype)
    out = linear_backward(
        (h_s, w_s, b_s, h_t, w_t, b_t, labels), shapes, plan, grads,
        saved if saved.numel() > 0 else None, grad_d,
    )  # fmt: skip
    return tuple(w_s.new_empty((0,)) if x is None else x for x in out)


@fused_linear_bwd.register_fake
def _fused_linear_bwd_fake(h_s, w_s, b_s, *args):
    want_h, want_w, want_b = args[-_N_WANT + 1 : -_N_WANT + 4]
    return (
        torch.empty_like(h_s) if want_h else w_s.new_empty((0,)),
        torch.empty_like(w_s) if want_w else w_s.new_empty((0,)),
        torch.empty_like(b_s) if want_b else w_s.new_empty((0,)),
    )


def _fused_linear_setup(ctx, inputs, output) -> None:
    tensors, options = inputs[:7], inputs[7:]
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[1:])
    ctx.options = options
    ctx.save_for_backward(*tensors, *output[3:])


def _fused_linear_backward(ctx, grad_d, *_unused):
    nones = (None,) * (4 + len(ctx.options))
    want = ctx.options[_N_OPTIONS + 1 : _N_OPTIONS + 4]
    if grad_d is None or not any(want):
        return (None, None, None, *nones)
    g_h, g_w, g_b = fused_linear_bwd(*ctx.saved_tensors, grad_d, *ctx.options)
    return (*(g if on else None for g, on in zip((g_h, g_w, g_b), want, strict=True)), *nones)


fused_linear_fwd.register_autograd(_fused_linear_backward, setup_context=_fused_linear_setup)


def fused_linear_op(student, teacher, labels, params: DivergenceParams, backend: str,
                    chunk_size: int | None, want, opts):  # fmt: skip
    """``(d, ls[x], lt[x])`` of the fused-linear loss through the custom ops."""
    ratio_clip = None if opts.ratio_clip is None else float(opts.ratio_clip)
    d, ls_x, lt_x, *_ = fused_linear_fwd(
        *student, *teacher, labels, *_schema_options(params), backend, chunk_size or 0, *want,
        bool(opts.use_renio), ratio_clip, float(opts.threshold), float(opts.weight_temperature),
        opts.weight_norm,
    )  # fmt: skip
    return d, ls_x, lt_x
