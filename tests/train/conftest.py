"""Tiny models (built in code, a few KB) and a helper that runs ``renio-train`` in process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from renio_kernels.train.models import build_char_tokenizer, tiny_llama


def save_tiny(path: Path, hidden: int, layers: int, seed: int) -> Path:
    torch.manual_seed(seed)
    tok = build_char_tokenizer()
    model = tiny_llama(len(tok), hidden, layers, heads=2, max_len=96)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "student": save_tiny(root / "student", hidden=32, layers=1, seed=1),
        "teacher": save_tiny(root / "teacher", hidden=48, layers=1, seed=2),
    }


def torchrun(module: str, *args: str, nproc: int = 2) -> list[str]:
    """The command running ``python -m module args`` under ``torchrun --standalone``."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
        str(nproc), "-m", module, *args,
    ]  # fmt: skip


def base_args(models: dict[str, Path], out: Path, **overrides) -> list[str]:
    """Flags of a run small enough for a test: 4 prompts, 12 new tokens, 2 steps."""
    opts = {
        "student": models["student"],
        "teacher": models["teacher"],
        "out": out,
        "steps": 2,
        "batch-size": 4,
        "max-new-tokens": 12,
        "eval-problems": 4,
        "eval-batch-size": 4,
        "warmup-steps": 1,
        "save-every": 0,
        "progress": "false",
        "plots": "false",
        "threads": 1,
        "lr": 1e-2,
    }
    opts.update(overrides)
    args = []
    for key, value in opts.items():
        args += [f"--{key}", str(value)]
    return args
