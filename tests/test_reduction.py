"""``reduction``: sequence_mean (the paper's), token_mean (Liger's JSD, verl's token-mean) and sum
(TRL's ``num_items_in_batch`` convention), on every backend and the fused-linear loss, against the
float64 reference and against Liger-Kernel's own JSD."""

from __future__ import annotations

import pytest
import torch

import renio_kernels as rk
from tests.helpers import CORE_BACKENDS, DEVICE, make_inputs, ref_loss_and_grad

REDUCTIONS = ("sequence_mean", "token_mean", "sum")


@pytest.mark.parametrize("backend", CORE_BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weight_norm", ["batch_mean", "none"])
def test_reduction_matches_float64(backend, reduction, weight_norm):
    s, t, labels = make_inputs(batch=3, seq=6, vocab=53, teacher_vocab=60, device=DEVICE)
    labels[1] = -100  # a fully ignored sequence counts in sequence_mean's B, not in the tokens
    kw = dict(beta=0.3, temperature=1.3, weight_norm=weight_norm, reduction=reduction)
    ref, ref_grad = ref_loss_and_grad(s, t, labels, grad_scale=1.7, **kw)
    x = s.clone().requires_grad_()
    loss = rk.renio_loss(x, t, labels, backend=backend, **kw)
    (loss * 1.7).backward()
    torch.testing.assert_close(loss.double().cpu(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad.double().cpu(), ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_linear_reduction_matches_logits_path(reduction):
    g = torch.Generator().manual_seed(1)
    batch, seq, hidden, vocab = 3, 5, 16, 41
    h_s = torch.randn(batch, seq, hidden, generator=g)
    w_s = torch.randn(vocab, hidden, generator=g) * 0.5
    h_t = torch.randn(batch, seq, hidden, generator=g)
    w_t = torch.randn(vocab + 3, hidden, generator=g) * 0.5
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, :3] = -100
    kw = dict(beta=0.5, reduction=reduction)
    hs64, ws64 = (x.double().requires_grad_() for x in (h_s, w_s))
    ref = rk.reference.renio_loss(hs64 @ ws64.T, (h_t @ w_t.T).double(), labels, **kw)
    (ref * 0.7).backward()
    hs, ws = (x.clone().requires_grad_() for x in (h_s, w_s))
    loss = rk.fused_linear_renio_loss(hs, ws, h_t, w_t, labels, chunk_size=4, **kw)
    (loss * 0.7).backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(hs.grad.double(), hs64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ws.grad.double(), ws64.grad, rtol=1e-4, atol=1e-6)


def test_token_mean_is_ligers_jsd():
    """Two sequences of 100 and 10 valid tokens: the sequence mean weighs the short one 10x per
    token; token_mean with use_renio=False is Liger-Kernel's JSD loss (its Triton kernel, run
    under the interpreter here), and ``"sum"`` its total."""
    liger = pytest.importorskip("liger_kernel.transformers")
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 100, 32, generator=g), torch.randn(2, 100, 32, generator=g)
    labels = torch.randint(0, 32, (2, 100), generator=g)
    labels[1, 10:] = -100
    t[1] *= 3  # the short sequence diverges more, so the two means differ
    for beta in (0.0, 0.5, 1.0):
        ls, lt = (x.log_softmax(-1).reshape(-1, 32) for x in (s, t))
        theirs = liger.LigerJSD(beta=beta)(ls, lt, labels.reshape(-1))
        kw = dict(beta=beta, use_renio=False, backend="torch")
        ours = rk.renio_loss(s, t, labels, reduction="token_mean", **kw)
        total = rk.renio_loss(s, t, labels, reduction="sum", **kw)
        per_seq = rk.renio_loss(s, t, labels, **kw)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(total, theirs * 110, rtol=1e-5, atol=1e-6)
        assert abs(per_seq / theirs - 1) > 0.1  # the default really is a different reduction


def test_token_mean_of_fully_ignored_batch_is_zero():
    s, t, labels = make_inputs(ignore="all")
    x = s.clone().requires_grad_()
    loss = rk.renio_loss(x, t, labels, reduction="token_mean", backend="torch")
    loss.backward()
    assert loss.item() == 0.0 and not x.grad.any()


def test_unknown_reduction_is_a_clear_error():
    s, t, labels = make_inputs()
    with pytest.raises(ValueError, match="unknown reduction 'mean'; expected one of"):
        rk.renio_loss(s, t, labels, reduction="mean")
