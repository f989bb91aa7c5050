"""Bad input: a clear message naming the fix, and no run directory left behind."""

import json
import shutil

import pytest

from renio_kernels.train.loop import main
from renio_kernels.train.models import build_char_tokenizer
from tests.train.conftest import base_args, save_tiny


def _fails(models, tmp_path, exc, match, **overrides):
    out = tmp_path / "run"
    with pytest.raises(exc, match=match):
        main(base_args(models, out, **overrides))
    assert not (out / "COMPLETE").exists()
    assert not out.exists()


def test_missing_data_file(tiny_models, tmp_path):
    _fails(
        tiny_models,
        tmp_path,
        FileNotFoundError,
        "does not exist: pass --data",
        data=tmp_path / "missing.jsonl",
    )


def test_malformed_data_file(tiny_models, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"problem": "1+2", "solution": "#### 3", "answer": "3"}\n[1, 2]\n')
    _fails(tiny_models, tmp_path, ValueError, r"d.jsonl:2: expected a JSON object", data=data)


def test_too_little_data_for_the_held_out_split(tiny_models, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"problem": "1+2", "solution": "#### 3", "answer": "3"}) + "\n")
    _fails(tiny_models, tmp_path, ValueError, "pass --eval-data FILE", data=data)


def test_model_dir_without_weights(tiny_models, tmp_path):
    broken = tmp_path / "noweights"
    shutil.copytree(tiny_models["teacher"], broken)
    (broken / "model.safetensors").unlink()
    _fails(tiny_models, tmp_path, FileNotFoundError, "has no weights", teacher=broken)


def test_missing_model_dir(tiny_models, tmp_path):
    _fails(
        tiny_models,
        tmp_path,
        FileNotFoundError,
        "student directory .* does not exist",
        student=tmp_path / "nowhere",
    )


def test_tokenizer_without_pad_token(tiny_models, tmp_path):
    from transformers import PreTrainedTokenizerFast

    nopad = tmp_path / "nopad"
    shutil.copytree(tiny_models["student"], nopad)
    tok = build_char_tokenizer()
    tok = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<eos>")
    tok.save_pretrained(nopad)
    _fails(
        tiny_models, tmp_path, ValueError, "has no pad token.*tokenizer.pad_token =", student=nopad
    )


def test_incompatible_vocabularies(tiny_models, tmp_path):
    # a teacher whose tokenizer numbers the characters differently
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    other = save_tiny(tmp_path / "other", hidden=32, layers=1, seed=3)
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for c in reversed(build_char_tokenizer().convert_ids_to_tokens(list(range(3, 99)))):
        vocab[c] = len(vocab)
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    t.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(
        tokenizer_object=t, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    ).save_pretrained(other)
    _fails(tiny_models, tmp_path, ValueError, "give different ids", teacher=other)


def test_bad_option_values(tiny_models, tmp_path):
    _fails(tiny_models, tmp_path, ValueError, "beta must be in", beta=2.0)
    _fails(tiny_models, tmp_path, ValueError, "--top-p must be in", **{"top-p": 0})
    with pytest.raises(SystemExit):
        main(base_args(tiny_models, tmp_path / "x", objective="nonsense"))


def test_existing_run_dir_is_not_overwritten(tiny_models, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="choose another --out, or continue it"):
        main(base_args(tiny_models, out))
    assert (out / "metrics.jsonl").read_text() == "{}\n"


def test_optional_packages_missing(tiny_models, tmp_path):
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        _fails(tiny_models, tmp_path, ValueError, r"needs the peft package", **{"lora-r": 4})
    if importlib.util.find_spec("flash_attn") is None:
        _fails(
            tiny_models,
            tmp_path,
            ValueError,
            "needs the flash-attn package",
            **{"attn-implementation": "flash_attention_2"},
        )
    if importlib.util.find_spec("peft") and importlib.util.find_spec("flash_attn"):
        pytest.skip("peft and flash-attn are both installed: nothing missing to report")
