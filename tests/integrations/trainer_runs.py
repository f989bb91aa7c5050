"""One optimizer step of a real ``transformers.Trainer`` with ``ReNIOTrainerMixin`` (in this
process, or in each process of a gloo group under accelerate), and the same step computed by
hand on one batch holding every sequence: what the global-scope tests compare."""

from __future__ import annotations

import os

import torch

from renio_kernels import ReNIOOptions
from renio_kernels.integrations.hf import ReNIOTrainerMixin, renio_distillation_loss
from tests.integrations.tiny_models import prompt_completion_batch, tiny_llama

LR = 0.5  # SGD, so the parameters after the step are the gradients seen through a linear map


def teacher():
    return tiny_llama(1, hidden=48).eval()


def batch(n: int):
    return prompt_completion_batch(n, 4, 6, seed=3)


def accelerate_env(rank: int, world: int) -> None:
    """What ``accelerate launch --cpu`` / ``torchrun`` would export; the gloo group that
    ``tests.distributed.run_workers`` initialized is then the one accelerate uses."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT="29531")  # fmt: skip


def trainer_step(opts: ReNIOOptions, per_device: int, accum: int, n: int, *, max_grad_norm=0.0,
                 output_dir: str, logging: bool = True) -> dict:  # fmt: skip
    """One optimizer step over ``n`` sequences (every process's share of ``batch(n)``); returns
    the gradients the optimizer saw (after clipping), the parameters after the step, the logged
    loss and gradient norm (before clipping: a clipping that binds hides the gradient's scale)
    and the trainer."""
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    ids, attn, comp = batch(n)
    rows = [
        {"input_ids": ids[i], "attention_mask": attn[i], "completion_mask": comp[i]}
        for i in range(n)
    ]
    seen: dict = {"grads": [], "micro_batches": 0}

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            seen["grads"].append([p.grad.detach().clone() for p in model.parameters()])

    class DistillTrainer(ReNIOTrainerMixin, Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, model, inputs, **kwargs):
            seen["micro_batches"] += 1
            return super().compute_loss(model, inputs, **kwargs)

    args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accum, max_steps=1, learning_rate=LR, optim="sgd",
        lr_scheduler_type="constant", max_grad_norm=max_grad_norm, remove_unused_columns=False,
        report_to=[], save_strategy="no", logging_strategy="steps" if logging else "no",
        logging_steps=1, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = DistillTrainer(
        model=tiny_llama(0), args=args, train_dataset=rows,
        data_collator=lambda items: {k: torch.stack([x[k] for x in items]) for k in items[0]},
        callbacks=[Grab()],
    )  # fmt: skip
    trainer.teacher_model = teacher()
    trainer.renio_options = opts
    trainer.train()
    assert len(seen["grads"]) == 1 and seen["micro_batches"] == accum
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "grads": seen["grads"][0],
        "params": [p.detach().clone() for p in trainer.model.parameters()],
        "logged": [h["loss"] for h in logs],
        "grad_norm": [h.get("grad_norm") for h in logs],
        "trainer": trainer,
    }


def one_batch_step(opts: ReNIOOptions, n: int, *, max_grad_norm=0.0) -> dict:
    """The same step by hand: one process, one batch of all ``n`` sequences, micro_batch scope,
    then clipping and SGD as the Trainer does them."""
    student = tiny_llama(0)
    ema = torch.full((), float("nan"))
    loss = renio_distillation_loss(student, teacher(), *batch(n), options=opts, ema_state=ema)
    loss.backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in student.parameters()])
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm)
    grads = [p.grad.clone() for p in student.parameters()]
    torch.optim.SGD(student.parameters(), lr=LR).step()
    return {
        "loss": loss.detach(),
        "grad_norm": norm.item(),
        "grads": grads,
        "params": [p.detach().clone() for p in student.parameters()],
    }


def max_abs_diff(xs, refs) -> float:
    return max((x - r).abs().max().item() for x, r in zip(xs, refs, strict=True))


def max_abs(xs) -> float:
    return max(x.abs().max().item() for x in xs)


def trl_step(trl_mod, output_dir: str, *, max_grad_norm: float = 0.0):
    """One optimizer step of ``ReNIODistillationTrainer`` (2 micro-batches of 2 on-policy
    generations per process, ``weight_scope="global"``); returns the trainer and what it saw:
    each micro-batch's inputs and the gradients right after ``finish`` (before clipping)."""
    from datasets import Dataset

    from tests.integrations.test_trl import tiny_tokenizer

    seen: dict = {"inputs": [], "grads": []}

    class Recording(trl_mod.ReNIODistillationTrainer):
        def _renio_loss(self, student, inputs):
            keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
            seen["inputs"].append({k: inputs[k].clone() for k in keys})
            return super()._renio_loss(student, inputs)

        def training_step(self, *args, **kwargs):
            out = super().training_step(*args, **kwargs)
            if self.accelerator.sync_gradients:
                seen["grads"].append([p.grad.clone() for p in self.model.parameters()])
            return out

    args = trl_mod.ReNIODistillationConfig(
        output_dir=output_dir, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=1, learning_rate=1e-3, max_completion_length=6, bf16=False, use_cpu=True,
        report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True,
        max_grad_norm=max_grad_norm, renio_backend="torch", renio_fused_linear=True, beta=0.5,
        token_clip=0.5, threshold=0.1, weight_scope="global",
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    prompts = [" ".join(f"w{int(i)}" for i in torch.randint(3, 64, (4,), generator=g))
               for _ in range(8)]  # fmt: skip
    trainer = Recording(model=tiny_llama(0), teacher_model=tiny_llama(1, hidden=48), args=args,
                        train_dataset=Dataset.from_dict({"prompt": prompts}),
                        processing_class=tiny_tokenizer())  # fmt: skip
    assert trainer.loss_is_scaled_for_ga is True
    trainer.train()
    assert len(seen["inputs"]) == 2 and len(seen["grads"]) == 1
    return trainer, seen
