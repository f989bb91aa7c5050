"""Per-sequence ReNIO weights and the final reduction: (B)-sized torch ops shared by every backend.

The kernels reduce each ``(b, t)`` row of the vocabulary to a handful of fp32 numbers (the
divergence ``d`` and the sampled-token log-probabilities); everything after that is here. The
reduction is ordinary autograd code, so ``grad_output``, gradient accumulation and a second
backward are handled by torch, and the kernels' backward only receives a per-row scale
``dL/dd[b, t] = grad_output * w_b / (B * n_b)``.
"""

from __future__ import annotations

import torch

from .options import WEIGHT_NORMS, ReNIOOptions

__all__ = ["sequence_weights", "reduce_renio", "reduce_sampled_rkl", "update_ema"]


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
    r = r.detach()
    selected = mask & (r >= threshold)
    count = selected.sum(-1)
    rbar = torch.where(selected, r, torch.zeros((), dtype=r.dtype)).sum(-1) / count.clamp(min=1)
    e = torch.exp(rbar / weight_temperature)
    mean_e = e.mean()
    if weight_norm == "batch_mean":
        w = torch.clamp(e / mean_e, max=10.0)
    elif weight_norm == "clamp":
        w = torch.clamp(e, 0.1, 10.0)
        w = w / w.mean()
    elif weight_norm == "none":
        w = e
    elif weight_norm == "ema":
        if ema_mean is None:
            m = mean_e
        else:
            prev = ema_mean.to(e.dtype)
            m = torch.where(torch.isnan(prev), mean_e, 0.1 * mean_e + 0.9 * prev)
        w = e / m
    else:
        raise ValueError(f"unknown weight_norm {weight_norm!r}; expected one of {WEIGHT_NORMS}")
    return w, selected, mean_e


def update_ema(ema_state: torch.Tensor, mean_e: torch.Tensor) -> None:
    """``m <- mean(e)`` on the first call (state NaN), else ``0.1 mean(e) + 0.9 m``; no sync."""
    mean_e = mean_e.to(ema_state.dtype)
    ema_state.copy_(torch.where(torch.isnan(ema_state), mean_e, 0.1 * mean_e + 0.9 * ema_state))


def reduce_renio(
    d: torch.Tensor,
    ls_x: torch.Tensor,
    lt_x: torch.Tensor,
    mask: torch.Tensor,
    opts: ReNIOOptions,
    ema_state: torch.Tensor | None,
    return_stats: bool,
):
    """Loss ``mean_b(w_b * D_b)`` from per-row ``d``, ``ls[x]``, ``lt[x]`` (all ``(B, T)`` fp32).

    ``d`` must already be 0 at ignored positions (every backend writes it so). With
    ``weight_norm="ema"`` the running mean ``ema_state`` is used and advanced in place. The
    weights are
    computed in float64 from detached values: they are (B)-sized, and float64 keeps
    ``exp(rbar / weight_temperature)`` and its normalization exact for any option values.
    """
    n = mask.sum(-1).clamp(min=1).to(d.dtype)
    divergence = d.sum(-1) / n
    r = (ls_x - lt_x).detach().to(torch.float64)
    if opts.ratio_clip is not None:
        r = torch.clamp(r, max=opts.ratio_clip)
    r = torch.where(mask, r, torch.zeros((), dtype=r.dtype))
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
    loss = (w * divergence).mean()
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
