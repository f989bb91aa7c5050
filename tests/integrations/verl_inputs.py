"""verl micro-batches as verl's FSDP engine builds them, verl's loss calls, and the float64
reference of the ReNIO losses registered in verl (for tests/integrations/test_verl.py, which
imports this only once verl is importable).

The reference is written from docs/SPEC.md and verl 0.9.1's formulas, not from the module.
"""

from __future__ import annotations

import torch
import verl.trainer.distillation.losses as L
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu
from verl.utils.torch_functional import logprobs_from_logits
from verl.workers.config import ActorConfig, DistillationConfig, DistillationLossConfig

import renio_kernels.integrations.verl as rv

V, K = 13, 4
PAPER = dict(ratio_clip=2.5, threshold=0.8, weight_temperature=1.0)


def _off_losses():
    """verl's losses with the ReNIO weights off (for the equality with verl's own)."""
    for base in rv.BASES:
        name = f"test_off_{base}"
        if name not in L.DISTILLATION_LOSS_REGISTRY:
            rv.register_renio_loss(name, base, use_renio=False, weight_scope="micro_batch")
    for norm in ("clamp", "none", "ema"):
        for scope in ("global", "micro_batch"):
            name = f"test_{norm}_{scope}_forward_kl_topk"
            if name not in L.DISTILLATION_LOSS_REGISTRY:
                rv.register_renio_loss(
                    name, "forward_kl_topk", weight_norm=norm, weight_scope=scope
                )


_off_losses()


def _nested(ts):
    return torch.nested.as_nested_tensor(ts, layout=torch.jagged)


def make_batch(seed: int, plens, rlens, masked=()):
    """Sequences whose sampled tokens are partly in the teacher's top-k, partly not."""
    g = torch.Generator().manual_seed(seed)
    n = sum(plens) + sum(rlens)
    teacher = (2.0 * torch.randn(n, V, generator=g, dtype=torch.float64)).log_softmax(-1)
    tlp, tid = teacher.topk(K, -1)
    seqs, off = [], 0
    for i, (p, r) in enumerate(zip(plens, rlens, strict=True)):
        s = torch.randint(0, V, (p + r,), generator=g)
        for t in range(p, p + r):  # every other response token: the teacher's 2nd choice
            if (t + i) % 2 == 0:
                s[t] = tid[off + t - 1, 1]
        seqs.append(s)
        off += p + r
    logits = torch.randn(n, V, generator=g) * 1.5
    off = 0
    for i, (s, p) in enumerate(zip(seqs, plens, strict=True)):
        for t in range(p, len(s)):  # the student confident where the teacher is not: pivotal
            if (t + i) % 3 == 1:
                logits[off + t - 1, s[t]] += 4.0
        off += len(s)
    return dict(
        seqs=seqs, plens=list(plens), rlens=list(rlens), teacher=teacher,
        tlp=tlp.float(), tid=tid, logits=logits, masked=set(masked),
    )  # fmt: skip


def rows_of(batch, idx):
    """Row ranges of sequences ``idx`` in the packed (N, V) layout."""
    cu = [0]
    for s in batch["seqs"]:
        cu.append(cu[-1] + len(s))
    return [torch.arange(cu[i], cu[i + 1]) for i in idx]


def micro_batch(batch, idx, *, dp_size, num_tokens, num_seqs, old_log_probs=None):
    rows = rows_of(batch, idx)
    seqs = [batch["seqs"][i] for i in idx]
    ps = [batch["plens"][i] for i in idx]
    masks = [
        torch.full((batch["rlens"][i],), i not in batch["masked"], dtype=torch.bool) for i in idx
    ]
    fields = {
        "input_ids": _nested(seqs),
        "prompts": _nested([s[:p] for s, p in zip(seqs, ps, strict=True)]),
        "responses": _nested([s[p:] for s, p in zip(seqs, ps, strict=True)]),
        "response_mask": _nested(masks),
        "teacher_ids": _nested([batch["tid"][r] for r in rows]),
        "teacher_logprobs": _nested([batch["tlp"][r] for r in rows]),
        # the estimators' teacher input: the sampled token's log-prob, (L, 1)
        "teacher_sampled": _nested(
            [_teacher_sampled(batch, i, r) for i, r in zip(idx, rows, strict=True)]
        ),
    }
    if old_log_probs is not None:
        fields["old_log_probs"] = _nested([old_log_probs[i] for i in idx])
    data = TensorDict(fields, batch_size=[len(idx)])
    tu.assign_non_tensor(
        data, dp_size=dp_size, batch_num_tokens=num_tokens, global_batch_size=num_seqs
    )
    return data


def _teacher_sampled(batch, i, rows):
    s = batch["seqs"][i]
    nxt = torch.roll(s, -1)
    return batch["teacher"][rows].gather(-1, nxt[:, None]).float()


def configs(mode, *, agg="token-mean", pg=False, clamp=None, strategy="fsdp", lp_clamp=-10.0):
    actor = ActorConfig(
        strategy=strategy, ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2, rollout_n=1,
        loss_agg_mode=agg,
    )  # fmt: skip
    loss = DistillationLossConfig(
        loss_mode=mode, topk=K, use_policy_gradient=pg, use_task_rewards=False,
        loss_max_clamp=clamp, log_prob_min_clamp=lp_clamp,
    )  # fmt: skip
    return actor, DistillationConfig(enabled=False, distillation_loss=loss)


def verl_loss(mode, data, logits_rows, seqs, *, distillation_only=False, **kw):
    """What verl's FSDP engine does for one micro-batch: the logits processor, the student's
    sampled log-probs, then the final loss."""
    actor, dist = configs(mode, **kw)
    cu = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
    topk = dist.distillation_loss.loss_settings.use_topk
    model_output = {}
    if topk:
        out = L.distillation_ppo_loss(actor, dist, data=data, student_logits=logits_rows[None])
        for k, v in out.items():
            model_output[k] = torch.nested.nested_tensor_from_jagged(v.squeeze(0), cu)
    else:
        data["teacher_logprobs"] = data["teacher_sampled"]
    if not distillation_only:
        lp = logprobs_from_logits(logits_rows, torch.roll(torch.cat(seqs), -1))
        model_output["log_probs"] = torch.nested.nested_tensor_from_jagged(lp, cu)
    if dist.distillation_loss.use_policy_gradient:
        # verl's distillation_ppo_loss also runs its task-reward PPO loss here (which needs
        # advantages); distillation_loss is the distillation part alone
        return L.distillation_loss(actor, dist, model_output, data)
    return L.distillation_ppo_loss(actor, dist, model_output=model_output, data=data)


# ---------------------------------------------------------------- float64 reference


def reference(batch, logits64, base, *, agg="token-mean", weight_norm="batch_mean",
              use_renio=True):  # fmt: skip
    """The whole batch's loss in float64 (one batch holding every sequence)."""
    w_terms, factors = [], []
    off = 0
    for i, (s, p, r) in enumerate(zip(batch["seqs"], batch["plens"], batch["rlens"], strict=True)):
        rows = torch.arange(off + p - 1, off + p + r - 1)
        off += len(s)
        x = s[p:]
        ls = logits64[rows].log_softmax(-1)
        ls_x = ls.gather(-1, x[:, None]).squeeze(-1)
        lt_x_true = batch["teacher"][rows].gather(-1, x[:, None]).squeeze(-1)
        if base == "forward_kl_topk":
            lt_k = batch["tlp"][rows].double()
            ls_k = ls.gather(-1, batch["tid"][rows])
            lt_c, ls_c = lt_k.clamp(min=-10), ls_k.clamp(min=-10)
            d = (lt_c.exp() * (lt_c - ls_c)).sum(-1).clamp(min=0)
            lt_x = teacher_at_sampled(batch, rows, x)
        else:
            lt_x = lt_x_true.float().double()
            kl = (lt_x - ls_x).clamp(-20, 20)
            if base == "k3":
                d = (kl.exp() - kl - 1).clamp(-10, 10)
            elif base == "k2":
                d = 0.5 * (ls_x - lt_x) ** 2
            else:  # k1 as verl's vanilla PPO loss uses it, advantage -d at ratio 1
                d = (ls_x - lt_x).detach() * torch.exp(ls_x - ls_x.detach())
        valid = i not in batch["masked"]
        rr = (ls_x - lt_x).clamp(max=PAPER["ratio_clip"]).detach()
        sel = (rr >= PAPER["threshold"]) & valid
        rbar = rr[sel].mean() if sel.any() else torch.zeros((), dtype=torch.float64)
        factors.append(torch.exp(rbar / PAPER["weight_temperature"]))
        if agg == "token-mean":
            w_terms.append(d.sum() if valid else d.sum() * 0)
        else:  # seq-mean-token-mean
            w_terms.append(d.mean() if valid else d.sum() * 0)
    e = torch.stack(factors)
    if not use_renio:
        w = torch.ones_like(e)
    elif weight_norm == "batch_mean":
        w = torch.clamp(e / e.mean(), max=10)
    elif weight_norm == "clamp":
        f = e.clamp(0.1, 10)
        w = f / f.mean()
    else:
        w = e
    total = sum(wb * t for wb, t in zip(w, w_terms, strict=True))
    if agg == "token-mean":
        denom = sum(r for i, r in enumerate(batch["rlens"]) if i not in batch["masked"])
    else:
        denom = len(batch["seqs"])
    return total / denom


def teacher_at_sampled(batch, rows, x):
    """``lt[x]`` as verl's top-k data allows: exact inside the top-k, else its upper bound."""
    lt_k = batch["tlp"][rows].double()
    inside = (batch["tid"][rows] == x[:, None]).any(-1)
    exact = batch["teacher"][rows].gather(-1, x[:, None]).squeeze(-1).float().double()
    bound = torch.minimum(lt_k.min(-1).values, torch.log(1 - lt_k.exp().sum(-1)))
    return torch.where(inside, exact, bound)


def check_grad(got, want, rtol=2e-5, atol=2e-7):
    err = (got.double() - want).abs().max().item()
    assert err <= atol + rtol * want.abs().max().item(), err
    return err


SHAPE = dict(plens=[3, 2, 4, 2], rlens=[5, 1, 6, 4], masked=(1,))


def run_steps(mode, batch, groups, *, leaf, agg="token-mean", dp_size=1, **kw):
    """Backward every micro-batch (lists of sequence indices) into ``leaf``; their losses."""
    tokens = sum(r for i, r in enumerate(batch["rlens"]) if i not in batch["masked"]) * dp_size
    losses = []
    old_log_probs = kw.pop("old_log_probs", None)
    for idx in groups:
        data = micro_batch(
            batch, idx, dp_size=dp_size, num_tokens=tokens, num_seqs=len(batch["seqs"]) * dp_size,
            old_log_probs=old_log_probs,
        )  # fmt: skip
        rows = torch.cat(rows_of(batch, idx))
        seqs = [batch["seqs"][i] for i in idx]
        loss, metrics = verl_loss(mode, data, leaf[rows], seqs, agg=agg, **kw)
        if loss.requires_grad:
            loss.backward()
        losses.append((loss.detach(), metrics))
    return losses


def ref_grad(batch, base, **kw):
    x = batch["logits"].double().requires_grad_()
    loss = reference(batch, x, base, **kw)
    loss.backward()
    return loss.detach(), x.grad


def sampled_log_probs(batch):
    ls = batch["logits"].log_softmax(-1)
    old, off = [], 0
    for s, p, r in zip(batch["seqs"], batch["plens"], batch["rlens"], strict=True):
        rows = torch.arange(off + p - 1, off + p + r - 1)
        old.append(ls[rows].gather(-1, s[p:, None]).squeeze(-1))
        off += len(s)
    return old
