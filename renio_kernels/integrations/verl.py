"""ReNIO losses in verl's distillation-loss registry (tested with verl 0.9.1).

Importing this module registers, in ``verl.trainer.distillation.losses``, one ReNIO loss per verl
distillation loss, so a verl run selects it with one config value::

    distillation.distillation_loss.loss_mode=renio_forward_kl_topk   # or renio_k3, renio_k1, ...

The package declares a ``verl.plugins`` entry point, so ``import verl`` imports this module in
every process (driver and Ray workers) of an installed renio-kernels; ``VERL_USE_EXTERNAL_MODULES=
renio_kernels.integrations.verl`` does the same by hand.

Names: ``renio_<base>`` and ``renio_mb_<base>`` for ``<base>`` in verl's ``forward_kl_topk``,
``kl``, ``k1``, ``abs``, ``mse``, ``k2``, ``low_var_kl``, ``k3``, with the paper's ReNIO options
(``ratio_clip=2.5, threshold=0.8, weight_temperature=1, weight_norm="batch_mean"``).
``renio_*`` normalizes the weights over verl's optimizer step (``weight_scope="global"``: every
data-parallel rank and micro-batch of the mini-batch); ``renio_mb_*`` over each micro-batch
(``"micro_batch"``). Other option values: ``register_renio_loss(name, base, **options)`` in a
module of yours that verl imports (a plugin or ``VERL_USE_EXTERNAL_MODULES``).

What a registered loss does (docs/verl.md explains why):

* the divergence is verl's own, on verl's tensors: the top-k forward KL that verl's logits
  processor computed from the student's logits (``model_output["distillation_losses"]``, clamped
  at 0 by verl's ``forward_kl_topk``), or ``kl_penalty(student, teacher, base)`` on the sampled
  tokens' log-probs. verl hands the registered loss no logits, so this package's kernels do not
  run here;
* each sequence's ReNIO weight comes from the sampled tokens' log ratio ``ls[x] - lt[x]``:
  ``ls[x]`` is ``model_output["log_probs"]``, or ``data["old_log_probs"]`` where verl skips the
  student's sampled log-probs (``distillation_only``: top-k, no policy gradient, no task reward);
  ``lt[x]`` is the teacher's sampled log-prob (estimators), or its top-k log-prob at the sampled
  token (top-k). verl's top-k teacher data drops the sampled token's log-prob when it is not in
  the top-k; ``lt[x]`` is then bounded from above by the k-th log-prob and ``log(1 - top-k
  mass)``, so ``r`` is a lower bound, exact whenever it reaches ``ratio_clip``; the metric
  ``renio/lt_bounded_frac`` counts the tokens where it does not;
* the returned per-token matrix is ``w_b * d[b, t]``; verl clamps it at ``loss_max_clamp``
  (default 10) and aggregates it with ``agg_loss`` and its global counts (``loss_agg_mode``), or
  uses it as the policy-gradient advantage. A clamp that binds on a weighted token changes its
  weight: ``renio/verl_clamp_frac`` counts those tokens and a warning names the fix
  (``loss_max_clamp=null``). With ``use_renio=False`` the loss is verl's own, bit for bit;
* ``weight_scope="global"``: one ``StepNormalizer`` per process weighs each micro-batch with the
  step's first micro-batch's normalization and rescales the gradients once per optimizer step,
  after the last backward and before verl clips them (a wrapper of verl's
  ``BaseEngine.train_batch`` calls it; FSDP/FSDP2/VeOmni engines, whose gradients are in
  ``.grad``). The weights come only from the ReNIO factors: verl's ``agg_loss`` keeps its own
  denominators. Forward-only calls (no grad) normalize over their micro-batch.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import torch

try:
    import verl.trainer.distillation.losses as _vl
    from verl.trainer.ppo.core_algos import agg_loss, kl_penalty
    from verl.utils.metric import AggregationType, Metric
    from verl.workers.utils.padding import no_padding_2_padding
except ImportError as err:  # pragma: no cover - exercised by a test that hides verl
    raise ImportError(
        "renio_kernels.integrations.verl needs verl (tested with 0.9.1): pip install "
        f"renio-kernels[verl] ({err})"
    ) from err

from ..core.options import ReNIOOptions
from ..core.reduction import (
    log_ratio,
    normalize_factors,
    option_factors,
    update_ema,
    warn_single_sequence,
)
from ..core.step import StepNormalizer

__all__ = [
    "BASES",
    "ESTIMATORS",
    "finish_step",
    "register_renio_loss",
    "step_normalizer",
]

ESTIMATORS = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")
BASES = ("forward_kl_topk", *ESTIMATORS)
# verl defines the divergence and its aggregation; these options are the ReNIO weights'.
_WEIGHT_OPTIONS = ("use_renio", "ratio_clip", "threshold", "weight_temperature", "weight_norm")
# Engines whose gradients sit in ``.grad`` (FSDP1's flat parameters, FSDP2's DTensors).
_GRAD_STRATEGIES = ("fsdp", "fsdp2", "veomni")

_TINY = torch.finfo(torch.float32).tiny

_normalizer: StepNormalizer | None = None
_mb_ema = torch.full((), float("nan"), dtype=torch.float64)
last_step = None  # the StepResult of this process's last finished global-scope step


def step_normalizer() -> StepNormalizer:
    """This process's normalizer of the global-scope losses (created on first use, over the
    default process group: verl replicates a data-parallel rank's sequences uniformly over its
    sequence-parallel ranks, which leaves the factors' mean unchanged)."""
    global _normalizer
    if _normalizer is None:
        # verl's agg_loss divides by dp_size-aware global counts: the normalizer only supplies
        # the factors' normalization (reduction "sum", no averaging correction).
        _normalizer = StepNormalizer(grads_averaged=False)
    return _normalizer


def _engine_parameters(engine):
    module = getattr(engine, "module", None)
    if not isinstance(module, torch.nn.Module):
        raise NotImplementedError(
            f"renio_kernels: the global-scope ReNIO losses rescale gradients in .grad, which "
            f"{type(engine).__name__} does not keep them in; use the renio_mb_* losses "
            "(weights normalized per micro-batch) with this engine"
        )
    return [p for p in module.parameters() if p.grad is not None]


def finish_step(engine=None, parameters=None):
    """Rescale the step's gradients if a global-scope ReNIO loss ran in it (the wrapper of verl's
    ``BaseEngine.train_batch`` calls this before the optimizer step); returns the StepResult or
    None when no such loss ran."""
    global last_step
    norm = step_normalizer()
    if not norm.pending:
        return None
    if parameters is None:
        parameters = _engine_parameters(engine)
    last_step = norm.finish(parameters)
    return last_step


def _install_step_hook() -> bool:
    """Wrap ``BaseEngine.train_batch`` so that ``finish_step`` runs between verl's last backward
    and its optimizer step (where it clips); a no-op for steps without a global ReNIO loss."""
    try:
        from verl.workers.engine.base import BaseEngine
    except ImportError:
        return False
    original = BaseEngine.train_batch
    if getattr(original, "_renio_step_hook", False):
        return True

    @functools.wraps(original)
    def train_batch(self, data, loss_function):
        if "optimizer_step" in vars(self):
            return original(self, data, loss_function)
        step = self.optimizer_step

        def optimizer_step(*args, **kwargs):
            finish_step(self)
            return step(*args, **kwargs)

        self.optimizer_step = optimizer_step
        try:
            return original(self, data, loss_function)
        finally:
            del self.optimizer_step

    train_batch._renio_step_hook = True
    BaseEngine.train_batch = train_batch
    return True


_HOOKED = _install_step_hook()


def _padded(t: torch.Tensor, pad) -> torch.Tensor:
    return t.to_padded_tensor(pad) if t.is_nested else t


def _fit(t: torch.Tensor, width: int, pad) -> torch.Tensor:
    """``t (B, T', ...)`` cut or padded to ``T' = width`` along dim 1."""
    if t.shape[1] >= width:
        return t[:, :width]
    extra = list(t.shape)
    extra[1] = width - t.shape[1]
    return torch.cat([t, t.new_full(extra, pad)], dim=1)


def _student_sampled(model_output: dict, data, width: int) -> torch.Tensor:
    lp = model_output.get("log_probs")
    if lp is not None:
        return no_padding_2_padding(lp, data)
    # verl skips the student's sampled log-probs in distillation_only runs; the actor computed
    # them before the update (the step's parameters, for its first mini-batch).
    return _fit(_padded(data["old_log_probs"], 0.0), width, 0.0)


def _teacher_sampled_topk(data, width: int):
    """``lt[x]`` from verl's top-k teacher data and the mask of tokens where it is an upper bound
    (the sampled token is outside the top-k)."""
    ids = no_padding_2_padding(data["teacher_ids"], data).long()
    lps = no_padding_2_padding(data["teacher_logprobs"], data).float()
    x = _fit(_padded(data["responses"], -1), width, -1).long()
    hit = ids == x.unsqueeze(-1)
    found = hit.any(-1)
    exact = torch.where(hit, lps, torch.zeros((), dtype=lps.dtype)).sum(-1)
    kth = lps.min(-1).values
    # log(1 - top-k mass), raised to float32's smallest normal probability where the mass
    # rounds to 1: still an upper bound, and it keeps exp(rbar) finite without a ratio_clip
    rest = (1.0 - lps.double().exp().sum(-1)).clamp(min=_TINY).log().float()
    bound = torch.minimum(kth, rest)
    return torch.where(found, exact, bound), ~found


def _sequence_terms(config, data, d, mask) -> torch.Tensor:
    """Each sequence's share of verl's aggregated loss per unit weight, ``agg_loss`` (linear in
    the loss matrix) of its own row, over the data-parallel size (verl averages the ranks'
    gradients): what the step's loss sums, weighted."""
    info = {
        "dp_size": data["dp_size"],
        "batch_num_tokens": data["batch_num_tokens"],
        "global_batch_size": data["global_batch_size"],
        "loss_scale_factor": config.loss_scale_factor,
    }
    d = d.detach()
    rows = torch.eye(mask.shape[0], dtype=torch.bool, device=mask.device)
    terms = [
        agg_loss(loss_mat=d, loss_mask=mask & row[:, None], loss_agg_mode=config.loss_agg_mode,
                 **info)
        for row in rows
    ]  # fmt: skip
    return torch.stack(terms).to(torch.float64) / info["dp_size"]


def _renio_weights(opts: ReNIOOptions, r, mask, grad: bool, terms):
    """Per-sequence weights (float64): the global scope's provisional ones when training."""
    f, e, selected = option_factors(r, mask, opts)
    if opts.weight_scope == "global" and grad:
        w, _ = step_normalizer().weigh(f, e, terms(), mask, opts)
        return w, selected
    warn_single_sequence(opts, mask.shape[0])
    state = _mb_ema.to(f.device)
    w, mean_e = normalize_factors(f, e, opts.weight_norm, state)
    if opts.weight_norm == "ema" and grad:
        update_ema(_mb_ema, mean_e.cpu())
    if not opts.use_renio:
        w = torch.ones_like(w)
    return w, selected


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype)).sum() / mask.sum().clamp(min=1)


def _make_loss(base: str, opts: ReNIOOptions):
    def renio_distillation_loss(config, distillation_config, model_output, data):
        loss_config = distillation_config.distillation_loss
        mask = _padded(data["response_mask"], False).bool()
        grad = torch.is_grad_enabled()
        if opts.weight_scope == "global" and grad and not _HOOKED:
            raise RuntimeError(
                "renio_kernels: verl.workers.engine.base could not be imported when "
                "renio_kernels.integrations.verl was, so the per-step rescale of the global-scope "
                f"ReNIO losses is not installed; use renio_mb_{base}, or import this module "
                "after verl's engines"
            )
        if opts.weight_scope == "global" and grad and config.strategy not in _GRAD_STRATEGIES:
            raise NotImplementedError(
                f"renio_kernels: loss_mode renio_{base} (weights normalized over the optimizer "
                f"step) supports the strategies {_GRAD_STRATEGIES}, not {config.strategy!r}; "
                f"use renio_mb_{base} (normalized per micro-batch)"
            )
        if base == "forward_kl_topk":
            d, metrics = _vl.compute_forward_kl_topk(
                config=config, distillation_config=distillation_config,
                model_output=model_output, data=data,
            )  # fmt: skip
            width = d.shape[1]
            ls_x = _student_sampled(model_output, data, width)
            lt_x, bounded = _teacher_sampled_topk(data, width)
        else:
            if base == "k1" and not loss_config.use_policy_gradient:
                raise ValueError(
                    "renio_k1 without use_policy_gradient backpropagates k1, whose gradient does "
                    "not depend on the teacher; set use_policy_gradient=true or use renio_k3"
                )
            ls_x = no_padding_2_padding(model_output["log_probs"], data)
            lt_x = no_padding_2_padding(data["teacher_logprobs"], data).squeeze(-1)
            d = kl_penalty(logprob=ls_x, ref_logprob=lt_x, kl_penalty=base)
            metrics = {"distillation/abs_loss": Metric(AggregationType.MEAN, d[mask].abs().mean())}
            bounded = torch.zeros_like(mask)
        r = log_ratio(ls_x.float(), lt_x.float(), mask, opts.ratio_clip)

        def terms():
            if loss_config.use_policy_gradient:  # the loss is PPO's, not agg_loss(w d)
                return torch.zeros(mask.shape[0], dtype=torch.float64, device=mask.device)
            return _sequence_terms(config, data, d, mask)

        w, selected = _renio_weights(opts, r, mask, grad, terms)
        weighted = w.to(d.dtype).unsqueeze(-1) * d
        clamp = loss_config.loss_max_clamp
        metrics.update(_metrics(w, r, selected, mask, bounded, weighted, clamp, opts))
        if last_step is not None and not loss_config.use_policy_gradient:
            # the previous optimizer step's, whose scope was global: verl's own distillation/loss
            # is each micro-batch's provisional value under this scope
            metrics["renio/last_step_loss"] = last_step.loss.item()
            metrics["renio/last_step_grad_scale"] = last_step.grad_scale.item()
        return weighted, metrics

    renio_distillation_loss.__name__ = f"renio_{base}"
    return renio_distillation_loss


def _metrics(w, r, selected, mask, bounded, weighted, clamp, opts) -> dict:
    w = w.detach().float()
    metrics = {
        "renio/weight_mean": Metric(AggregationType.MEAN, w.mean()),
        "renio/weight_min": Metric(AggregationType.MIN, w.min()),
        "renio/weight_max": Metric(AggregationType.MAX, w.max()),
        "renio/selected_frac": Metric(AggregationType.MEAN, _masked_mean(selected.float(), mask)),
        "renio/log_ratio_mean": Metric(AggregationType.MEAN, _masked_mean(r.float(), mask)),
    }
    # tokens whose r is only a lower bound: outside the teacher's top-k and below ratio_clip
    loose = bounded & mask
    if opts.ratio_clip is not None:
        loose = loose & (r < opts.ratio_clip)
    metrics["renio/lt_bounded_frac"] = Metric(
        AggregationType.MEAN, _masked_mean(loose.float(), mask)
    )
    binds = torch.zeros_like(mask) if clamp is None else (weighted.detach().abs() > clamp) & mask
    binds_frac = _masked_mean(binds.float(), mask)
    metrics["renio/verl_clamp_frac"] = Metric(AggregationType.MEAN, binds_frac)
    if binds.any() and not torch.compiler.is_compiling():
        warnings.warn(
            "renio_kernels: verl's loss_max_clamp clamps the ReNIO-weighted distillation loss "
            "of some tokens (renio/verl_clamp_frac > 0), which changes their weight; set "
            "distillation.distillation_loss.loss_max_clamp=null to keep the weights exact",
            UserWarning,
            stacklevel=3,
        )
    return metrics


def register_renio_loss(names, base: str, **options):
    """Register a ReNIO loss under ``names`` (a name or a list) on verl's ``base`` divergence
    (one of ``BASES``) with these ReNIO options (``use_renio``, ``ratio_clip``, ``threshold``,
    ``weight_temperature``, ``weight_norm``, ``weight_scope``; SPEC defaults otherwise).
    Returns the loss function."""
    if base not in BASES:
        raise ValueError(f"unknown base {base!r}; expected one of {BASES}")
    allowed = (*_WEIGHT_OPTIONS, "weight_scope")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"register_renio_loss takes the ReNIO weight options {allowed}, not {unknown}: verl "
            "defines the divergence (loss_mode), its clamps (loss_max_clamp, log_prob_min_clamp) "
            "and the aggregation (actor.loss_agg_mode)"
        )
    opts = dataclasses.replace(ReNIOOptions(**options), reduction="sum")
    names = [names] if isinstance(names, str) else list(names)
    fn = _make_loss(base, opts)
    fn.renio_options = opts
    settings = _vl.DistillationLossSettings(
        names=names, use_topk=base == "forward_kl_topk", use_estimator=base != "forward_kl_topk"
    )
    return _vl.register_distillation_loss(settings)(fn)


def _register_defaults() -> None:
    for base in BASES:
        for prefix, scope in (("renio_", "global"), ("renio_mb_", "micro_batch")):
            if prefix + base not in _vl.DISTILLATION_LOSS_REGISTRY:
                register_renio_loss(prefix + base, base, weight_scope=scope)


_register_defaults()
