"""Tiny randomly initialized causal LMs and prompt + completion batches, built in code."""

from __future__ import annotations

import torch

VOCAB = 64
TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def _small(hidden: int, vocab: int, **extra) -> dict:
    """The config fields every tiny transformer model here shares."""
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                num_attention_heads=4, **TOKENS, **extra)  # fmt: skip


def _build(model_cls, config, seed: int):
    torch.manual_seed(seed)
    model = model_cls(config)
    # Default init gives near-uniform logits; a larger head gives distributions with some shape,
    # so ReNIO's ratio threshold selects some tokens and the weights differ from 1.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model.float()


def tiny_llama(seed: int, hidden: int = 32, vocab: int = VOCAB, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**_small(hidden, vocab), num_hidden_layers=2, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=tie)  # fmt: skip
    return _build(LlamaForCausalLM, config, seed)


def prompt_completion_batch(batch: int, prompt: int, completion: int, seed: int = 0):
    """Left-padded prompts then right-padded completions, as on-policy trainers build them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, prompt + completion), generator=g)
    attn = torch.ones_like(ids)
    comp = torch.zeros_like(ids)
    comp[:, prompt:] = 1
    for b in range(batch):
        pad_left = b % 3
        ids[b, :pad_left] = 0
        attn[b, :pad_left] = 0
        cut = completion - (b % 4)  # completions of different lengths, then padding
        ids[b, prompt + cut :] = 0
        attn[b, prompt + cut :] = 0
        comp[b, prompt + cut :] = 0
    return ids, attn, comp


def tiny_gemma2(seed: int, softcap: float | None = 30.0, hidden: int = 32, vocab: int = VOCAB):
    """A Gemma 2 model, whose forward soft-caps its logits (``30 * tanh(logits / 30)`` as the
    released models): not ``hidden @ lm_head.weight.T``, so the fused-linear path must not be
    used. The head is scaled as in ``tiny_llama`` so the logits reach magnitudes where the cap
    shows (about 8 here: a 2% change)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        **_small(hidden, vocab), num_hidden_layers=2, num_key_value_heads=2,
        head_dim=hidden // 4, max_position_embeddings=64, tie_word_embeddings=False,
        final_logit_softcapping=softcap,
    )  # fmt: skip
    return _build(Gemma2ForCausalLM, config, seed)


def tiny_recurrent_gemma(seed: int, hidden: int = 32, vocab: int = VOCAB):
    """A RecurrentGemma model with the config's default ``logits_soft_cap`` (30, as the released
    models): its forward returns ``30 * tanh(logits / 30)``. Untied and with the head scaled as
    in ``tiny_gemma2``, so the logits reach magnitudes where the cap shows."""
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    config = RecurrentGemmaConfig(
        **_small(hidden, vocab), num_hidden_layers=3,  # recurrent, recurrent, attention
        lru_width=hidden, attention_window_size=16, tie_word_embeddings=False,
    )  # fmt: skip
    return _build(RecurrentGemmaForCausalLM, config, seed)


def tiny_xlstm(seed: int, vocab: int = VOCAB):
    """An xLSTM model with the config's default ``output_logit_soft_cap`` (30). transformers 5.24
    needs ``hidden_size * qk_dim_factor`` (0.5) to be a multiple of 64: hidden 128."""
    from transformers import xLSTMConfig, xLSTMForCausalLM

    config = xLSTMConfig(vocab_size=vocab, hidden_size=128, num_hidden_layers=1, num_heads=2,
                         chunk_size=8, **TOKENS)  # fmt: skip
    return _build(xLSTMForCausalLM, config, seed)
