"""The divergence registry: every divergence on every backend that declares it, against float64.

Parametrized over ``DIVERGENCES`` so a new entry is tested here without editing this file. A
backend that does not declare a divergence must refuse it when forced and be replaced under
``backend="auto"``.
"""

import pytest
import torch

import renio_kernels as rk
from renio_kernels.ops.backends import resolve_backend
from renio_kernels.ops.divergences import DIVERGENCES, resolve_divergence
from tests.helpers import (
    CORE_BACKENDS,
    DEVICE,
    GRAD_RTOL,
    LINEAR_GRAD_RTOL,
    LOSS_RTOL,
    make_inputs,
    ref_loss_and_grad,
    rel_err,
)
from tests.test_fused_linear import make_linear

# A beta each divergence accepts (JSD needs one strictly between 0 and 1).
BETA = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.3, "tvd": 0.0}
KW = {"threshold": 0.1}


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    from renio_kernels import config

    monkeypatch.setattr(config, "TRITON", config.TritonConfig(block_v=16, interpret_block_v=16))


def _declares(backend: str, name: str) -> bool:
    return name in resolve_backend(backend, torch.device(DEVICE)).divergences


def _run(backend, s, t, labels, grad_scale, **kw):
    x = s.detach().clone().requires_grad_()
    loss = rk.renio_loss(x, t, labels, backend=backend, **kw)
    (loss * grad_scale).backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("backend", CORE_BACKENDS)
@pytest.mark.parametrize("name", list(DIVERGENCES))
@pytest.mark.parametrize("token_clip", [None, 0.02])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_divergence_matches_float64(backend, name, token_clip, dtype):
    if backend == "triton" and DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 is unreliable in the Triton interpreter; covered on GPU")
    if not _declares(backend, name):
        pytest.skip(f"backend {backend!r} does not declare {name!r} (test_undeclared_...)")
    # 37 columns: several 16-lane tiles and a partial last one; a fully ignored row.
    s, t, labels = make_inputs(batch=3, seq=4, vocab=37, teacher_vocab=40, dtype=dtype,
                               device=DEVICE, ignore="row")  # fmt: skip
    labels[1, 0] = -100
    kw = dict(KW, divergence=name, beta=BETA[name], token_clip=token_clip, temperature=1.3)
    ref, ref_grad = ref_loss_and_grad(s, t, labels, grad_scale=1.7, **kw)
    loss, grad = _run(backend, s, t, labels, 1.7, **kw)
    assert rel_err(loss, ref) <= LOSS_RTOL[dtype], (float(loss), float(ref))
    assert rel_err(grad, ref_grad) <= GRAD_RTOL[dtype]
    assert (grad[labels == -100] == 0).all()


@pytest.mark.parametrize("name", list(DIVERGENCES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_divergence_fused_linear(name, dtype):
    hs, ws, bs, ht, wt, bt, labels = make_linear(dtype=dtype, seed=3)
    kw = dict(KW, divergence=name, beta=BETA[name], token_clip=0.05)
    hs64, ws64 = (x.detach().double().requires_grad_() for x in (hs, ws))
    logits_s = hs64 @ ws64.T + bs.double()
    logits_t = ht.double() @ wt.double().T + bt.double()
    ref = rk.reference.renio_loss(logits_s, logits_t, labels, **kw)
    (1.7 * ref).backward()
    x_h, x_w = (x.detach().clone().requires_grad_() for x in (hs, ws))
    loss = rk.fused_linear_renio_loss(
        x_h, x_w, ht, wt, labels, student_bias=bs, teacher_bias=bt, chunk_size=5, **kw
    )
    (1.7 * loss).backward()
    assert rel_err(loss, ref) <= LOSS_RTOL[dtype]
    assert rel_err(x_h.grad, hs64.grad) <= LINEAR_GRAD_RTOL[dtype]
    assert rel_err(x_w.grad, ws64.grad) <= LINEAR_GRAD_RTOL[dtype]


def test_tvd_is_half_the_l1_distance_and_bounded():
    s, t, labels = make_inputs(batch=2, seq=3, vocab=23, ignore="none")
    _, stats = rk.renio_loss(s, t, labels, divergence="tvd", use_renio=False, return_stats=True)
    l1 = (s.softmax(-1) - t.softmax(-1)).abs().sum(-1).mean(-1)
    torch.testing.assert_close(stats["divergence"], 0.5 * l1, rtol=1e-5, atol=1e-7)
    assert (stats["divergence"] >= 0).all() and (stats["divergence"] <= 1).all()
    same = rk.renio_loss(s, s, labels, divergence="tvd")
    assert same.item() == 0.0


def test_tvd_gradient_is_zero_at_exact_ties():
    s, _, labels = make_inputs(batch=2, seq=3, vocab=11, ignore="none")
    for backend in ("torch", "triton"):
        x = s.clone().requires_grad_()
        rk.renio_loss(x, s, labels, divergence="tvd", backend=backend).backward()
        assert torch.equal(x.grad, torch.zeros_like(x.grad)), backend


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_undeclared_divergences_are_refused_or_replaced(monkeypatch, name):
    """A backend that does not declare a divergence (here: the native kernel, told to declare
    every other one) refuses it when forced; ``backend="auto"`` takes the torch backend."""
    from renio_kernels.ops.cpu import native

    if native.load_extension() is None:
        pytest.skip(f"native extension unavailable: {native.extension_error()}")
    others = frozenset(DIVERGENCES) - {name}
    monkeypatch.setattr(native, "divergences", lambda: others)
    s, t, labels = make_inputs()
    kw = dict(divergence=name, beta=BETA[name])
    with pytest.raises(ValueError, match=f"does not implement divergence='{name}'"):
        rk.renio_loss(s, t, labels, backend="cpu", **kw)
    assert resolve_backend("auto", s.device, name).name == "torch"
    auto = rk.renio_loss(s, t, labels, **kw)
    torch.testing.assert_close(auto, rk.renio_loss(s, t, labels, backend="torch", **kw))


def test_registry_modes_and_beta_selection():
    modes = [d.mode for d in DIVERGENCES.values()]
    assert sorted(modes) == list(range(len(modes)))
    assert resolve_divergence(None, 0.0).name == "forward_kl"
    assert resolve_divergence(None, 1.0).name == "reverse_kl"
    assert resolve_divergence(None, 0.5).name == "jsd"
    assert resolve_divergence("tvd", 0.7).name == "tvd"


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"divergence": "kl"}, "unknown divergence 'kl'"),
        ({"divergence": "jsd", "beta": 0.0}, "divergence='jsd' needs beta"),
        ({"divergence": "reverse_kl", "beta": 0.5}, "divergence='reverse_kl' needs beta"),
    ],
)
def test_bad_divergence_choices_say_how_to_fix(kw, match):
    s, t, labels = make_inputs()
    with pytest.raises(ValueError, match=match):
        rk.renio_loss(s, t, labels, **kw)
    with pytest.raises(ValueError, match=match):
        rk.ReNIOLoss(**kw)
