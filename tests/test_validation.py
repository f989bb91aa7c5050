"""Every bad input gets a ValueError that says what to fix."""

import pytest
import torch

import renio_kernels as rk
from tests.helpers import make_inputs


@pytest.fixture
def inputs():
    return make_inputs(ignore="none")


def test_shape_mismatch(inputs):
    s, t, labels = inputs
    with pytest.raises(ValueError, match=r"teacher_logits \(B, T\)"):
        rk.renio_loss(s, t[:, :-1], labels, backend="torch")
    with pytest.raises(ValueError, match="labels has shape"):
        rk.renio_loss(s, t, labels[:, :-1], backend="torch")
    with pytest.raises(ValueError, match=r"must be \(B, T, V\)"):
        rk.renio_loss(s[0], t[0], labels[0], backend="torch")


def test_teacher_vocab_smaller(inputs):
    s, t, labels = inputs
    with pytest.raises(ValueError, match="teacher vocabulary .* smaller"):
        rk.renio_loss(s, t[..., :-1], labels, backend="torch")


@pytest.mark.parametrize("bad", [-1, 37, 10_000])
def test_labels_out_of_range(inputs, bad):
    s, t, labels = inputs
    labels[1, 2] = bad
    with pytest.raises(ValueError, match=f"labels contain {bad}, outside"):
        rk.renio_loss(s, t, labels, backend="torch")
    with pytest.raises(ValueError, match="outside"):
        rk.sampled_reverse_kl_loss(s, t, labels, backend="torch")


def test_ignore_index_is_not_out_of_range(inputs):
    s, t, labels = inputs
    labels[0, 0] = -7
    rk.renio_loss(s, t, labels, ignore_index=-7, backend="torch")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"temperature": 0.0}, "temperature must be finite and > 0"),
        ({"temperature": -1.0}, "temperature must be finite and > 0"),
        ({"temperature": float("inf")}, "temperature must be finite"),
        ({"beta": -0.1}, r"beta must be in \[0, 1\]"),
        ({"beta": 1.5}, r"beta must be in \[0, 1\]"),
        ({"beta": float("nan")}, "beta must not be NaN"),
        ({"weight_norm": "softmax"}, "unknown weight_norm 'softmax'"),
        ({"token_clip": -0.5}, "token_clip must be None"),
        ({"weight_temperature": 0.0}, "weight_temperature must be finite and > 0"),
        ({"use_renio": "yes"}, "use_renio must be a bool"),
        ({"ignore_index": 1.5}, "ignore_index must be an int"),
        ({"backend": "cuda"}, "unknown backend 'cuda'"),
        ({"weight_norm": "ema"}, "weight_norm='ema' keeps a running mean"),
    ],
)
def test_bad_options(inputs, kw, match):
    s, t, labels = inputs
    with pytest.raises(ValueError, match=match):
        rk.renio_loss(s, t, labels, **kw)


def test_bad_module_options():
    with pytest.raises(ValueError, match="beta must be in"):
        rk.ReNIOLoss(beta=2.0)
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        rk.SampledReverseKLLoss(temperature=0.0)


def test_unsupported_dtypes(inputs):
    s, t, labels = inputs
    with pytest.raises(ValueError, match="student_logits has dtype torch.float64"):
        rk.renio_loss(s.double(), t, labels, backend="torch")
    with pytest.raises(ValueError, match="teacher_logits has dtype torch.int64"):
        rk.renio_loss(s, t.long(), labels, backend="torch")
    with pytest.raises(ValueError, match="labels has dtype torch.float32"):
        rk.renio_loss(s, t, labels.float(), backend="torch")
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        rk.renio_loss(s.numpy(), t, labels, backend="torch")


def test_int32_labels_accepted(inputs):
    s, t, labels = inputs
    a = rk.renio_loss(s, t, labels.int(), backend="torch")
    b = rk.renio_loss(s, t, labels, backend="torch")
    torch.testing.assert_close(a, b)


def test_different_devices(inputs):
    s, t, labels = inputs
    with pytest.raises(ValueError, match="teacher_logits is on meta but student_logits is on cpu"):
        rk.renio_loss(s, t.to("meta"), labels, backend="torch")
    with pytest.raises(ValueError, match="labels is on meta"):
        rk.renio_loss(s, t, labels.to("meta"), backend="torch")


def test_empty_inputs():
    s = torch.zeros(0, 3, 5)
    with pytest.raises(ValueError, match="empty batch"):
        rk.renio_loss(s, s, torch.zeros(0, 3, dtype=torch.long), backend="torch")
    s = torch.zeros(2, 3, 0)
    with pytest.raises(ValueError, match="empty vocabulary"):
        rk.renio_loss(s, s, torch.zeros(2, 3, dtype=torch.long), backend="torch")


def test_triton_on_cpu_without_interpreter(inputs, monkeypatch):
    s, t, labels = inputs
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        rk.renio_loss(s, t, labels, backend="triton")
