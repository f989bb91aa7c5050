"""``weight_scope="global"``: the ReNIO weights normalized over one optimizer step.

The step's batch is every sequence of every data-parallel rank and every gradient-accumulation
micro-batch. Its normalizer (``c = 1 / mean(f)``, or ``1 / m`` for ``"ema"``) and the
reduction's denominator (the number of sequences or valid tokens) are unknown until the last
micro-batch, but the loss is linear in both: each micro-batch is weighted with a provisional
constant that every rank shares (taken from the step's first micro-batch, over all ranks), and
``StepNormalizer.finish`` multiplies the accumulated gradients once by ``final / provisional``.
When the step is one micro-batch per rank the factor is exactly 1.

Per call: one all-reduce of four float64 scalars over the group (sum of the factors, number of
sequences, sum of ``e`` for ``"ema"``, number of valid tokens); nothing is read back to the host.
``finish`` adds one all-reduce of a scalar, for the logged loss.

``batch_mean``'s cap (a weight at most 10) is applied per micro-batch: a sequence's factor is
capped at 10 times the mean factor of its own micro-batch over all ranks, then normalized by the
step's mean. With one micro-batch per rank that is exactly the cap over the whole step; with
several it differs only for a sequence whose factor exceeds 10 times its micro-batch's mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .reduction import BATCH_MEAN_CAP

__all__ = ["StepNormalizer", "StepResult"]

_SUM_F, _SEQS, _SUM_E, _TOKENS = range(4)


@dataclass(frozen=True)
class StepResult:
    """What ``StepNormalizer.finish`` returns (0-dim float64 tensors, nothing read to the host).

    ``loss``: the step's loss, as one batch holding every sequence of the step would give it
    (the same on every rank). ``grad_scale``: the factor the gradients were multiplied by (1 when
    the step was one micro-batch per rank, except for ``"ema"``). ``sequences``, ``tokens``: the
    step's totals over all ranks; ``batch_mean_e``: the step's ``mean(e)`` (what ``"ema"``
    advances its running mean with).
    """

    loss: torch.Tensor
    grad_scale: torch.Tensor
    sequences: torch.Tensor
    tokens: torch.Tensor
    batch_mean_e: torch.Tensor


def _world(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _world(group) > 1:
        dist.all_reduce(x, group=group)
    return x


def _local_grad(g: torch.Tensor) -> torch.Tensor:
    """The tensor holding a gradient's local values (an FSDP2 / DTensor gradient's shard)."""
    to_local = getattr(g, "to_local", None)
    return to_local() if callable(to_local) else g


class StepNormalizer:
    """Normalizes the ReNIO weights over every rank and accumulation micro-batch of one
    optimizer step (``weight_scope="global"``), so the step's gradient equals that of one batch
    holding all of them.

    Use one per training run; pass it to every loss call of the step and call ``finish`` once
    after the step's last backward, before gradient clipping and the optimizer step::

        norm = StepNormalizer()                     # the default process group, if any
        for micro_batch in step:
            loss = renio_loss(s, t, y, weight_scope="global", normalizer=norm)
            loss.backward()                         # do not divide by the accumulation steps
        result = norm.finish(model.parameters())    # rescales the gradients in place
        clip_grad_norm_(model.parameters(), 1.0); optimizer.step(); optimizer.zero_grad()

    Args:
        group: the data-parallel process group (default: the default group when
            ``torch.distributed`` is initialized, else this process alone). Pass a group of one
            rank to normalize over the accumulation micro-batches only.
        grads_averaged: whether the gradients are averaged over the group (DDP, FSDP2, and the
            training script's all-reduce do); False if they are summed.
        ema_state: where ``weight_norm="ema"`` keeps its running mean (a 0-dim float tensor,
            NaN before the first step, updated in place; default: a new float64 one). The loss
            modules pass their ``ema_mean`` buffer.

    The returned per-call loss is provisional (the step's first micro-batch's normalization);
    ``finish`` returns the step's loss. With ``weight_norm="ema"`` the running mean lives here
    (``ema_mean``; ``state_dict``/``load_state_dict`` save and restore it) and advances once per
    step with the step's ``mean(e)``.
    """

    def __init__(self, group=None, *, grads_averaged: bool = True, ema_state=None) -> None:
        self.group = group
        self.grads_averaged = grads_averaged
        if ema_state is None:
            ema_state = torch.full((), math.nan, dtype=torch.float64)
        self.ema_mean = ema_state
        self._reset()

    def _reset(self) -> None:
        self._stats = None  # (4,) float64 over all ranks, summed over the step's micro-batches
        self._loss = None  # this rank's sum of provisional weight * term, float64
        self._prov = self._prov_c = None  # the provisional c / Z and c, 0-dim float64
        self._opts = None
        self.micro_batches = 0

    @property
    def pending(self) -> bool:
        """Whether a loss was computed since the last ``finish``."""
        return self._stats is not None

    def state_dict(self) -> dict:
        return {"ema_mean": self.ema_mean.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.ema_mean.copy_(state["ema_mean"])

    def _constants(self, stats: torch.Tensor, opts):
        """``c``, ``Z`` of a batch with these totals, and its ``"ema"`` running mean after it."""
        sum_f, seqs, sum_e, tokens = stats.unbind(0)
        mean_e = sum_e / seqs
        ema = self.ema_mean.to(stats.dtype)
        ema = torch.where(torch.isnan(ema), mean_e, 0.1 * mean_e + 0.9 * ema)
        if not opts.use_renio or opts.weight_norm == "none":
            c = torch.ones_like(sum_f)
        elif opts.weight_norm == "ema":
            c = 1.0 / ema
        else:  # batch_mean, clamp
            c = seqs / sum_f
        if opts.reduction == "sequence_mean":
            z = seqs
        elif opts.reduction == "token_mean":
            z = tokens.clamp(min=1)
        else:
            z = torch.ones_like(seqs)
        return c, z, ema

    @torch.compiler.disable
    def weigh(self, f, e, terms, mask, opts) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sequence coefficients ``k (B,)`` of this micro-batch's loss ``sum_b k_b terms_b``
        and the provisional weights (for ``return_stats``). ``f``, ``e``: the factors (float64,
        detached); ``terms``: each sequence's divergence term of the reduction."""
        if self._opts is not None and self._opts != opts:
            raise ValueError(
                "the loss options changed within one optimizer step of a StepNormalizer; call "
                "finish() after the step's last backward before changing them"
            )
        if self.ema_mean.device != f.device:
            self.ema_mean = self.ema_mean.to(f.device)
        local = torch.stack(
            (f.sum(), f.new_tensor(f.numel()), e.sum(), mask.sum().to(torch.float64))
        )
        totals = _all_reduce(local, self.group)
        if self._stats is None:
            self._opts = opts
            c, z, _ = self._constants(totals, opts)
            self._prov, self._prov_c = c / z, c
            self._stats = totals.clone()
            self._loss = torch.zeros((), dtype=torch.float64, device=f.device)
        else:
            self._stats += totals
        self.micro_batches += 1
        if opts.use_renio and opts.weight_norm == "batch_mean":
            f = torch.minimum(f, BATCH_MEAN_CAP * totals[_SUM_F] / totals[_SEQS])
        self._loss += (f * terms.detach().to(torch.float64)).sum()
        world = _world(self.group) if self.grads_averaged else 1
        return f * (self._prov * world), f * self._prov_c

    @torch.no_grad()
    def finish(self, parameters=()) -> StepResult:
        """Rescale the step's accumulated gradients in place (every ``.grad`` of ``parameters``,
        an iterable of tensors; FSDP2 / DTensor gradients too), advance ``"ema"``'s running mean,
        and start a new step. Call it once per optimizer step, after the last backward and
        before gradient clipping."""
        if self._stats is None:
            raise RuntimeError(
                "StepNormalizer.finish() was called before any loss with weight_scope='global' "
                "in this step; call it once per optimizer step, after the step's backwards"
            )
        c, z, ema = self._constants(self._stats, self._opts)
        final = c / z
        scale = final / self._prov
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        for p in parameters:
            if p.grad is not None:
                grad = _local_grad(p.grad)
                grad.mul_(scale.to(device=grad.device, dtype=grad.dtype))
        loss = final * _all_reduce(self._loss.clone(), self.group)
        stats = self._stats
        if self._opts.use_renio and self._opts.weight_norm == "ema":
            self.ema_mean.copy_(ema)
        result = StepResult(
            loss=loss,
            grad_scale=scale,
            sequences=stats[_SEQS],
            tokens=stats[_TOKENS],
            batch_mean_e=stats[_SUM_E] / stats[_SEQS],
        )
        self._reset()
        return result
