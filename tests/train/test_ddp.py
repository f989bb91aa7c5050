"""Two processes under torchrun on CPU (gloo): each samples its own batch, gradients averaged
(also with the --teacher-ema teacher of self-distillation)."""

import os
import subprocess

import pytest
import torch

from renio_kernels.train.metrics import read_metrics
from tests.train.conftest import base_args, torchrun


@pytest.mark.parametrize(
    "extra", [{}, {"mode": "opsd", "teacher-ema": 0.9}], ids=["opd", "opsd-teacher-ema"]
)
def test_two_process_ddp(tiny_models, tmp_path, extra):
    out = tmp_path / "ddp"
    cmd = torchrun(
        "renio_kernels.train",
        *base_args(tiny_models, out, **{"save-every": 2, **extra}),
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "COMPLETE").is_file()
    assert sorted(p.name for p in (out / "checkpoints" / "step-000002").iterdir()) == [
        "rng-rank0.pt",
        "rng-rank1.pt",
        "state.pt",
    ]
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert len(train) == 2
    assert all(r["sgos_trained"] == 8 for r in train)  # 4 prompts on each of 2 ranks
    assert "run directory:" in proc.stdout
    state = torch.load(out / "checkpoints" / "step-000002" / "state.pt", weights_only=False)
    assert (state["teacher_ema"] is None) == (not extra)
