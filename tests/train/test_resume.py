"""--resume continues bit-for-bit: the parameters equal those of an uninterrupted run."""

import shutil

import torch
from safetensors.torch import load_file

from renio_kernels.train.loop import main
from renio_kernels.train.metrics import read_metrics
from tests.train.conftest import base_args


def test_resume_equals_uninterrupted(tiny_models, tmp_path):
    # ema normalization and grad accumulation: state beyond the weights must survive too
    extra = {
        "steps": 4,
        "save-every": 2,
        "weight-norm": "ema",
        "grad-accum": 2,
        "keep-checkpoints": 0,
    }
    full = tmp_path / "full"
    main(base_args(tiny_models, full, **extra))
    # a run that stopped after its step-2 checkpoint: drop everything written later
    part = tmp_path / "part"
    shutil.copytree(full, part)
    for p in ("COMPLETE", "final", "summary.json", "checkpoints/step-000004"):
        shutil.rmtree(part / p, ignore_errors=True) if (part / p).is_dir() else (part / p).unlink()
    main(["--resume", str(part), "--progress", "false"])
    assert (part / "COMPLETE").is_file()
    a = load_file(full / "final" / "model.safetensors")
    b = load_file(part / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra = [r for r in read_metrics(full / "metrics.jsonl") if r["kind"] == "train"]
    rb = [r for r in read_metrics(part / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]


def test_resume_without_checkpoint_is_an_error(tiny_models, tmp_path):
    import pytest

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint there"):
        main(["--resume", str(tmp_path / "empty")])
