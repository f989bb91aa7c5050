"""Under ``torch.autocast`` (bf16 on CPU) with fp32 weights: a linear head's logits arrive in
bf16 (Liger #305), the loss is still computed in fp32 and matches a float64 computation on the
same bf16 logits, and the fp32 (no autocast) result within bf16 tolerance."""

from __future__ import annotations

import pytest
import torch

import renio_kernels as rk
from renio_kernels import reference
from tests.helpers import GRAD_RTOL, LOSS_RTOL, rel_err

BF16 = torch.bfloat16
KW = {"beta": 0.5, "token_clip": 0.3, "threshold": 0.1}


def head_inputs(batch=2, seq=6, hidden=16, vocab=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=g)
    w_s = torch.randn(vocab, hidden, generator=g) * 0.6
    w_t = torch.cat([0.7 * w_s + 0.3 * torch.randn(vocab, hidden, generator=g), w_s[:3]])
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, :2] = -100
    return h, w_s, w_t, labels


def loss_and_grad(fn, h, w_s, w_t, labels, autocast: bool):
    w = w_s.clone().requires_grad_()
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        logits_s, logits_t = h @ w.T, h @ w_t.T
        loss = fn(logits_s, logits_t, labels)
    (loss * -1.3).backward()
    return loss, w.grad, logits_s.dtype


def ours(s, t, labels):
    return rk.renio_loss(s, t, labels, backend="torch", **KW)


def ref64(s, t, labels):
    with torch.autocast("cpu", enabled=False):
        return reference.renio_loss(s.double(), t.double(), labels, **KW)


def test_autocast_bf16_logits_path():
    inputs = head_inputs()
    loss, grad, dtype = loss_and_grad(ours, *inputs, autocast=True)
    assert dtype == BF16 and loss.dtype == torch.float32 and grad.dtype == torch.float32
    # Same bf16 logits, float64 math, the same bf16 matmul backward.
    ref, ref_grad, _ = loss_and_grad(ref64, *inputs, autocast=True)
    assert rel_err(loss, ref) < LOSS_RTOL[BF16]
    assert rel_err(grad, ref_grad) < GRAD_RTOL[BF16]
    # And the fp32 model without autocast, within what bf16 logits can give.
    fp32, fp32_grad, _ = loss_and_grad(ours, *inputs, autocast=False)
    assert rel_err(loss, fp32) < 2e-2 and rel_err(grad, fp32_grad) < 5e-2


def test_autocast_under_compile():
    inputs = head_inputs(seed=1)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    loss_c, grad_c, _ = loss_and_grad(compiled, *inputs, autocast=True)
    loss_e, grad_e, _ = loss_and_grad(ours, *inputs, autocast=True)
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(grad_c, grad_e)
    torch._dynamo.reset()


def test_autocast_fused_linear():
    """The fused-linear loss forms fp32 logits itself, so under autocast it matches the fp32
    logits path (not the bf16 one) within fp32 tolerance."""
    h, w_s, w_t, labels = head_inputs(seed=2)
    w = w_s.clone().requires_grad_()
    with torch.autocast("cpu", dtype=BF16):
        loss = rk.fused_linear_renio_loss(h, w, h, w_t, labels, backend="torch", **KW)
    (loss * -1.3).backward()
    ref, ref_grad, _ = loss_and_grad(ours, h, w_s, w_t, labels, autocast=False)
    assert rel_err(loss, ref) < 1e-5 and rel_err(w.grad, ref_grad) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_autocast_bf16_cuda_triton():
    h, w_s, w_t, labels = (x.cuda() for x in head_inputs(seq=16, vocab=1000, seed=3))
    w = w_s.clone().requires_grad_()
    with torch.autocast("cuda", dtype=BF16):
        logits_s, logits_t = h @ w.T, h @ w_t.T
        loss = rk.renio_loss(logits_s, logits_t, labels, backend="triton", **KW)
    assert logits_s.dtype == BF16 and loss.dtype == torch.float32
    loss.backward()
    ref = ref64(logits_s.detach().cpu(), logits_t.detach().cpu(), labels.cpu())
    assert rel_err(loss, ref) < LOSS_RTOL[BF16] and torch.isfinite(w.grad).all()
