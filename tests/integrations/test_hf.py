"""The Hugging Face helper: shifting and masking, fused vs logits paths, and a real Trainer with
gradient accumulation 1 vs 2 on tiny randomly initialized Llama models (nothing downloaded)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import renio_kernels as rk
from renio_kernels import ReNIOOptions
from tests.helpers import rel_err

pytest.importorskip("transformers", reason="the HF integration needs transformers")

from renio_kernels.integrations.hf import (
    ReNIOTrainerMixin,
    completion_labels,
    fused_linear_supported,
    renio_distillation_loss,
)
from tests.integrations.tiny_models import (
    prompt_completion_batch,
    tiny_gemma2,
    tiny_llama,
)

OPTS = ReNIOOptions(beta=0.5, token_clip=0.5, threshold=0.1)


@pytest.fixture(scope="module")
def models():
    return tiny_llama(0), tiny_llama(1, hidden=48).eval()


def test_completion_labels_shift_and_mask():
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    comp = torch.tensor([[0, 0, 1, 1, 0]])
    assert completion_labels(ids, comp).tolist() == [[-100, 7, 8, -100]]
    with pytest.raises(ValueError, match="same"):
        completion_labels(ids, comp[:, :3])


def manual_loss(student, teacher, ids, attn, comp, opts):
    """What a user would write by hand: logits, shift, mask, renio_loss."""
    logits = student(input_ids=ids, attention_mask=attn).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids, attention_mask=attn).logits[:, :-1]
    labels = ids[:, 1:].masked_fill(comp[:, 1:] == 0, -100)
    return rk.renio_loss(logits, teacher_logits, labels, backend="torch", **vars(opts))


@pytest.mark.parametrize("fused", [False, True])
def test_helper_matches_manual_loss(models, fused):
    student, teacher = models
    ids, attn, comp = prompt_completion_batch(4, 5, 7)
    student.zero_grad()
    ref = manual_loss(student, teacher, ids, attn, comp, OPTS)
    ref.backward()
    ref_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    loss = renio_distillation_loss(
        student, teacher, ids, attn, comp, options=OPTS, fused_linear=fused, backend="torch",
        logits_to_keep=7,
    )  # fmt: skip
    loss.backward()
    assert teacher.lm_head.weight.grad is None
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for p, g in zip(student.parameters(), ref_grads, strict=True):
        assert rel_err(p.grad, g) < 1e-4


@pytest.mark.parametrize("fused", [False, True])
def test_helper_under_bf16_autocast(models, fused):
    """fp32 models under CPU bf16 autocast: the loss stays fp32 and within bf16 error of the
    fp32 run (the logits path sees bf16 logits; the fused path forms fp32 logits itself)."""
    student, teacher = models
    ids, attn, comp = prompt_completion_batch(4, 5, 7)
    runs = []
    for autocast in (False, True):
        student.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = renio_distillation_loss(
                student, teacher, ids, attn, comp, options=OPTS, fused_linear=fused, backend="torch"
            )
        loss.backward()
        runs.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
    (ref, ref_grads), (loss, grads) = runs
    assert loss.dtype == torch.float32
    assert rel_err(loss, ref) < 2e-3
    assert max(rel_err(g, r) for g, r in zip(grads, ref_grads, strict=True)) < 5e-2


def test_fused_eligibility():
    # Gemma 2 reads the cap from its config at each forward: None, then the released models' 30.
    plain = tiny_gemma2(0, softcap=None)
    assert fused_linear_supported(plain)
    plain.config.final_logit_softcapping = 30.0
    assert not fused_linear_supported(plain)
    with pytest.raises(ValueError, match="fused_linear=True"):
        ids, attn, comp = prompt_completion_batch(2, 3, 4)
        renio_distillation_loss(plain, plain, ids, attn, comp, fused_linear=True)


def test_softcapped_student_falls_back_to_the_logits_path(models):
    """A Gemma 2 student soft-caps its logits: with the automatic choice the helper takes the
    logits path (the model's capped logits, as a hand-written loss); forcing fused-linear is an
    error naming the logits path."""
    _, teacher = models
    student = tiny_gemma2(2)
    ids, attn, comp = prompt_completion_batch(4, 5, 7)
    ref = manual_loss(student, teacher, ids, attn, comp, OPTS)
    ref.backward()
    ref_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    loss = renio_distillation_loss(student, teacher, ids, attn, comp, options=OPTS, backend="torch")
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for p, g in zip(student.parameters(), ref_grads, strict=True):
        assert rel_err(p.grad, g) < 1e-4
    with pytest.raises(ValueError, match=r"student's logits.*use fused_linear=False"):
        renio_distillation_loss(student, teacher, ids, attn, comp, fused_linear=True)


# --- a real transformers.Trainer ------------------------------------------------------------


_RUNS: dict = {}


def run_trainer(per_device: int, accum: int, opts: ReNIOOptions, n: int = 4):
    """One optimizer step over ``n`` sequences; returns the gradients the optimizer saw
    (memoized: several tests look at the same run)."""
    key = (per_device, accum, opts, n)
    if key not in _RUNS:
        _RUNS[key] = _run_trainer(per_device, accum, opts, n)
    return _RUNS[key]


def _run_trainer(per_device: int, accum: int, opts: ReNIOOptions, n: int):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    ids, attn, comp = prompt_completion_batch(n, 4, 6, seed=3)
    rows = [
        {"input_ids": ids[i], "attention_mask": attn[i], "completion_mask": comp[i]}
        for i in range(n)
    ]

    def collate(items):
        return {k: torch.stack([x[k] for x in items]) for k in items[0]}

    seen: dict[str, list] = {"grads": [], "batches": []}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            seen["grads"].append([p.grad.detach().clone() for p in model.parameters()])

    class DistillTrainer(ReNIOTrainerMixin, Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, model, inputs, **kwargs):
            seen["batches"].append(inputs["input_ids"].clone())
            return super().compute_loss(model, inputs, **kwargs)

    student = tiny_llama(0)
    args = TrainingArguments(
        output_dir="/tmp/renio-hf-test",
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accum,
        max_steps=1,
        learning_rate=1e-3,
        max_grad_norm=0.0,
        remove_unused_columns=False,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = DistillTrainer(
        model=student, args=args, train_dataset=rows, data_collator=collate, callbacks=[Grab()]
    )
    trainer.teacher_model = tiny_llama(1, hidden=48).eval()
    trainer.renio_options = opts
    trainer.train()
    assert len(seen["grads"]) == 1 and len(seen["batches"]) == accum
    return seen["grads"][0], seen["batches"], (ids, attn, comp), trainer.teacher_model


def max_rel(a, b):
    return max(rel_err(x, y) for x, y in zip(a, b, strict=True))


def test_trainer_accumulation_averages_micro_batch_losses():
    """GA=2: the step's gradient is that of the mean of the two micro-batches' ReNIO losses,
    each with its weights normalized within the micro-batch (the documented semantics)."""
    grads, batches, (ids, attn, comp), teacher = run_trainer(2, 2, OPTS)
    assert torch.equal(batches[0], ids[:2]) and torch.equal(batches[1], ids[2:])
    student = tiny_llama(0)
    total = sum(
        renio_distillation_loss(
            student, teacher, ids[sl], attn[sl], comp[sl], options=OPTS, backend="torch"
        )
        for sl in (slice(0, 2), slice(2, 4))
    )
    (total / 2).backward()
    assert max_rel(grads, [p.grad for p in student.parameters()]) < 1e-5


def test_trainer_accumulation_1_vs_2_same_gradients():
    """Where the weights do not depend on the batch (``weight_norm="none"``; ``use_renio=False``
    likewise), 1 x 4 and 2 x 2 give the same step."""
    opts = ReNIOOptions(beta=1.0, threshold=0.1, weight_norm="none")
    g1, _, _, _ = run_trainer(4, 1, opts)
    g2, _, _, _ = run_trainer(2, 2, opts)
    assert max_rel(g1, g2) < 1e-5


def test_trainer_batch_mean_weights_are_per_micro_batch():
    """With batch-normalized weights the two settings differ, as documented (not a bug): the
    test guards against a silent change of semantics."""
    g1, _, _, _ = run_trainer(4, 1, OPTS)
    g2, _, _, _ = run_trainer(2, 2, OPTS)
    assert max_rel(g1, g2) > 1e-3


def test_mixin_needs_completion_mask():
    if importlib.util.find_spec("accelerate") is None:
        pytest.skip("transformers.Trainer needs accelerate")
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        ReNIOTrainerMixin().compute_loss(None, {"input_ids": torch.zeros(1, 2)})
