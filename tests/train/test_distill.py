"""``DistillLoss`` through the shared step (``integrations.run``): the fused-linear and logits
paths give the same loss and student gradients, with the teacher on the student's prompt or its
own (opsd); a soft-capping model fails the exactness check before a fused-linear run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from renio_kernels import ReNIOOptions
from renio_kernels.train.distill import DistillLoss
from renio_kernels.train.generation import Rollout
from tests.helpers import rel_err
from tests.integrations.tiny_models import prompt_completion_batch, tiny_gemma2, tiny_llama

OPTS = ReNIOOptions(beta=0.5, token_clip=0.3, threshold=0.1)


def rollout() -> Rollout:
    ids, attn, comp = prompt_completion_batch(3, 4, 6, seed=1)
    return Rollout(ids[:, :4], attn[:, :4], ids[:, 4:], comp[:, 4:], ["", "", ""])


def teacher_prompt():
    """A longer, differently padded prompt for the teacher (``--mode opsd``)."""
    ids, attn, _ = prompt_completion_batch(3, 6, 1, seed=2)
    return ids[:, :6], attn[:, :6]


def loss_and_grads(impl, student, teacher, batch, t_prompt):
    cfg = SimpleNamespace(loss_impl=impl, objective="renio", backend="torch")
    student.zero_grad()
    loss, stats = DistillLoss(cfg, OPTS)(student, teacher, batch, t_prompt)
    loss.backward()
    return loss.detach(), stats, [p.grad.clone() for p in student.parameters()]


@pytest.mark.parametrize("opsd", [False, True], ids=["opd", "opsd"])
def test_fused_linear_and_logits_agree(opsd):
    student, teacher = tiny_llama(0), tiny_llama(1, hidden=48).eval()
    batch, t_prompt = rollout(), teacher_prompt() if opsd else None
    fused, f_stats, f_grads = loss_and_grads("fused-linear", student, teacher, batch, t_prompt)
    logits, l_stats, l_grads = loss_and_grads("logits", student, teacher, batch, t_prompt)
    assert rel_err(fused, logits) < 1e-5
    assert rel_err(f_stats["weights"], l_stats["weights"]) < 1e-5
    assert max(rel_err(a, b) for a, b in zip(f_grads, l_grads, strict=True)) < 1e-4


def test_softcapped_teacher_needs_the_logits_path():
    student, teacher = tiny_llama(0), tiny_gemma2(1).eval()
    cfg = SimpleNamespace(loss_impl="fused-linear", objective="renio", backend="torch")
    with pytest.raises(ValueError, match=r"teacher's logits.*use --loss-impl logits"):
        DistillLoss(cfg, OPTS).check_models(student, teacher)
    loss, _, _ = loss_and_grads("logits", student, teacher, rollout(), None)
    assert torch.isfinite(loss)
