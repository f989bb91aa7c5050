"""``weight_scope="global"`` inside a real ``transformers.Trainer`` (``ReNIOTrainerMixin``) and
TRL's trainer, in one process: 2 accumulated micro-batches give one batch's step, rescaled
before the Trainer's gradient clipping, with the step's loss logged. The 2-process runs are in
``test_data_parallel.py``."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from renio_kernels import ReNIOOptions, StepNormalizer

pytest.importorskip("transformers", reason="the HF integration needs transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
pytestmark = pytest.mark.filterwarnings("ignore")

from tests.integrations.trainer_runs import (  # noqa: E402
    LR,
    max_abs,
    max_abs_diff,
    one_batch_step,
    trainer_step,
)

OPTS = ReNIOOptions(beta=0.5, token_clip=0.5, threshold=0.1)
GLOBAL = dataclasses.replace(OPTS, weight_scope="global")
CLIP = 0.05  # binds: the step's gradient norm is several times larger


def test_hf_trainer_global_scope_accumulation_equals_one_batch(tmp_path):
    """2 x 2 with the global scope == one batch of 4. A clipping that binds: the clipped
    gradients show the rescale came before it (after it, they would differ by ``grad_scale``,
    0.41 here), the logged norm before clipping shows the gradient's scale."""
    ref = one_batch_step(OPTS, 4, max_grad_norm=CLIP)
    assert ref["grad_norm"] > 2 * CLIP
    run = trainer_step(GLOBAL, 2, 2, 4, max_grad_norm=CLIP, output_dir=str(tmp_path))
    result = run["trainer"].renio_step_result
    assert abs(result.grad_scale.item() - 1.0) > 0.1
    assert run["grad_norm"][0] == pytest.approx(ref["grad_norm"], rel=1e-5)
    scale = max_abs(ref["grads"])
    assert max_abs_diff(run["grads"], ref["grads"]) <= 2e-5 * scale
    assert max_abs_diff(run["params"], ref["params"]) <= 2e-5 * LR * scale
    torch.testing.assert_close(result.loss.float(), ref["loss"], rtol=1e-5, atol=0)
    (logged,) = run["logged"]
    assert logged == pytest.approx(ref["loss"].item(), rel=1e-5)
    assert not run["trainer"].renio_normalizer.pending


def test_hf_trainer_micro_batch_scope_still_averages(tmp_path):
    """The default scope is unchanged: the Trainer divides each micro-batch loss by the
    accumulation steps (``loss_is_scaled_for_ga`` False), and the logged loss is their mean."""
    run = trainer_step(OPTS, 2, 2, 4, output_dir=str(tmp_path))
    trainer = run["trainer"]
    assert trainer.loss_is_scaled_for_ga is False and trainer.renio_normalizer is None
    (logged,) = run["logged"]
    halves = [one_batch_step(OPTS, 2)["loss"]]  # rows 0-1; rows 2-3 below
    from renio_kernels.integrations.hf import renio_distillation_loss
    from tests.integrations.tiny_models import tiny_llama
    from tests.integrations.trainer_runs import batch, teacher

    ids, attn, comp = batch(4)
    halves.append(
        renio_distillation_loss(
            tiny_llama(0), teacher(), ids[2:], attn[2:], comp[2:], options=OPTS
        ).detach()  # fmt: skip
    )
    assert logged == pytest.approx(float(sum(halves)) / 2, rel=1e-5)


def test_hf_trainer_global_scope_eval_is_per_batch(tmp_path):
    """In eval mode the global scope computes the per-batch loss and leaves the step alone."""
    run = trainer_step(GLOBAL, 2, 2, 4, output_dir=str(tmp_path), logging=False)
    trainer = run["trainer"]
    from tests.integrations.trainer_runs import batch

    ids, attn, comp = batch(4)
    inputs = {"input_ids": ids, "attention_mask": attn, "completion_mask": comp}
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, inputs)
    trainer.model.train()
    assert not trainer.renio_normalizer.pending
    from renio_kernels.integrations.hf import renio_distillation_loss

    with torch.no_grad():
        ref = renio_distillation_loss(trainer.model, trainer.teacher_model, ids, attn, comp,
                                      options=OPTS)  # fmt: skip
    torch.testing.assert_close(loss, ref)


def test_global_scope_refuses_deepspeed():
    from accelerate.utils import DistributedType

    from renio_kernels.integrations.steps import TrainerWeightScope

    scope = TrainerWeightScope()
    scope.renio_options = GLOBAL
    scope.accelerator = types.SimpleNamespace(distributed_type=DistributedType.DEEPSPEED)
    with pytest.raises(ValueError, match="weight_scope='micro_batch' with DeepSpeed"):
        scope.renio_scope_kwargs(torch.device("cpu"), training=True)
    scope.accelerator = types.SimpleNamespace(distributed_type=DistributedType.NO)
    kwargs = scope.renio_scope_kwargs(torch.device("cpu"), training=True)
    assert isinstance(kwargs["normalizer"], StepNormalizer) and kwargs["ema_state"] is None
    assert scope.loss_is_scaled_for_ga is True


# --- TRL ----------------------------------------------------------------------------------


def test_trl_trainer_global_scope_accumulation_equals_one_batch(tmp_path, monkeypatch):
    """TRL generates one batch for the whole step and splits it into the micro-batches (same
    widths), so their concatenation is the one batch to compare with."""
    trl_mod = pytest.importorskip("renio_kernels.integrations.trl", reason="needs trl")
    from renio_kernels.integrations.run import distillation_loss
    from tests.integrations.tiny_models import tiny_llama
    from tests.integrations.trainer_runs import trl_step

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    trainer, seen = trl_step(trl_mod, str(tmp_path))
    teacher = trainer.teacher_model
    assert len(seen["inputs"]) == 2 and len(seen["grads"]) == 1
    whole = {k: torch.cat([x[k] for x in seen["inputs"]]) for k in seen["inputs"][0]}
    input_ids, attention_mask, labels, _ = trainer.renio_batch(whole)
    student = tiny_llama(0)
    loss = distillation_loss(
        student, teacher.eval(), labels, {"input_ids": input_ids, "attention_mask": attention_mask},
        options=OPTS, fused_linear=True, access=trainer.renio_access, backend="torch",
    )  # fmt: skip
    loss.backward()
    ref = [p.grad for p in student.parameters()]
    assert max_abs_diff(seen["grads"][0], ref) <= 2e-5 * max_abs(ref)
    torch.testing.assert_close(trainer.renio_step_result.loss.float(), loss.detach(), rtol=1e-5,
                               atol=0)  # fmt: skip
    (logged,) = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged == pytest.approx(loss.item(), rel=1e-5)
