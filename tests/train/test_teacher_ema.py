"""``--mode opsd --teacher-ema DECAY``: the teacher is the EMA of the student's weights, updated
after each optimizer step in fp32, used by the loss, saved in checkpoints, exact on ``--resume``,
identical on every rank, and refused with a reason outside self-distillation or out of (0, 1)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from renio_kernels.train import distill
from renio_kernels.train.config import parse_config
from renio_kernels.train.dist import DistInfo, allreduce_grads
from renio_kernels.train.ema import TeacherEMA
from renio_kernels.train.loop import main
from renio_kernels.train.metrics import read_metrics
from tests.distributed import run_workers
from tests.train.conftest import base_args


def _ema64(prev: dict, student: dict, decay: float) -> dict:
    """The update by hand, in float64."""
    return {k: decay * prev[k].double() + (1 - decay) * student[k].double() for k in prev}


def _params(model: nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _pair(dtype=torch.float32, frozen: str | None = None):
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
    if frozen:  # what LoRA does to the base weights
        student.get_parameter(frozen).requires_grad_(False)
    teacher = copy.deepcopy(student).requires_grad_(False)
    return student, teacher


def _sgd_step(student: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 7, generator=g).to(next(student.parameters()).dtype)
    student.zero_grad()
    student(x).pow(2).sum().backward()
    with torch.no_grad():
        for p in student.parameters():
            if p.grad is not None:
                p -= 0.3 * p.grad


def test_update_matches_a_hand_computation():
    decay = 0.75
    student, teacher = _pair(frozen="0.bias")
    ema = TeacherEMA(student, teacher, decay)
    expected = {k: v.double() for k, v in _params(student).items()}
    for step in range(3):
        _sgd_step(student, step)
        ema.update()
        expected = _ema64(expected, _params(student), decay)
        got = _params(teacher)
        for k, v in expected.items():
            torch.testing.assert_close(got[k].double(), v, rtol=1e-6, atol=1e-7, msg=k)
    # the student moved on; the average lags behind it
    assert not torch.equal(teacher.get_parameter("2.weight"), student.get_parameter("2.weight"))
    # a frozen weight is not averaged (it never changes) and not saved
    assert torch.equal(teacher.get_parameter("0.bias"), student.get_parameter("0.bias"))
    assert set(ema.state_dict()) == {"0.weight", "2.weight", "2.bias"}
    assert all(not p.requires_grad for p in teacher.parameters())


def test_bf16_weights_average_in_an_fp32_shadow():
    """bf16 weights: the average accumulates in an fp32 shadow (a bf16 accumulator rounds away
    most of each update of size (1 - decay) * (student - teacher)); the teacher is its rounding."""
    decay = 0.999
    student, teacher = _pair(torch.bfloat16)
    ema = TeacherEMA(student, teacher, decay)
    expected = {k: v.double() for k, v in _params(student).items()}
    naive = _params(student)  # the same update in bf16 arithmetic, for comparison
    for step in range(4):
        _sgd_step(student, step)
        ema.update()
        expected = _ema64(expected, _params(student), decay)
        for k, v in naive.items():
            v.mul_(decay).add_(student.get_parameter(k).detach(), alpha=1 - decay)
    state = ema.state_dict()
    for k, v in expected.items():
        assert state[k].dtype == torch.float32
        torch.testing.assert_close(state[k].double(), v, rtol=1e-6, atol=1e-7, msg=k)
        assert torch.equal(teacher.get_parameter(k), state[k].to(torch.bfloat16)), k
    shadow_err = max((state[k].double() - v).abs().max() for k, v in expected.items())
    naive_err = max((naive[k].double() - v).abs().max() for k, v in expected.items())
    assert naive_err > 100 * shadow_err


def test_load_state_dict_is_exact_and_checked():
    student, teacher = _pair()
    ema = TeacherEMA(student, teacher, 0.5)
    _sgd_step(student, 0)
    ema.update()
    saved = ema.state_dict()
    other_student, other_teacher = _pair()
    restored = TeacherEMA(other_student, other_teacher, 0.5)
    restored.load_state_dict(saved, "ckpt")
    for k, v in _params(teacher).items():
        assert torch.equal(other_teacher.get_parameter(k), v), k
    with pytest.raises(ValueError, match="ckpt: the EMA teacher there does not match"):
        restored.load_state_dict({"0.weight": saved["0.weight"]}, "ckpt")
    with pytest.raises(ValueError, match="decay must be in"):
        TeacherEMA(student, teacher, 1.0)


# --- the training script -----------------------------------------------------------------------


def _ema_args(models, out: Path, **extra) -> list[str]:
    return base_args(models, out, mode="opsd", **{"teacher-ema": 0.5, **extra})


def _state(run: Path, step: int) -> dict:
    path = run / "checkpoints" / f"step-{step:06d}" / "state.pt"
    return torch.load(path, map_location="cpu", weights_only=False)


def test_the_loss_sees_the_ema_teacher(tiny_models, tmp_path, monkeypatch):
    decay = 0.5
    seen = []
    real_call = distill.DistillLoss.__call__

    def spy(self, student, teacher, rollout, teacher_prompt):
        assert teacher is not student and teacher_prompt is not None
        seen.append((_params(student), _params(teacher)))
        return real_call(self, student, teacher, rollout, teacher_prompt)

    monkeypatch.setattr(distill.DistillLoss, "__call__", spy)
    out = tmp_path / "run"
    summary = main(_ema_args(tiny_models, out, **{"save-every": 1, "keep-checkpoints": 0}))
    assert len(seen) == 2  # one micro-batch per step
    s1, s2 = _state(out, 1), _state(out, 2)
    assert s1["teacher_ema"].keys() == s1["model"].keys()
    initial = load_file(tiny_models["student"] / "model.safetensors")
    # step 1: the teacher is the initial student
    for k in s1["teacher_ema"]:
        assert torch.equal(seen[0][1][k], initial[k]), k
    # step 2: the average after step 1, by hand, which the checkpoint holds exactly
    by_hand = _ema64(initial, s1["model"], decay)
    for k, v in s1["teacher_ema"].items():
        torch.testing.assert_close(v.double(), by_hand[k], rtol=1e-6, atol=1e-7, msg=k)
        assert torch.equal(seen[1][1][k], v), k
        assert torch.equal(seen[1][0][k], s1["model"][k]), k
    assert any(not torch.equal(seen[1][1][k], seen[1][0][k]) for k in s1["teacher_ema"])
    by_hand = _ema64(s1["teacher_ema"], s2["model"], decay)
    for k, v in s2["teacher_ema"].items():
        torch.testing.assert_close(v.double(), by_hand[k], rtol=1e-6, atol=1e-7, msg=k)
    assert summary["teacher_ema"] == decay
    assert "teacher_ema: 0.5" in (out / "config.yaml").read_text()


def test_resume_is_exact_with_the_ema_teacher(tiny_models, tmp_path):
    extra = {"steps": 4, "save-every": 2, "keep-checkpoints": 0, "teacher-ema": 0.7}
    full = tmp_path / "full"
    main(_ema_args(tiny_models, full, **extra))
    part = tmp_path / "part"
    shutil.copytree(full, part)
    for p in ("COMPLETE", "final", "summary.json", "checkpoints/step-000004"):
        shutil.rmtree(part / p, ignore_errors=True) if (part / p).is_dir() else (part / p).unlink()
    main(["--resume", str(part), "--progress", "false"])
    a, b = _state(full, 4), _state(part, 4)
    for key in ("model", "teacher_ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert not all(torch.equal(a["model"][k], a["teacher_ema"][k]) for k in a["model"])
    ra = [r["loss"] for r in read_metrics(full / "metrics.jsonl") if r["kind"] == "train"]
    rb = [r["loss"] for r in read_metrics(part / "metrics.jsonl") if r["kind"] == "train"]
    assert ra == rb and len(ra) == 4


def test_resume_with_an_ema_teacher_the_run_never_had(tiny_models, tmp_path):
    out = tmp_path / "run"
    main(base_args(tiny_models, out, mode="opsd", steps=1))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="has no EMA teacher: its run had no --teacher-ema"):
        main(["--resume", str(out), "--teacher-ema", "0.9", "--progress", "false"])
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--mode", "opsd", "--teacher-ema", "1.0"], r"--teacher-ema must be in \(0, 1\), got 1"),
        (["--mode", "opsd", "--teacher-ema", "0"], r"must be in \(0, 1\), got 0"),
        (["--mode", "opsd", "--teacher-ema", "-0.5"], r"must be in \(0, 1\)"),
        (["--mode", "opsd", "--teacher-ema", "nan"], r"must be in \(0, 1\), got nan"),
        (["--teacher-ema", "0.99"], "only self-distillation has: pass --mode opsd"),
        (["--mode", "opd", "--teacher-ema", "0.99"], "separate --teacher model"),
    ],
)
def test_bad_teacher_ema_flags(flags, match):
    with pytest.raises(ValueError, match=match):
        parse_config(flags)


def test_teacher_ema_from_a_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("mode: opsd\nteacher_ema: 0.99\n")
    assert parse_config(["--config", str(path)]).teacher_ema == 0.99
    assert parse_config(["--mode", "opsd", "--teacher-ema", "none"]).teacher_ema is None
    path.write_text("teacher_ema: 0.99\n")
    with pytest.raises(ValueError, match="pass --mode opsd"):
        parse_config(["--config", str(path)])


# --- two ranks ---------------------------------------------------------------------------------


def _ranks_agree(rank: int, world: int) -> None:
    """Each rank trains on its own data; the all-reduced step keeps the averages identical."""
    student, teacher = _pair()
    ema = TeacherEMA(student, teacher, 0.9)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05)
    info = DistInfo(rank, world)
    for step in range(3):
        g = torch.Generator().manual_seed(100 * step + rank)
        student(torch.randn(4, 7, generator=g)).pow(2).sum().backward()
        local = [p.grad.clone() for p in params]
        allreduce_grads(params, info)
        opt.step()
        ema.update()
        opt.zero_grad()
        grads = [None] * world
        dist.all_gather_object(grads, local)
        assert not torch.equal(grads[0][0], grads[1][0])  # the ranks' data differed
    states = [None] * world
    dist.all_gather_object(states, (_params(student), ema.state_dict()))
    for k in states[0][1]:
        assert torch.equal(states[0][1][k], states[1][1][k]), k
        assert torch.equal(states[0][0][k], states[1][0][k]), k


def test_the_average_is_identical_on_every_rank():
    run_workers(_ranks_agree, 2)
