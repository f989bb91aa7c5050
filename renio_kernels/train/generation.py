"""Sampling completions with ``generate`` and laying them out for the loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Rollout", "encode_prompts", "sample", "sequences_for"]


@dataclass
class Rollout:
    """Prompts (left-padded) and the sampled completions (right-padded after the first eos)."""

    prompt_ids: torch.Tensor  # (B, P)
    prompt_mask: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (B, C)
    completion_mask: torch.Tensor  # (B, C): 1 up to and including the first eos
    texts: list[str]

    def select(self, keep: list[int]) -> Rollout:
        idx = torch.tensor(keep, dtype=torch.long, device=self.prompt_ids.device)
        return Rollout(
            self.prompt_ids[idx],
            self.prompt_mask[idx],
            self.completion_ids[idx],
            self.completion_mask[idx],
            [self.texts[i] for i in keep],
        )


def encode_prompts(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids so every completion starts at the same column."""
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if any(len(r) == 0 for r in rows):
        raise ValueError("a prompt tokenized to nothing; check --prompt-template and the data")
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def completion_mask(completion: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including the first eos, 0 after it (generate pads finished rows)."""
    is_eos = completion == eos_id
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    return (~after_eos).long()


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
) -> Rollout:
    device = next(model.parameters()).device
    ids, mask = encode_prompts(tokenizer, prompts, device)
    kwargs = {"do_sample": do_sample}
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
        **kwargs,
    )
    model.train(was_training)
    completion = out[:, ids.shape[1] :]
    if completion.shape[1] == 0:
        completion = torch.full((ids.shape[0], 1), tokenizer.eos_token_id, device=device)
    cmask = completion_mask(completion, tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(
        completion * cmask + tokenizer.pad_token_id * (1 - cmask), skip_special_tokens=True
    )
    return Rollout(ids, mask, completion, cmask, texts)


def sequences_for(prompt_ids, prompt_mask, rollout: Rollout, ignore_index: int = -100):
    """``prompt + completion`` ids, attention mask, position ids and loss labels.

    Position ``t`` of the returned ``labels`` (B, C) belongs to hidden state ``P - 1 + t`` of the
    sequence: the state that predicts completion token ``t``. Prompt and padding never get a label.
    """
    ids = torch.cat([prompt_ids, rollout.completion_ids], dim=1)
    mask = torch.cat([prompt_mask, rollout.completion_mask], dim=1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    labels = rollout.completion_ids.masked_fill(rollout.completion_mask == 0, ignore_index)
    return ids, mask, position_ids, labels
