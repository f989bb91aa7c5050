"""``weight_scope="global"`` under real data parallelism, on CPU (gloo): a DDP and an FSDP2
(``fully_shard``) student, 2 ranks x 2 accumulation micro-batches, the loss computed the way the
integrations compute it (``renio_distillation_loss``: the whole step inside the wrapper's
``forward``, the ``lm_head`` through ``gathered_lm_head``), give the gradients and the
parameters after an SGD step of one process on one batch holding every sequence
(``weight_scope="micro_batch"``); so do the Trainer with ``ReNIOTrainerMixin`` and TRL's trainer
under accelerate on 2 processes. Also: what DDP does when the lm_head weight is read outside
its ``forward``."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
from torch import nn

import renio_kernels as rk
from tests.distributed import run_workers

pytest.importorskip("transformers", reason="the tiny students are transformers models")
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")

WORLD, MICRO, PER_MICRO = 2, 2, 2
N_SEQ = WORLD * MICRO * PER_MICRO
# (weight_norm, reduction): the cap-free batch mean over sequences, and the running mean over
# tokens (its first step normalizes by the step's mean, which one batch must reproduce).
CASES = (("batch_mean", "sequence_mean"), ("ema", "token_mean"))
LR = 0.5


def _options(weight_norm, reduction, scope):
    return rk.ReNIOOptions(beta=0.5, token_clip=0.5, threshold=0.1, weight_norm=weight_norm,
                           reduction=reduction, weight_scope=scope)  # fmt: skip


def _full(g: torch.Tensor) -> torch.Tensor:
    return g.full_tensor() if hasattr(g, "full_tensor") else g


def _max_diff(xs, refs) -> float:
    return max((x - r).abs().max().item() for x, r in zip(xs, refs, strict=True))


def _one_batch(student, teacher, batch, opts):
    """Gradients and parameters after one SGD step of one process on the whole batch."""
    from renio_kernels.integrations.hf import renio_distillation_loss

    ema = torch.full((), float("nan"))
    loss = renio_distillation_loss(student, teacher, *batch, options=opts, ema_state=ema,
                                   fused_linear=True, backend="torch")  # fmt: skip
    loss.backward()
    grads = [p.grad.clone() for p in student.parameters()]
    torch.optim.SGD(student.parameters(), lr=LR).step()
    return loss.detach(), grads, [p.detach().clone() for p in student.parameters()]


def _worker(rank, world, wrap, out):
    from renio_kernels.integrations.hf import renio_distillation_loss
    from tests.integrations.tiny_models import prompt_completion_batch, tiny_llama

    teacher = tiny_llama(1, hidden=48).eval()
    batch = prompt_completion_batch(N_SEQ, 4, 6, seed=5)
    figures = {}
    for weight_norm, reduction in CASES:
        ref_loss, ref_grads, ref_params = _one_batch(
            tiny_llama(0), teacher, batch, _options(weight_norm, reduction, "micro_batch")
        )
        model = tiny_llama(0)
        if wrap == "ddp":
            # find_unused_parameters=True: the step runs inside DDP's forward, so its graph
            # traversal sees the lm_head weight too (outside forward this setting fails).
            student = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            student = fully_shard(model)
        opts = _options(weight_norm, reduction, "global")
        norm = rk.StepNormalizer()
        for k in range(MICRO):
            last = k == MICRO - 1
            start = (rank * MICRO + k) * PER_MICRO
            rows = [x[start : start + PER_MICRO] for x in batch]
            if wrap == "ddp":
                sync = contextlib.nullcontext() if last else student.no_sync()
            else:  # what accelerate's no_sync does for FSDP2
                student.set_requires_gradient_sync(last)
                sync = contextlib.nullcontext()
            with sync:
                loss = renio_distillation_loss(student, teacher, *rows, options=opts,
                                               normalizer=norm, fused_linear=True,
                                               backend="torch")  # fmt: skip
                loss.backward()
        result = norm.finish(student.parameters())
        grads = [_full(p.grad) for p in student.parameters()]
        torch.optim.SGD(student.parameters(), lr=LR).step()
        params = [_full(p.detach()) for p in student.parameters()]
        grad_diff = _max_diff(grads, ref_grads)
        param_diff = _max_diff(params, ref_params)
        grad_scale = max(r.abs().max().item() for r in ref_grads)
        figures[(weight_norm, reduction)] = (grad_diff, grad_scale, param_diff)
        assert grad_diff <= 2e-5 * grad_scale, (weight_norm, reduction, grad_diff, grad_scale)
        assert param_diff <= 2e-5 * LR * grad_scale, (weight_norm, reduction, param_diff)
        torch.testing.assert_close(result.loss.float(), ref_loss, rtol=1e-5, atol=0)
        if wrap == "fsdp2":  # the gradients stayed sharded, and were rescaled shard by shard
            assert all(hasattr(p.grad, "to_local") for p in student.parameters())
    if rank == 0:
        out.put(figures)


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_global_scope_over_ranks_and_micro_batches_equals_one_batch(wrap):
    import multiprocessing

    if wrap == "fsdp2":
        pytest.importorskip("torch.distributed.fsdp", reason="needs FSDP2")
    out = multiprocessing.get_context("spawn").SimpleQueue()
    run_workers(_worker, WORLD, wrap, out)
    figures = out.get()
    print(f"\n{wrap}: (max|grad diff|, max|grad|, max|param diff| after SGD lr={LR}):", figures)


# --- DDP and a weight read outside its forward -----------------------------------------------


class _Backbone(nn.Module):
    """A model whose forward stops at the hidden states; the loss reads ``lm_head`` itself."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 11, bias=False)

    def forward(self, x):
        return torch.tanh(self.body(x))


def _outside_forward_worker(rank, world):
    for mode in ("plain", "unused", "bypass"):
        torch.manual_seed(0)
        model = _Backbone()
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=mode == "unused")
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(2, 3, 8, generator=g)
        labels = torch.randint(0, 11, (2, 3), generator=g)
        hidden = model(x) if mode == "bypass" else ddp(x)
        loss = rk.fused_linear_renio_loss(hidden, model.lm_head.weight, torch.randn(2, 3, 8),
                                          torch.randn(11, 8), labels, backend="torch")  # fmt: skip
        if mode == "unused":
            with pytest.raises(RuntimeError, match="mark a variable ready only once"):
                loss.backward()
            continue
        loss.backward()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(grads) for _ in range(world)]
        dist.all_gather(gathered, grads)
        assert torch.equal(gathered[0], gathered[1]) == (mode == "plain"), mode


def test_ddp_with_the_lm_head_read_outside_forward():
    """Three ways to get it wrong or right, when forward returns the hidden states and the loss
    reads ``lm_head.weight`` outside it. Plain DDP: the gradients are still averaged (the
    reducer's hooks sit on every parameter). ``find_unused_parameters=True``: the backward fails
    (the graph traversal from the forward's output marked ``lm_head`` unused, then its gradient
    arrived). Calling the inner module instead of DDP's forward: the gradients are silently not
    synchronized. The integrations avoid all three by running the whole step inside the
    wrapper's forward."""
    run_workers(_outside_forward_worker, WORLD)


# --- the Trainer under accelerate, 2 CPU processes -------------------------------------------


def _trainer_worker(rank, world, output_dir, out):
    from accelerate.utils import DistributedType

    from tests.integrations import trainer_runs as tr

    tr.accelerate_env(rank, world)
    opts = _options("batch_mean", "sequence_mean", "micro_batch")
    global_opts = _options("batch_mean", "sequence_mean", "global")
    run = tr.trainer_step(global_opts, PER_MICRO, MICRO, N_SEQ, max_grad_norm=0.05,
                          output_dir=output_dir)  # fmt: skip
    trainer = run["trainer"]
    assert trainer.accelerator.distributed_type == DistributedType.MULTI_CPU
    assert trainer.accelerator.num_processes == world
    assert isinstance(trainer.model_wrapped, nn.parallel.DistributedDataParallel)
    ref = tr.one_batch_step(opts, N_SEQ, max_grad_norm=0.05)
    scale = tr.max_abs(ref["grads"])
    grad_diff = tr.max_abs_diff(run["grads"], ref["grads"])
    param_diff = tr.max_abs_diff(run["params"], ref["params"])
    assert grad_diff <= 2e-5 * scale, (grad_diff, scale)
    assert param_diff <= 2e-5 * tr.LR * scale, (param_diff, scale)
    result = trainer.renio_step_result
    torch.testing.assert_close(result.loss.float(), ref["loss"], rtol=1e-5, atol=0)
    (logged,) = run["logged"]
    assert logged == pytest.approx(ref["loss"].item(), rel=1e-5)
    assert run["grad_norm"][0] == pytest.approx(ref["grad_norm"], rel=1e-5)  # before clipping
    if rank == 0:
        out.put((grad_diff, scale, param_diff, result.grad_scale.item()))


def test_trainer_under_accelerate_on_2_processes_equals_one_batch(tmp_path):
    """``ReNIOTrainerMixin`` + ``Trainer`` on 2 gloo processes (accelerate's MULTI_CPU, the model
    wrapped in DDP), 2 micro-batches each, ``weight_scope="global"``, clipping that binds: the
    optimizer sees one process's clipped gradient of one batch of all 8 sequences."""
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    import multiprocessing

    out = multiprocessing.get_context("spawn").SimpleQueue()
    run_workers(_trainer_worker, WORLD, str(tmp_path), out)
    grad_diff, scale, param_diff, grad_scale = out.get()
    print(f"\nTrainer x 2 processes: max|grad diff| {grad_diff:.3g} (max|grad| {scale:.3g}), "
          f"max|param diff| {param_diff:.3g}, grad_scale {grad_scale:.4f}")  # fmt: skip


def _trl_worker(rank, world, output_dir, out):
    import os

    from renio_kernels.integrations import trl as trl_mod
    from renio_kernels.integrations.run import distillation_loss
    from tests.integrations import trainer_runs as tr
    from tests.integrations.tiny_models import tiny_llama

    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    tr.accelerate_env(rank, world)
    trainer, seen = tr.trl_step(trl_mod, output_dir)
    assert trainer.accelerator.num_processes == world
    # The reference: one process, the step's 4 micro-batches (each rank's generations; their
    # widths differ across ranks) under one StepNormalizer over a group of one rank.
    every = [None] * world
    dist.all_gather_object(every, seen["inputs"])
    groups = [dist.new_group([r]) for r in range(world)]
    norm = rk.StepNormalizer(group=groups[rank])
    student = tiny_llama(0)
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    for inputs in (x for share in every for x in share):
        input_ids, attention_mask, labels, _ = trainer.renio_batch(inputs)
        loss = distillation_loss(
            student, teacher, labels, {"input_ids": input_ids, "attention_mask": attention_mask},
            options=trainer.renio_options, normalizer=norm, fused_linear=True,
            access=trainer.renio_access, backend="torch",
        )  # fmt: skip
        loss.backward()
    result = norm.finish(student.parameters())
    ref = [p.grad for p in student.parameters()]
    grad_diff, scale = tr.max_abs_diff(seen["grads"][0], ref), tr.max_abs(ref)
    assert grad_diff <= 2e-5 * scale, (grad_diff, scale)
    torch.testing.assert_close(trainer.renio_step_result.loss, result.loss, rtol=1e-6, atol=0)
    (logged,) = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged == pytest.approx(result.loss.item(), rel=1e-5)
    if rank == 0:
        out.put((grad_diff, scale))


def test_trl_trainer_under_accelerate_on_2_processes(tmp_path):
    """``ReNIODistillationTrainer`` on 2 gloo processes, 2 micro-batches of on-policy generations
    each, ``weight_scope="global"``: the step's gradient equals one process's over the same 4
    micro-batches (which ``tests/test_weight_scope.py`` shows equals one batch of them all)."""
    pytest.importorskip("renio_kernels.integrations.trl", reason="needs trl")
    import multiprocessing

    out = multiprocessing.get_context("spawn").SimpleQueue()
    run_workers(_trl_worker, WORLD, str(tmp_path), out)
    grad_diff, scale = out.get()
    print(f"\nTRL x 2 processes: max|grad diff| {grad_diff:.3g} (max|grad| {scale:.3g})")
