"""Our loss equals the paper trainer's eager loss block on random inputs.

``paper_block`` is the block as an eager trainer writes it (materialized log-softmaxes, the
per-element divergence, the clamp, the masks, the ReNIO weights), transcribed from docs/SPEC.md with
the paper's flag names and written independently of ``renio_kernels.reference``. The call that
replaces it is the one docs/integrations.md ("The paper's trainer") shows.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import renio_kernels as rk
from tests.helpers import make_inputs, rel_err


def paper_block(student_logits, teacher_logits, labels, args):
    vocab = student_logits.shape[-1]
    s_lp = F.log_softmax(student_logits / args.temperature, dim=-1)
    t_lp = F.log_softmax(teacher_logits[..., :vocab] / args.temperature, dim=-1)
    s_p, t_p = s_lp.exp(), t_lp.exp()
    if args.beta == 0:
        per_elem = t_p * (t_lp - s_lp)
    elif args.beta == 1:
        per_elem = s_p * (s_lp - t_lp)
    else:
        m_lp = torch.log((1 - args.beta) * s_p + args.beta * t_p)
        per_elem = args.beta * t_p * (t_lp - m_lp) + (1 - args.beta) * s_p * (s_lp - m_lp)
    if args.jsd_token_clip:
        per_elem = per_elem.clamp(0.0, args.jsd_token_clip)
    mask = (labels != -100).to(per_elem.dtype)
    n_tokens = mask.sum(-1).clamp(min=1)
    seq_div = (per_elem.sum(-1) * mask).sum(-1) / n_tokens
    with torch.no_grad():
        idx = labels.clamp(min=0).unsqueeze(-1)
        ratio = (s_lp.gather(-1, idx) - t_lp.gather(-1, idx)).squeeze(-1)
        ratio = ratio.clamp(max=args.kd_clamp)
        pivotal = ((ratio >= args.imp_token_threshold) & (mask > 0)).to(ratio.dtype)
        rbar = (ratio * pivotal).sum(-1) / pivotal.sum(-1).clamp(min=1)
        e = torch.exp(rbar / args.kd_sgo_tem)
        if args.weight_norm_type == "batch_mean":
            w = (e / e.mean()).clamp(max=10.0)
        elif args.weight_norm_type == "clamp":
            w = e.clamp(0.1, 10.0)
            w = w / w.mean()
        else:
            w = e
        if not args.use_renio:
            w = torch.ones_like(w)
    return (w * seq_div).mean()


def flags(**kw):
    defaults = dict(
        beta=0.0,
        temperature=1.0,
        jsd_token_clip=None,
        use_renio=True,
        kd_clamp=2.5,
        imp_token_threshold=0.8,
        kd_sgo_tem=1.0,
        weight_norm_type="batch_mean",
    )
    return SimpleNamespace(**{**defaults, **kw})


def our_call(student_logits, teacher_logits, labels, args):
    """The one call that replaces the block (docs/integrations.md, "The paper's trainer")."""
    return rk.renio_loss(
        student_logits,
        teacher_logits,
        labels,
        beta=args.beta,
        temperature=args.temperature,
        token_clip=args.jsd_token_clip,
        use_renio=args.use_renio,
        ratio_clip=args.kd_clamp,
        threshold=args.imp_token_threshold,
        weight_temperature=args.kd_sgo_tem,
        weight_norm=args.weight_norm_type,
        backend="torch",
    )


CASES = {
    "defaults": flags(),
    "paper-jsd-clip": flags(beta=0.5, jsd_token_clip=0.05, imp_token_threshold=0.1),
    "rkl-tau-clamp": flags(beta=1.0, temperature=0.8, weight_norm_type="clamp", kd_sgo_tem=0.5),
    "none-norm": flags(beta=0.2, weight_norm_type="none", imp_token_threshold=-0.5),
    "no-renio": flags(use_renio=False, jsd_token_clip=0.2),
}


@pytest.mark.parametrize("args", CASES.values(), ids=CASES.keys())
def test_one_call_equals_paper_block(args):
    s, t, labels = make_inputs(batch=4, seq=7, vocab=53, teacher_vocab=56, seed=5)
    s64 = s.double().requires_grad_()
    ref = paper_block(s64, t.double(), labels, args)
    (ref * 0.7).backward()
    s32 = s.clone().requires_grad_()
    loss = our_call(s32, t, labels, args)
    (loss * 0.7).backward()
    assert rel_err(loss, ref) < 1e-5
    assert rel_err(s32.grad, s64.grad) < 1e-5
