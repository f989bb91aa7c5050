"""Sampling that does not depend on how the prompts are split, for the parity tests.

The script samples each micro-batch with one ``generate`` call from its rank's random stream
(seeded ``--seed + 1000 * rank``), so a 2-rank run and a 1-rank run over the same prompts sample
different completions. ``sample_per_prompt`` samples each prompt alone under a generator seeded
by the prompt's text (the global random stream is left as it was): a prompt gets the same
completion whatever batch, micro-batch or rank it lands in. Tests patch it over
``renio_kernels.train.loop.sample``; ``python -m tests.train.fixed_sampling ARGS`` runs
``renio-train ARGS`` with it (for torchrun).
"""

from __future__ import annotations

import sys
import zlib

import torch

from renio_kernels.train import loop
from renio_kernels.train.generation import Rollout, completion_mask, encode_prompts, sample


def sample_per_prompt(model, tokenizer, prompts: list[str], **kwargs) -> Rollout:
    rows = []
    with torch.random.fork_rng(devices=[]):
        for prompt in prompts:
            torch.manual_seed(zlib.crc32(prompt.encode()))
            rows.append(sample(model, tokenizer, [prompt], **kwargs))
    device = rows[0].completion_ids.device
    ids, mask = encode_prompts(tokenizer, prompts, device)
    width = max(r.completion_ids.shape[1] for r in rows)
    # A row that stopped early ended with eos; the pad after it is outside its mask, as generate
    # pads the finished rows of a batch.
    completion = torch.full((len(rows), width), tokenizer.pad_token_id, device=device)
    for i, r in enumerate(rows):
        completion[i, : r.completion_ids.shape[1]] = r.completion_ids[0]
    cmask = completion_mask(completion, tokenizer.eos_token_id)
    return Rollout(ids, mask, completion, cmask, [r.texts[0] for r in rows])


if __name__ == "__main__":
    loop.sample = sample_per_prompt
    loop.main(sys.argv[1:])
