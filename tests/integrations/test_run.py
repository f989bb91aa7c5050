"""The shared step ``integrations.run``: the numerical fused-linear exactness check (probed once
per model, eval mode restored, dtype-aware tolerance) and the fall-back / error it decides.
Each caller's use of it is tested next to the caller (test_hf, test_trl, tests/train)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="the model helpers need transformers")

from renio_kernels.integrations.run import (
    fused_linear_mismatch,
    use_fused_linear,
)
from tests.integrations.tiny_models import tiny_gemma2, tiny_llama


def count_forwards(model):
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_exact_model_passes_and_modes_are_restored():
    model = tiny_llama(0).train()
    model.model.layers[0].eval()  # a submodule in its own mode
    assert fused_linear_mismatch(model) is None
    assert model.training and model.lm_head.training
    assert not model.model.layers[0].training


def test_softcap_is_detected_once_per_model():
    model = tiny_gemma2(0)
    calls = count_forwards(model)
    assert "differ by up to" in fused_linear_mismatch(model)
    assert len(calls) == 1
    calls.clear()
    assert use_fused_linear(model, "student", None) is False  # falls back
    assert use_fused_linear(model, "student", None) is False
    with pytest.raises(ValueError, match=r"fused_linear=True needs the teacher's logits.*soft-cap"):
        use_fused_linear(model, "teacher", True)
    assert len(calls) == 1  # probed once, then cached
    assert use_fused_linear(model, "student", False) is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tolerance_follows_the_dtype(dtype):
    """bf16 rounding of an exact head passes; a soft cap still fails in bf16 (at a cap whose
    effect on these small logits, ~7%, is well above bf16's ~1.7% tolerance)."""
    assert fused_linear_mismatch(tiny_llama(0).to(dtype)) is None
    assert fused_linear_mismatch(tiny_gemma2(0, softcap=15.0).to(dtype)) is not None
    assert fused_linear_mismatch(tiny_gemma2(0, softcap=None).to(dtype)) is None


def test_exact_under_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_linear_mismatch(tiny_llama(0)) is None
        assert fused_linear_mismatch(tiny_gemma2(0)) is not None


def test_head_that_is_not_a_linear():
    model = tiny_llama(0)
    model.lm_head = torch.nn.Sequential(model.lm_head)
    assert "not a torch.nn.Linear" in fused_linear_mismatch(model)
    with pytest.raises(ValueError, match="Sequential"):
        use_fused_linear(model, "student", True, names=("forced", "the logits"))
