"""The SFT subcommand writes a model + tokenizer that load offline; the shipped ones do."""

import json
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from renio_kernels.train.__main__ import main
from renio_kernels.train.models import ASSETS


def test_sft_writes_loadable_checkpoint(tmp_path):
    out = tmp_path / "sft"
    main(
        [
            "sft",
            "--preset",
            "student",
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--eval-problems",
            "4",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok.pad_token == "<pad>" and tok.eos_token == "<eos>"
    assert tok.decode(tok("12+7=19\n#### 19")["input_ids"]) == "12+7=19\n#### 19"
    AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    info = json.loads((out / "sft_info.json").read_text())
    assert info["steps"] == 3 and 0.0 <= info["heldout_accuracy"] <= 1.0


def test_shipped_checkpoints_load_offline_and_are_small():
    total = 0
    for role in ("teacher", "student"):
        d = Path(ASSETS) / role
        tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
        assert tok.pad_token_id is not None
        AutoModelForCausalLM.from_pretrained(d, local_files_only=True)
        total += sum(f.stat().st_size for f in d.iterdir())
    assert total < 8 * 2**20
    teacher = json.loads((Path(ASSETS) / "teacher" / "sft_info.json").read_text())
    student = json.loads((Path(ASSETS) / "student" / "sft_info.json").read_text())
    assert teacher["heldout_accuracy"] > student["heldout_accuracy"]
