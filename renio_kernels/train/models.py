"""Loading models and tokenizers from local directories, and the tiny built-in ones.

Everything loads offline (``local_files_only``). The checks here turn the usual failure modes of
a distillation run (no weights in the directory, no pad token, teacher and student that do not
share token ids) into messages that say what to change.
"""

from __future__ import annotations

import importlib.util
import string
from pathlib import Path

import torch

__all__ = [
    "ASSETS",
    "build_char_tokenizer",
    "check_vocab_compatible",
    "load_model",
    "load_tokenizer",
    "resolve_attn_implementation",
    "tiny_llama",
]

ASSETS = Path(__file__).resolve().parent / "assets"
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
)


def build_char_tokenizer():
    """A character-level tokenizer over printable ASCII with ``<pad>``, ``<eos>``, ``<unk>``.

    Built in code so the shipped checkpoints can be remade anywhere; ``save_pretrained`` writes a
    ``tokenizer.json`` that ``AutoTokenizer.from_pretrained`` loads offline.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for c in string.printable:
        if c not in "\t\r\x0b\x0c":
            vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_llama(vocab_size: int, hidden: int, layers: int, heads: int, max_len: int = 160):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_len,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def resolve_attn_implementation(name: str, device: torch.device) -> str:
    """``auto``: flash_attention_2 on a GPU with flash-attn installed, else sdpa."""
    if name != "auto":
        if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ValueError(
                "--attn-implementation flash_attention_2 needs the flash-attn package "
                "(pip install flash-attn) and a CUDA GPU; use sdpa or eager instead"
            )
        return name
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(path: str | Path, role: str):
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{role} directory {str(path)!r} does not exist: pass --{role} DIR with a Hugging "
            "Face checkpoint saved by save_pretrained (config.json, weights, tokenizer)"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"could not load the {role} tokenizer from {str(path)!r} ({e}); save it with "
            "tokenizer.save_pretrained(DIR) next to the model"
        ) from None
    if tok.pad_token_id is None:
        raise ValueError(
            f"the {role} tokenizer in {str(path)!r} has no pad token, which batched sampling "
            "needs: set one, e.g. tokenizer.pad_token = tokenizer.eos_token; "
            "tokenizer.save_pretrained(DIR)"
        )
    if tok.eos_token_id is None:
        raise ValueError(
            f"the {role} tokenizer in {str(path)!r} has no eos token, so completions cannot end: "
            "set tokenizer.eos_token and save it again"
        )
    tok.padding_side = "left"
    return tok


def load_model(path: str | Path, role: str, attn_implementation: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{role} directory {str(path)!r} has no config.json: pass a directory written by "
            "model.save_pretrained(DIR)"
        )
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        raise FileNotFoundError(
            f"{role} directory {str(path)!r} has no weights (expected model.safetensors or "
            "pytorch_model.bin): save them with model.save_pretrained(DIR), or point --"
            f"{role} at the directory that holds them"
        )
    return AutoModelForCausalLM.from_pretrained(
        str(path), local_files_only=True, dtype=dtype, attn_implementation=attn_implementation
    )


def check_vocab_compatible(student_tok, teacher_tok, student_vocab: int, teacher_vocab: int):
    """The teacher scores the student's token ids, so both must mean the same tokens."""
    if teacher_vocab < student_vocab:
        raise ValueError(
            f"the teacher's output vocabulary ({teacher_vocab}) is smaller than the student's "
            f"({student_vocab}); distillation needs a teacher whose vocabulary contains the "
            "student's (same tokenizer family), e.g. pick a teacher from the student's model family"
        )
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    differ = [tok for tok, i in s_vocab.items() if t_vocab.get(tok) != i]
    if differ:
        raise ValueError(
            f"teacher and student tokenizers give different ids to {len(differ)} token(s) "
            f"(e.g. {differ[:3]}); the teacher must use the student's tokenizer (same ids), e.g. "
            "models of one family"
        )
