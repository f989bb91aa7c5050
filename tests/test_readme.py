"""The README's usage snippets run as written, with integer completion masks (as TRL and most
collators build them) and tiny Hugging Face models."""

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from tests.integrations.tiny_models import prompt_completion_batch, tiny_llama

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippets() -> list[str]:
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3, "the README's usage snippets"
    return blocks


def _namespace():
    student, teacher = tiny_llama(0), tiny_llama(1)
    input_ids, attention_mask, completion_mask = prompt_completion_batch(3, 4, 6)
    assert completion_mask.dtype == torch.int64  # not a bool mask
    out = student(input_ids, attention_mask=attention_mask)
    with torch.no_grad():
        t_out = teacher(input_ids, attention_mask=attention_mask)
    labels = input_ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, -100)
    import renio_kernels as rk

    return {  # the first snippet's imports, which the later ones use
        "torch": torch,
        "rk": rk,
        "student": student,
        "teacher": teacher,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "student_logits": out.logits[:, :-1],
        "teacher_logits": t_out.logits[:, :-1],
        "labels": labels,
        "optimizer": torch.optim.SGD(student.parameters(), lr=1e-3),
    }


@pytest.mark.parametrize("index", range(3))
def test_readme_snippet_runs(index):
    code = _snippets()[index]
    namespace = _namespace()
    exec(compile(code, f"README.md snippet {index}", "exec"), namespace)
    loss = namespace["loss"]
    assert loss.dim() == 0 and torch.isfinite(loss)
    grads = [p.grad for p in namespace["student"].parameters() if p.grad is not None]
    if index > 0:  # the logits snippet backprops into the logits, not the model
        assert grads and all(torch.isfinite(g).all() for g in grads)
