"""A few steps of every mode x objective on tiny random models, read back from the run dir."""

import json
from types import SimpleNamespace

import pytest
import torch

from renio_kernels import ReNIOOptions
from renio_kernels.train.distill import DistillLoss
from renio_kernels.train.loop import main
from renio_kernels.train.metrics import read_metrics
from tests.train.conftest import base_args

TRAIN_KEYS = {
    "loss",
    "divergence_mean",
    "weight_mean",
    "weight_min",
    "weight_max",
    "selected_fraction",
    "log_ratio_mean",
    "correct_share",
    "weight_auroc",
    "gen_tokens_per_s",
    "train_tokens_per_s",
    "peak_memory_mb",
    "lr",
    "grad_norm",
}


@pytest.mark.parametrize("mode", ["opd", "opsd"])
@pytest.mark.parametrize("objective", ["renio", "opd", "sampled-reverse-kl"])
def test_modes_and_objectives(tiny_models, tmp_path, mode, objective):
    out = tmp_path / "run"
    summary = main(base_args(tiny_models, out, mode=mode, objective=objective))
    assert (out / "COMPLETE").is_file()
    assert (out / "final" / "model.safetensors").is_file()
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert TRAIN_KEYS <= set(r)
        assert r["loss"] is not None and r["loss"] == r["loss"]
        if objective != "sampled-reverse-kl":
            assert r["weight_min"] <= r["weight_mean"] <= r["weight_max"]
            assert 0.0 <= r["selected_fraction"] <= 1.0
        if objective == "opd":
            assert r["weight_min"] == r["weight_max"] == 1.0
    assert summary["accuracy_before"] is not None and summary["accuracy_after"] is not None
    saved = json.loads((out / "summary.json").read_text())
    assert saved["objective"] == objective and saved["mode"] == mode


def test_loss_impls_give_the_same_first_loss(tiny_models, tmp_path):
    losses = {}
    for impl in ("logits", "fused-linear"):
        main(base_args(tiny_models, tmp_path / impl, **{"loss-impl": impl, "steps": 1}))
        rec = [r for r in read_metrics(tmp_path / impl / "metrics.jsonl") if r["kind"] == "train"]
        losses[impl] = rec[0]["loss"]
    assert losses["logits"] == pytest.approx(losses["fused-linear"], rel=1e-4, abs=1e-6)


def test_hidden_times_head_is_the_logits(tiny_models):
    from transformers import AutoModelForCausalLM

    def load():  # a fresh model each time: the check's answer is cached per model
        return AutoModelForCausalLM.from_pretrained(tiny_models["student"])

    loss_fn = DistillLoss(SimpleNamespace(loss_impl="fused-linear"), ReNIOOptions())

    def check(model):  # the check renio-train runs before a --loss-impl fused-linear run
        loss_fn.check_models(model, model)

    model = load()
    check(model)  # raises when the identity does not hold
    model = load()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * 1.0)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)  # still an identity: the norm is inside the trunk
    check(model)
    model = load()

    class Scaled(torch.nn.Module):  # a logit-scaling head (as some model families have)
        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, x):
            return 2.0 * self.head(x)

    model.lm_head = Scaled(model.lm_head)
    model.get_output_embeddings = lambda: model.lm_head.head
    with pytest.raises(ValueError, match="use --loss-impl logits"):
        check(model)


def test_config_file_and_saved_config(tiny_models, tmp_path):
    import yaml

    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump({"objective": "opd", "beta": 0.5, "token-clip": 0.05, "steps": 1})
    )
    out = tmp_path / "run"
    main(["--config", str(cfg), *base_args(tiny_models, out, steps=1)])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["objective"] == "opd" and saved["beta"] == 0.5 and saved["token_clip"] == 0.05
    assert saved["threshold"] == 0.8 and saved["ratio_clip"] == 2.5  # SPEC defaults
    bad = tmp_path / "bad.yaml"
    bad.write_text("objectiv: renio\n")
    with pytest.raises(ValueError, match="unknown key 'objectiv'"):
        main(["--config", str(bad), *base_args(tiny_models, tmp_path / "x")])
    assert not (tmp_path / "x").exists()
