"""``--weight-scope global`` (the script's default): an optimizer step over 2 ranks or 2
accumulation micro-batches trains exactly like one batch holding all of its sequences.

Sampling is made independent of how the prompts are split (``fixed_sampling``): each prompt's
completion comes from a generator seeded by its text. The tiny random models give log ratios far
below the default ``--threshold``, so every ReNIO weight would be exactly 1; ``VARIED`` selects
every token and sharpens ``e = exp(rbar / T)`` so the weights spread over 1e-4 .. 8.

AdamW's update is nearly ``lr * sign(m)`` at these steps, which turns fp32 noise in a
near-zero gradient component into up to ~1e-5 of a parameter at ``--lr 1e-2``: PARAM_TOL is 1e-4
(1% of lr), while the paper's per-micro-batch scope moves the parameters by ~3e-2 (3 lr). The
step's gradient norm and loss (scale-sensitive, unlike AdamW's update) are compared too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from renio_kernels.train import loop
from renio_kernels.train.metrics import read_metrics
from tests.distributed import run_workers
from tests.train.conftest import base_args, torchrun
from tests.train.fixed_sampling import sample_per_prompt

VARIED = {"threshold": -10, "weight-temperature": 0.02, "eval-problems": 0}
PARAM_TOL = 1e-4
RTOL = 1e-5  # logged loss and gradient norm
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def per_prompt_sampling(monkeypatch):
    monkeypatch.setattr(loop, "sample", sample_per_prompt)


def _run(models, out: Path, **flags) -> tuple[dict, list[dict]]:
    loop.main(base_args(models, out, **VARIED, **flags))
    return _result(out)


def _result(out: Path) -> tuple[dict, list[dict]]:
    params = load_file(out / "final" / "model.safetensors")
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    return params, train


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _assert_same_steps(ra: list[dict], rb: list[dict]) -> None:
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb, strict=True):
        assert x["sgos_trained"] == y["sgos_trained"]
        for key in ("loss", "grad_norm", "weight_mean", "weight_min", "weight_max"):
            assert y[key] == pytest.approx(x[key], rel=RTOL), key


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"reduction": "token_mean"},
        {"reduction": "sum", "weight-norm": "clamp"},
        {"weight-norm": "ema"},
        {"objective": "opd", "reduction": "token_mean"},  # weights 1: the reduction alone
    ],
    ids=lambda o: "-".join(map(str, o.values())) or "default",
)
def test_accumulation_equals_one_batch(tiny_models, tmp_path, per_prompt_sampling, options):
    one, r_one = _run(tiny_models, tmp_path / "one", **{"batch-size": 8}, **options)
    split = {"batch-size": 4, "grad-accum": 2}
    acc, r_acc = _run(tiny_models, tmp_path / "acc", **split, **options)
    diff = _max_diff(one, acc)
    print(f"2 micro-batches vs 1 {options}: max |param diff| {diff:.3g}")
    assert diff < PARAM_TOL
    _assert_same_steps(r_one, r_acc)
    if "objective" not in options:
        assert min(r["weight_min"] for r in r_one) < 0.1 < 2 < max(r["weight_max"] for r in r_one)
    if options.get("weight-norm", "batch_mean") in ("batch_mean", "clamp"):
        # the step's weights, not the first micro-batch's provisional ones, are logged
        assert all(r["weight_mean"] == pytest.approx(1.0, rel=1e-6) for r in r_acc)
    # the paper's scope normalizes each micro-batch on its own: a different step
    flags = {"batch-size": 4, "grad-accum": 2, "weight-scope": "micro_batch"}
    paper, _ = _run(tiny_models, tmp_path / "paper", **flags, **options)
    paper_diff = _max_diff(one, paper)
    print(f"  the paper's scope: {paper_diff:.3g}")
    assert paper_diff > 100 * PARAM_TOL


def test_micro_batch_scope_averages_the_micro_batches(tiny_models, tmp_path, per_prompt_sampling):
    """Without a normalization (``--weight-norm none``) the paper's per-micro-batch sequence
    mean over 2 equal micro-batches is the mean over both: the loss is scaled by 1/grad_accum."""
    flags = {"weight-scope": "micro_batch", "weight-norm": "none"}
    one, r_one = _run(tiny_models, tmp_path / "one", **{"batch-size": 8}, **flags)
    acc, r_acc = _run(tiny_models, tmp_path / "acc", **{"batch-size": 4, "grad-accum": 2}, **flags)
    diff = _max_diff(one, acc)
    print(f"micro_batch scope, 2 micro-batches vs 1: max |param diff| {diff:.3g}")
    assert diff < PARAM_TOL
    _assert_same_steps(r_one, r_acc)


@pytest.mark.parametrize(
    "options",
    [{}, {"reduction": "token_mean", "weight-norm": "ema", "grad-accum": 2}],
    ids=["default", "token_mean-ema-accum"],
)
def test_two_ranks_equal_one_rank(tiny_models, tmp_path, per_prompt_sampling, options):
    """torchrun, 2 ranks x 8 / world / grad_accum prompts == 1 process x 8 prompts."""
    per_rank = 8 // 2 // options.get("grad-accum", 1)
    ddp = tmp_path / "ddp"
    cmd = torchrun(
        "tests.train.fixed_sampling",
        *base_args(tiny_models, ddp, **VARIED, **{**options, "batch-size": per_rank}),
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two, r_two = _result(ddp)
    whole = {**options, "batch-size": 8, "grad-accum": 1}
    one, r_one = _run(tiny_models, tmp_path / "one", **whole)
    diff = _max_diff(one, two)
    print(f"2 ranks vs 1 rank {options}: max |param diff| {diff:.3g}")
    assert diff < PARAM_TOL
    _assert_same_steps(r_one, r_two)
    assert all(r["sgos_trained"] == 8 for r in r_two)


@pytest.mark.parametrize("scope", ["global", "micro_batch"])
def test_resume_is_exact_with_the_ema_mean(tiny_models, tmp_path, scope):
    """The "ema" running mean (the StepNormalizer's in the global scope) is checkpointed and
    restored: resuming from step 2 gives the uninterrupted run's parameters and losses bit for
    bit."""
    flags = {"steps": 4, "save-every": 2, "weight-norm": "ema", "grad-accum": 2}
    flags.update({"weight-scope": scope, "keep-checkpoints": 0})
    full = tmp_path / "full"
    loop.main(base_args(tiny_models, full, **VARIED, **flags))
    state = torch.load(full / "checkpoints" / "step-000002" / "state.pt", weights_only=False)
    dtype = torch.float64 if scope == "global" else torch.float32
    assert state["ema_state"].dtype == dtype
    assert 0 < float(state["ema_state"]) != 1.0
    part = tmp_path / "part"  # a run that stopped after its step-2 checkpoint
    shutil.copytree(full, part)
    for p in ("COMPLETE", "final", "summary.json", "checkpoints/step-000004"):
        shutil.rmtree(part / p, ignore_errors=True) if (part / p).is_dir() else (part / p).unlink()
    loop.main(["--resume", str(part), "--progress", "false"])
    a, ra = _result(full)
    b, rb = _result(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]


def test_nothing_kept_anywhere_is_a_zero_step(tiny_models, tmp_path, per_prompt_sampling):
    """``--sgo-filter correct`` with an untrained student keeps nothing: no loss is called and
    the step leaves the parameters as they were (zero gradients, no weight decay)."""
    out = tmp_path / "run"
    params, records = _run(tiny_models, out, **{"sgo-filter": "correct", "grad-accum": 2})
    assert [r["sgos_trained"] for r in records] == [0, 0]
    assert [r["loss"] for r in records] == [0.0, 0.0]
    start = load_file(Path(tiny_models["student"]) / "model.safetensors")
    assert _max_diff(start, params) == 0.0


# A rank that keeps nothing in a micro-batch while the other does joins the step's normalization
# with zero sequences; a micro-batch empty on both ranks is skipped by both.


def _empty_rank_worker(rank: int, world: int, models: dict, out: str) -> None:
    from renio_kernels.train.dist import DistInfo, allreduce_grads

    cfg, loss_fn, tok, student, teacher = _setup(models)
    info = DistInfo(rank, world)
    prompts = _prompts(6)
    # micro-batch 1: 2 prompts on each rank; 2: 2 on rank 0, none on rank 1; 3: none anywhere
    plan = [[prompts[2 * rank : 2 * rank + 2]], [prompts[4:6] if rank == 0 else []], [[]]]
    for (part,) in plan:
        keep = list(range(len(part)))
        if loop._skip_for_global_scope(loss_fn, keep, cfg, info, torch.device("cpu")):
            continue
        loss, _ = loss_fn(student, teacher, _rollout(tok, student, part), None)
        loss.backward()
    params = [p for p in student.parameters() if p.requires_grad]
    allreduce_grads(params, info)
    step_loss, _ = loss_fn.finish_step(params)
    if rank == 0:
        torch.save({"loss": step_loss, "grads": [p.grad for p in params]}, out)


def _setup(models: dict):
    from renio_kernels.train.config import TrainConfig, loss_options
    from renio_kernels.train.distill import DistillLoss
    from renio_kernels.train.models import load_model, load_tokenizer

    cfg = TrainConfig(
        student=str(models["student"]),
        teacher=str(models["teacher"]),
        sgo_filter="correct",
        threshold=-10.0,
        weight_temperature=0.02,
    )
    tok = load_tokenizer(cfg.student, "student")
    student = load_model(cfg.student, "student", "sdpa")
    teacher = load_model(cfg.teacher, "teacher", "sdpa").requires_grad_(False)
    return cfg, DistillLoss(cfg, loss_options(cfg)), tok, student, teacher


def _prompts(n: int) -> list[str]:
    return [f"Q: {10 + 7 * i}+{31 + 5 * i}\nA: " for i in range(n)]


def _rollout(tok, student, prompts: list[str]):
    return sample_per_prompt(student, tok, prompts, max_new_tokens=10, do_sample=True)


def test_a_rank_without_sequences_joins_the_step(tiny_models, tmp_path):
    out = tmp_path / "two.pt"
    run_workers(_empty_rank_worker, 2, dict(tiny_models), str(out))
    two = torch.load(out, weights_only=False)
    cfg, loss_fn, tok, student, teacher = _setup(tiny_models)
    loss, _ = loss_fn(student, teacher, _rollout(tok, student, _prompts(6)), None)
    loss.backward()
    params = [p for p in student.parameters() if p.requires_grad]
    step_loss, factor = loss_fn.finish_step(params)
    assert factor == 1.0  # one micro-batch: the provisional normalization is the step's
    assert two["loss"] == pytest.approx(step_loss, rel=RTOL)
    for g2, p in zip(two["grads"], params, strict=True):
        torch.testing.assert_close(g2, p.grad, rtol=RTOL, atol=1e-9)
