"""--sgo-filter: only the completions whose answer is right (or wrong) reach the loss."""

import pytest

from renio_kernels.train import loop
from renio_kernels.train.loop import _keep_index, main
from renio_kernels.train.metrics import read_metrics
from tests.train.conftest import base_args


def test_keep_index():
    correct = [True, False, False, True]
    assert _keep_index(correct, "all") == [0, 1, 2, 3]
    assert _keep_index(correct, "correct") == [0, 3]
    assert _keep_index(correct, "incorrect") == [1, 2]


@pytest.mark.parametrize("sgo_filter", ["correct", "incorrect"])
def test_filter_trains_on_the_chosen_sgos(tiny_models, tmp_path, monkeypatch, sgo_filter):
    # A random model never solves a problem, so the checker is swapped for one that calls
    # every completion of even length correct: both outcomes then occur in each batch.
    monkeypatch.setattr(loop, "is_correct", lambda text, answer: len(text) % 2 == 0)
    out = tmp_path / sgo_filter
    main(base_args(tiny_models, out, **{"sgo-filter": sgo_filter, "batch-size": 8, "steps": 3}))
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    for r in train:
        n_correct = round(r["correct_share"] * 8)
        expected = n_correct if sgo_filter == "correct" else 8 - n_correct
        assert r["sgos_trained"] == expected
        if expected:
            side = "weight_mean_correct" if sgo_filter == "correct" else "weight_mean_incorrect"
            other = "weight_mean_incorrect" if sgo_filter == "correct" else "weight_mean_correct"
            assert r[side] is not None and r[other] is None


def test_filter_with_nothing_kept_leaves_the_model_unchanged(tiny_models, tmp_path):
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "none"
    main(base_args(tiny_models, out, **{"sgo-filter": "correct"}))
    before = load_file(tiny_models["student"] / "model.safetensors")
    after = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert all(r["sgos_trained"] == 0 and r["loss"] == 0.0 for r in train)
