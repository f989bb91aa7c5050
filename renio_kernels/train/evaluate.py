"""Greedy accuracy on held-out problems."""

from __future__ import annotations

import torch

from .generation import sample
from .tasks import format_prompt, is_correct

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    model, tokenizer, problems, template: str, *, max_new_tokens: int, batch_size: int = 128
) -> dict:
    """Greedy-decode each problem; ``accuracy`` is the share whose final answer is right."""
    correct: list[bool] = []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        rollout = sample(
            model,
            tokenizer,
            [format_prompt(template, p) for p in chunk],
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
        correct += [is_correct(t, p["answer"]) for t, p in zip(rollout.texts, chunk, strict=True)]
    return {"accuracy": sum(correct) / max(1, len(correct)), "correct": correct, "n": len(correct)}
