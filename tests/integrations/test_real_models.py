"""Models of real architectures whose forward soft-caps the logits under a config name of its own
(RecurrentGemma's ``logits_soft_cap``, xLSTM's ``output_logit_soft_cap``): the numerical check
finds them, the helper takes the logits path and equals a hand-written loss on the model's own
logits, where the fused-linear path would give a different loss. And ``logits_to_keep`` windows
that would drop completion labels are errors."""

from __future__ import annotations

import pytest
import torch

import renio_kernels as rk
from renio_kernels import ReNIOOptions

pytest.importorskip("transformers", reason="the HF integration needs transformers")

import transformers

from renio_kernels.integrations import run
from renio_kernels.integrations.hf import ReNIOTrainerMixin, renio_distillation_loss
from tests.helpers import rel_err
from tests.integrations.tiny_models import (
    prompt_completion_batch,
    tiny_llama,
    tiny_recurrent_gemma,
    tiny_xlstm,
)

OPTS = ReNIOOptions(beta=0.5, token_clip=0.5, threshold=0.1)


def own_logits_loss(student, teacher, ids, attn, comp):
    """The loss a user writes by hand from the models' own (soft-capped) logits."""
    logits = student(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]
    labels = ids[:, 1:].masked_fill(comp[:, 1:] == 0, -100)
    return rk.renio_loss(logits, teacher_logits, labels, backend="torch", **vars(OPTS))


def check_softcapped_student(student, monkeypatch):
    teacher = tiny_llama(1, hidden=48).eval()
    ids, attn, comp = prompt_completion_batch(4, 5, 7)
    assert "differ by up to" in run.fused_linear_mismatch(student)
    ref = own_logits_loss(student, teacher, ids, attn, comp)
    ref.backward()
    ref_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    loss = renio_distillation_loss(student, teacher, ids, attn, comp, options=OPTS, backend="torch")
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert all(
        rel_err(p.grad, g) < 1e-4 for p, g in zip(student.parameters(), ref_grads, strict=True)
    )
    with pytest.raises(ValueError, match=r"student's logits.*use fused_linear=False"):
        renio_distillation_loss(student, teacher, ids, attn, comp, fused_linear=True)
    # What the check prevents: the fused-linear path (hidden @ W.T, no cap) on this model.
    monkeypatch.setitem(run._MISMATCH, student, None)
    with torch.no_grad():
        fused = renio_distillation_loss(
            student, teacher, ids, attn, comp, options=OPTS, fused_linear=True, backend="torch"
        )
    assert rel_err(fused, ref) > 1e-3


def test_recurrent_gemma_logits_soft_cap(monkeypatch):
    assert transformers.RecurrentGemmaConfig().logits_soft_cap == 30.0  # the released default
    check_softcapped_student(tiny_recurrent_gemma(2), monkeypatch)


@pytest.mark.skipif(
    not hasattr(transformers, "xLSTMForCausalLM"), reason="this transformers has no xLSTM"
)
def test_xlstm_output_logit_soft_cap(monkeypatch):
    assert transformers.xLSTMConfig().output_logit_soft_cap == 30.0
    check_softcapped_student(tiny_xlstm(2), monkeypatch)


def test_logits_to_keep_that_drops_completion_labels_is_an_error():
    student, teacher = tiny_llama(0), tiny_llama(1, hidden=48).eval()
    ids, attn, comp = prompt_completion_batch(4, 5, 7)  # completions: the last 7 positions
    with pytest.raises(ValueError, match=r"logits_to_keep=1 .*completion width 7.*>= 7"):
        renio_distillation_loss(student, teacher, ids, attn, comp, logits_to_keep=1)
    with pytest.raises(ValueError, match=r"logits_to_keep=6 .* 4 completion label"):
        renio_distillation_loss(student, teacher, ids, attn, comp, logits_to_keep=6)
    full = renio_distillation_loss(student, teacher, ids, attn, comp, options=OPTS)
    kept = renio_distillation_loss(
        student, teacher, ids, attn, comp, options=OPTS, logits_to_keep=7
    )
    torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"logits_to_keep must be an int in \[1, 11\]"):
        renio_distillation_loss(student, teacher, ids, attn, comp, logits_to_keep=0)

    trainer = ReNIOTrainerMixin()
    trainer.teacher_model = teacher
    trainer.renio_logits_to_keep = 3
    batch = {"input_ids": ids, "attention_mask": attn, "completion_mask": comp}
    with pytest.raises(ValueError, match=r"renio_logits_to_keep=3 .*renio_logits_to_keep >= 7"):
        trainer.compute_loss(student, batch)
    trainer.renio_logits_to_keep = 7
    assert torch.isfinite(trainer.compute_loss(student, batch))
