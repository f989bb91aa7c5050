"""TRL integration: a few on-policy training steps of tiny models on CPU, each step's loss equal
to ``renio_loss`` on the same batch; and the ImportError without TRL."""

from __future__ import annotations

import builtins
import importlib
import math
import sys

import pytest
import torch

import renio_kernels as rk
from tests.helpers import rel_err

pytestmark = pytest.mark.filterwarnings("ignore")


def test_import_without_trl_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_trl(name, *args, **kwargs):
        if name == "trl" or name.startswith("trl."):
            raise ImportError("No module named 'trl'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "renio_kernels.integrations.trl", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_trl)
    with pytest.raises(ImportError, match=r"pip install renio-kernels\[trl\]"):
        importlib.import_module("renio_kernels.integrations.trl")


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.integrations.tiny_models import VOCAB

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        padding_side="left",
    )


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("WANDB_DISABLED", "true")


def make_trainer(tmp_path, fused: bool | None, teacher=None, **options):
    trl_mod = pytest.importorskip("renio_kernels.integrations.trl", reason="needs trl")
    from datasets import Dataset

    from tests.integrations.tiny_models import tiny_llama

    teacher = tiny_llama(1, hidden=48) if teacher is None else teacher
    g = torch.Generator().manual_seed(0)
    prompts = [
        " ".join(f"w{int(i)}" for i in torch.randint(3, 64, (int(n),), generator=g))
        for n in torch.randint(2, 6, (8,), generator=g)
    ]
    args = trl_mod.ReNIODistillationConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=1e-3,
        max_completion_length=6,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        renio_backend="torch",
        renio_fused_linear=fused,
        **options,
    )
    recorded = []

    class Recording(trl_mod.ReNIODistillationTrainer):
        def _renio_loss(self, student, inputs):
            out = super()._renio_loss(student, inputs)
            recorded.append((out[0].detach(), self._functional(student, inputs)))
            return out

        def _functional(self, student, inputs):
            """The same batch through renio_kernels.renio_loss on full-sequence logits."""
            input_ids, attention_mask, labels, _ = self.renio_batch(inputs)
            keep = labels.shape[1]
            with torch.no_grad():
                s = student(input_ids=input_ids, attention_mask=attention_mask).logits
                t = self.teacher_model(input_ids=input_ids, attention_mask=attention_mask).logits
            return rk.renio_loss(
                s[:, -keep - 1 : -1],
                t[:, -keep - 1 : -1],
                labels,
                backend="torch",
                **vars(self.renio_options),
            )

    student = tiny_llama(0)
    before = [p.detach().clone() for p in student.parameters()]
    trainer = Recording(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tiny_tokenizer(),
    )
    return trainer, recorded, before


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused-linear"])
def test_trainer_steps_match_functional_loss(tmp_path, offline, fused):
    trainer, recorded, before = make_trainer(
        tmp_path, fused, beta=0.5, token_clip=0.3, threshold=0.1
    )
    assert trainer.renio_fused is fused
    trainer.train()
    # 2 optimizer steps x 2 accumulated micro-batches, each checked against renio_loss.
    assert len(recorded) == 4
    for loss, functional in recorded:
        assert math.isfinite(loss.item()) and loss.item() > 0
        assert rel_err(loss, functional) < 1e-5
    moved = [rel_err(p, b) for p, b in zip(trainer.model.parameters(), before, strict=True)]
    assert max(moved) > 0
    logged = [h for h in trainer.state.log_history if "renio/weight_max" in h]
    assert logged and logged[0]["renio/weight_max"] >= 1.0 >= logged[0]["renio/weight_min"]


def test_config_validates_options(tmp_path):
    trl_mod = pytest.importorskip("renio_kernels.integrations.trl", reason="needs trl")
    config = trl_mod.ReNIODistillationConfig
    with pytest.raises(ValueError, match="weight_norm"):
        config(output_dir=str(tmp_path), weight_norm="mean", use_cpu=True)
    with pytest.raises(ValueError, match="renio_backend"):
        config(output_dir=str(tmp_path), renio_backend="cuda", use_cpu=True)
    args = config(output_dir=str(tmp_path), use_cpu=True)
    assert args.renio_options() == rk.ReNIOOptions()


def completion_batch(seed: int = 0):
    """One micro-batch as TRL hands it to ``compute_loss``: left-padded prompts, right-padded
    completions."""
    from tests.integrations.tiny_models import prompt_completion_batch

    ids, attn, comp = prompt_completion_batch(3, 4, 6, seed=seed)
    return {
        "prompt_ids": ids[:, :4],
        "prompt_mask": attn[:, :4],
        "completion_ids": ids[:, 4:],
        "completion_mask": comp[:, 4:],
    }


def test_fused_and_logits_paths_give_the_same_loss_and_grads(tmp_path, offline):
    trainer, _, _ = make_trainer(tmp_path, None, beta=0.5, token_clip=0.3, threshold=0.1)
    assert trainer.renio_fused is True  # both tiny Llamas pass the exactness check
    inputs = completion_batch()
    runs = []
    for fused in (True, False):
        trainer.renio_fused = fused
        trainer.model.zero_grad()
        loss, _ = trainer._renio_loss(trainer.model, inputs)
        loss.backward()
        runs.append((loss.detach(), [p.grad.clone() for p in trainer.model.parameters()]))
    (fused_loss, fused_grads), (logits_loss, logits_grads) = runs
    assert rel_err(fused_loss, logits_loss) < 1e-5
    assert max(rel_err(a, b) for a, b in zip(fused_grads, logits_grads, strict=True)) < 1e-4


def test_softcapped_teacher(tmp_path, offline):
    """A Gemma 2 teacher soft-caps its logits: the automatic choice is the logits path, whose
    loss is renio_loss on the models' own logits; forcing fused-linear fails at construction."""
    from tests.integrations.tiny_models import tiny_gemma2

    trainer, _, _ = make_trainer(tmp_path, None, teacher=tiny_gemma2(1, hidden=48), threshold=0.1)
    assert trainer.renio_fused is False
    inputs = completion_batch()
    loss, _ = trainer._renio_loss(trainer.model, inputs)
    assert rel_err(loss, trainer._functional(trainer.model, inputs)) < 1e-5
    with pytest.raises(ValueError, match=r"renio_fused_linear=True needs the teacher's logits"):
        make_trainer(tmp_path, True, teacher=tiny_gemma2(1, hidden=48))


def test_config_fields_come_from_the_options_record():
    """Every ReNIO option is a config field with the record's default; ``beta`` and
    ``temperature`` are TRL's own fields, kept with SPEC's defaults (beta 0.0, not TRL's 1.0)."""
    import dataclasses

    trl_mod = pytest.importorskip("renio_kernels.integrations.trl", reason="needs trl")
    from renio_kernels.core.options import option_fields

    fields = {f.name: f for f in dataclasses.fields(trl_mod.ReNIODistillationConfig)}
    for f in option_fields():
        name = trl_mod.config_name(f.name)
        assert fields[name].default == f.default, f.name
        assert fields[name].metadata["help"].startswith(f.metadata["doc"]), f.name
    assert fields["beta"].default == 0.0
    # TRL's sampling top_k keeps its meaning; the loss's is renio_top_k.
    assert fields["top_k"].default == 0 and fields["renio_top_k"].default is None


def test_a_new_option_needs_no_other_edit(monkeypatch, tmp_path):
    """A field added to ReNIOOptions is a config field (and so a CLI flag) and reaches
    ``renio_options()``."""
    import dataclasses
    import importlib.util

    trl_mod = pytest.importorskip("renio_kernels.integrations.trl", reason="needs trl")
    import renio_kernels.core.options as options_module

    knob = dataclasses.field(
        default=0.25, metadata={"kind": "real", "doc": "a new knob", "paper_flag": None,
                                "choices": None},
    )  # fmt: skip
    extended = dataclasses.make_dataclass(
        "Extended", [("new_knob", "float", knob)], bases=(rk.ReNIOOptions,), frozen=True
    )
    monkeypatch.setattr(options_module, "ReNIOOptions", extended)
    monkeypatch.setattr(options_module, "option_fields", lambda: dataclasses.fields(extended))
    name = "renio_kernels.integrations._trl"
    spec = importlib.util.spec_from_file_location(name, trl_mod.__file__)
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, fresh)
    spec.loader.exec_module(fresh)
    args = fresh.ReNIODistillationConfig(output_dir=str(tmp_path), use_cpu=True, new_knob=0.5)
    assert args.renio_options().new_knob == 0.5


def test_docs_config_snippet_builds_on_cpu(tmp_path, monkeypatch):
    """docs/integrations.md's TRL snippet, up to the config, runs as written on a CPU-only
    machine (TRL's default bf16=True raises there unless bf16 is off or use_cpu=True)."""
    import re
    from pathlib import Path

    pytest.importorskip("renio_kernels.integrations.trl", reason="needs trl")
    doc = (Path(__file__).parents[2] / "docs" / "integrations.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    (snippet,) = [b for b in blocks if "ReNIODistillationConfig(" in b]
    config_part = snippet.split("trainer = ")[0]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(config_part, "docs/integrations.md", "exec"), scope)
    args = scope["args"]
    assert args.renio_options().token_clip == 0.05
    assert args.bf16 == torch.cuda.is_available()
