"""Per-sequence ReNIO weights and the final reduction: (B)-sized torch ops shared by every backend.

The kernels reduce each ``(b, t)`` row of the vocabulary to a handful of fp32 numbers (the
divergence ``d`` and the sampled-token log-probabilities); everything after that is here. The
reduction is ordinary autograd code, so ``grad_output``, gradient accumulation and a second
backward are handled by torch, and the kernels' backward only receives a per-row scale
``dL/dd[b, t] = grad_output * w_b / (B * n_b)``.
"""

from __future__ import annotations

import math
import warnings

import torch

from .options import WEIGHT_NORMS, ReNIOOptions

__all__ = [
    "BATCH_MEAN_CAP",
    "cap_can_bind",
    "factor_span",
    "log_ratio",
    "normalize_factors",
    "option_factors",
    "reduce_renio",
    "reduce_sampled_rkl",
    "sequence_factors",
    "sequence_log_factors",
    "sequence_weights",
    "update_ema",
]

# ``weight_norm="clamp"`` bounds each factor to this range before the normalization.
_CLAMP_RANGE = (0.1, 10.0)
# ``weight_norm="batch_mean"`` caps the normalized weight here.
BATCH_MEAN_CAP = 10.0


def log_ratio(
    ls_x: torch.Tensor, lt_x: torch.Tensor, mask: torch.Tensor, ratio_clip: float | None
) -> torch.Tensor:
    """``r = min(ls[x] - lt[x], ratio_clip)`` in float64, 0 at ignored positions (no gradient)."""
    r = (ls_x - lt_x).detach().to(torch.float64)
    if ratio_clip is not None:
        r = torch.clamp(r, max=ratio_clip)
    return torch.where(mask, r, torch.zeros((), dtype=r.dtype))


def sequence_factors(
    r: torch.Tensor,
    mask: torch.Tensor,
    *,
    threshold: float = 0.8,
    weight_temperature: float = 1.0,
    weight_norm: str = "batch_mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sequence's unnormalized factor ``f (B,)``, ``e = exp(rbar / weight_temperature)``
    and the selected-token mask; runs in ``r``'s dtype.

    ``f = e``, or ``clamp(e, 0.1, 10)`` for ``weight_norm="clamp"``. A sequence's factor depends on
    its own rows only, so the fused-linear forward takes it as soon as the sequence's last row is
    done; the weights are ``f`` times a batch-wide normalizer (``normalize_factors``), except
    where ``batch_mean`` caps them.
    """
    if weight_norm not in WEIGHT_NORMS:
        raise ValueError(f"unknown weight_norm {weight_norm!r}; expected one of {WEIGHT_NORMS}")
    r = r.detach()
    selected = mask & (r >= threshold)
    count = selected.sum(-1)
    rbar = torch.where(selected, r, torch.zeros((), dtype=r.dtype)).sum(-1) / count.clamp(min=1)
    e = torch.exp(rbar / weight_temperature)
    f = torch.clamp(e, *_CLAMP_RANGE) if weight_norm == "clamp" else e
    return f, e, selected


def option_factors(r: torch.Tensor, mask: torch.Tensor, opts) -> tuple:
    """``sequence_factors`` under the loss options ``opts``: ``(f, e, selected)``, with every
    ``f`` 1 for ``use_renio=False``."""
    f, e, selected = sequence_factors(
        r, mask, threshold=opts.threshold, weight_temperature=opts.weight_temperature,
        weight_norm=opts.weight_norm,
    )  # fmt: skip
    if not opts.use_renio:
        f = torch.ones_like(f)
    return f, e, selected


def normalize_factors(
    f: torch.Tensor, e: torch.Tensor, weight_norm: str, ema_mean: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights ``w (B,)`` from the factors, and ``mean_b(e)`` (for the ema state).

    ``batch_mean``: ``min(f / mean(f), 10)``; ``clamp``: ``f / mean(f)``; ``none``: ``f``;
    ``ema``: ``f / m`` with ``m`` the running mean after this batch (``ema_mean`` is the state
    before it: None or NaN on the first call).
    """
    mean_e = e.mean()
    if weight_norm == "batch_mean":
        return torch.clamp(f / f.mean(), max=BATCH_MEAN_CAP), mean_e
    if weight_norm == "clamp":
        return f / f.mean(), mean_e
    if weight_norm == "none":
        return f, mean_e
    if ema_mean is None:
        m = mean_e
    else:
        prev = ema_mean.to(e.dtype)
        m = torch.where(torch.isnan(prev), mean_e, 0.1 * mean_e + 0.9 * prev)
    return f / m, mean_e


def sequence_weights(
    r: torch.Tensor,
    mask: torch.Tensor,
    *,
    threshold: float = 0.8,
    weight_temperature: float = 1.0,
    weight_norm: str = "batch_mean",
    ema_mean: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ReNIO weights ``w (B,)`` (no gradient), the selected-token mask and ``mean_b(e)``.

    ``ema_mean`` is the running mean *before* this call (None or NaN on the first call); the
    caller updates its state from the returned batch mean. Runs in ``r``'s dtype.
    """
    f, e, selected = sequence_factors(
        r, mask, threshold=threshold, weight_temperature=weight_temperature,
        weight_norm=weight_norm,
    )  # fmt: skip
    w, mean_e = normalize_factors(f, e, weight_norm, ema_mean)
    return w, selected, mean_e


def sequence_log_factors(
    ls_x: torch.Tensor, lt_x: torch.Tensor, labels: torch.Tensor, opts
) -> torch.Tensor:
    """``log f`` (S,) float64 of S complete sequences from their rows ``(S, T)``, the factors of
    ``reduce_renio``'s weights (0 for every sequence with ``use_renio=False``); ``-inf`` for a
    sequence without a valid token, whose rows carry no gradient."""
    mask = labels != opts.ignore_index
    valid = mask.any(-1)
    if opts.use_renio:
        r = log_ratio(ls_x, lt_x, mask, opts.ratio_clip)
        f, _, _ = sequence_factors(
            r, mask, threshold=opts.threshold, weight_temperature=opts.weight_temperature,
            weight_norm=opts.weight_norm,
        )  # fmt: skip
        log_f = torch.log(f)
    else:
        log_f = torch.zeros(valid.shape, dtype=torch.float64, device=valid.device)
    return torch.where(valid, log_f, torch.full((), -math.inf, dtype=torch.float64))


def cap_can_bind(opts, batch: int) -> bool:
    """Whether ``batch_mean``'s cap can make a weight differ from ``f_b`` times one batch-wide
    scalar: ``e_b / mean(e) <= B``, so only with more than 10 sequences (in the whole
    micro-batch over all ranks for ``weight_scope="global"``, which the call cannot know)."""
    if not (opts.use_renio and opts.weight_norm == "batch_mean"):
        return False
    return opts.weight_scope == "global" or batch > BATCH_MEAN_CAP


def factor_span(opts) -> float | None:
    """An upper bound of ``max_b log f_b - min_b log f_b`` that the options guarantee (None when
    they bound nothing: ``ratio_clip=None``). ``rbar`` is 0 (nothing selected) or in
    ``[threshold, ratio_clip]``."""
    if not opts.use_renio:
        return 0.0
    if opts.weight_norm == "clamp":
        return math.log(_CLAMP_RANGE[1] / _CLAMP_RANGE[0])
    if opts.ratio_clip is None:
        return None
    hi = max(0.0, float(opts.ratio_clip))
    lo = min(0.0, float(opts.threshold)) if opts.threshold <= opts.ratio_clip else 0.0
    return (hi - lo) / float(opts.weight_temperature)


def update_ema(ema_state: torch.Tensor, mean_e: torch.Tensor) -> None:
    """``m <- mean(e)`` on the first call (state NaN), else ``0.1 mean(e) + 0.9 m``; no sync."""
    mean_e = mean_e.to(ema_state.dtype)
    ema_state.copy_(torch.where(torch.isnan(ema_state), mean_e, 0.1 * mean_e + 0.9 * ema_state))


def warn_single_sequence(opts, batch: int) -> None:
    """``batch_mean`` over one sequence makes its weight exactly 1: ReNIO silently becomes plain
    on-policy distillation. Said once per call site (``warnings``' default filter)."""
    if batch == 1 and opts.use_renio and opts.weight_norm == "batch_mean":
        if not torch.compiler.is_compiling():
            warnings.warn(
                "renio_kernels: weight_norm='batch_mean' normalizes the ReNIO weights over the "
                "batch passed in, which holds one sequence here, so its weight is exactly 1 "
                "(plain on-policy distillation); pass several sequences per call, normalize "
                "over the whole optimizer step with weight_scope='global' and a StepNormalizer, "
                "or use weight_norm='ema' (a running mean across calls) or 'none'",
                UserWarning,
                stacklevel=4,
            )


def reduce_renio(
    d: torch.Tensor,
    ls_x: torch.Tensor,
    lt_x: torch.Tensor,
    mask: torch.Tensor,
    opts: ReNIOOptions,
    ema_state: torch.Tensor | None,
    return_stats: bool,
    normalizer=None,
):
    """The loss from per-row ``d``, ``ls[x]``, ``lt[x]`` (all ``(B, T)`` fp32).

    ``sum_b w_b * term_b / Z`` with ``term_b`` the sequence's token mean ``D_b`` and ``Z = B``
    (``reduction="sequence_mean"``), or its token sum and ``Z`` = the number of valid tokens
    (``"token_mean"``) or 1 (``"sum"``). ``d`` must already be 0 at ignored positions (every
    backend writes it so). With ``weight_norm="ema"`` the running mean ``ema_state`` is used and
    advanced in place. With ``weight_scope="global"`` the normalization is the ``normalizer``'s
    (a ``core.step.StepNormalizer``); under ``torch.no_grad()`` (evaluation: no step to normalize)
    it is the batch passed in, with the normalizer's ``"ema"`` mean read, not advanced, and the
    step left untouched. The weights are computed in float64 from detached values:
    they are (B)-sized, and float64 keeps ``exp(rbar / weight_temperature)`` and its
    normalization exact for any option values.
    """
    token_sum = d.sum(-1)
    n = mask.sum(-1).clamp(min=1).to(d.dtype)
    divergence = token_sum / n
    per_sequence = opts.reduction == "sequence_mean"
    r = log_ratio(ls_x, lt_x, mask, opts.ratio_clip)
    in_step = opts.weight_scope == "global" and torch.is_grad_enabled()
    if opts.weight_scope == "global" and not in_step:
        ema_state = normalizer.ema_mean.clone()
    if in_step:
        f, e, selected = option_factors(r, mask, opts)
        terms = divergence if per_sequence else token_sum
        coef, w = normalizer.weigh(f, e, terms, mask, opts)
        loss = (coef.to(d.dtype) * terms).sum()
        w = w.to(d.dtype)
    else:
        if opts.weight_scope == "micro_batch":
            warn_single_sequence(opts, mask.shape[0])
        w, selected, mean_e = sequence_weights(
            r,
            mask,
            threshold=opts.threshold,
            weight_temperature=opts.weight_temperature,
            weight_norm=opts.weight_norm,
            ema_mean=ema_state,
        )
        if opts.weight_norm == "ema" and ema_state is not None:
            update_ema(ema_state, mean_e)
        if not opts.use_renio:
            w = torch.ones_like(w)
        w = w.to(d.dtype)
        if per_sequence:
            loss = (w * divergence).mean()
        elif opts.reduction == "token_mean":
            loss = (w * token_sum).sum() / mask.sum().clamp(min=1).to(d.dtype)
        else:
            loss = (w * token_sum).sum()
    if not return_stats:
        return loss
    stats = {
        "weights": w.detach(),
        "divergence": divergence.detach(),
        "log_ratio": r.to(d.dtype),
        "selected": selected,
    }
    return loss, stats


def reduce_sampled_rkl(ls_x: torch.Tensor, lt_x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``-mean over valid tokens of A * ls[x]`` with ``A = lt[x] - ls[x]`` detached."""
    adv = (lt_x - ls_x).detach()
    total = torch.where(mask, adv * ls_x, torch.zeros((), dtype=ls_x.dtype)).sum()
    return -total / mask.sum().clamp(min=1).to(ls_x.dtype)
