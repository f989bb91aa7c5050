"""``fused_linear_renio_loss`` with ``top_k`` and with a ``SparseTeacher``: parity with the
float64 reference on the materialized logits, every backend, gradients of hidden, weight, bias."""

import pytest
import torch

import renio_kernels as rk
from renio_kernels import SparseTeacher, reference
from tests.helpers import CORE_BACKENDS, DEVICE, LINEAR_GRAD_RTOL, LOSS_RTOL, rel_err
from tests.test_fused_linear import make_linear
from tests.test_sparse_teacher import as64, sparse_from_logits

KW = {"threshold": 0.1}


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    from renio_kernels import config

    monkeypatch.setattr(config, "TRITON", config.TritonConfig(block_v=16, interpret_block_v=16))


def inputs(dtype=torch.float32, **kw):
    h_s, w_s, b_s, h_t, w_t, b_t, labels = make_linear(dtype=dtype, **kw)
    return tuple(None if x is None else x.to(DEVICE) for x in (h_s, w_s, b_s, h_t, w_t, b_t,
                                                                labels))  # fmt: skip


def teacher_logits(h_t, w_t, b_t):
    return (h_t.double() @ w_t.double().T + (0 if b_t is None else b_t.double())).float()


def run(backend, h_s, w_s, b_s, teacher, w_t, b_t, labels, grad_scale=-1.7, **kw):
    xs = [None if x is None else x.detach().clone().requires_grad_() for x in (h_s, w_s, b_s)]
    loss = rk.fused_linear_renio_loss(
        xs[0], xs[1], teacher, w_t, labels, student_bias=xs[2], teacher_bias=b_t,
        backend=backend, **kw,
    )  # fmt: skip
    (loss * grad_scale).backward()
    return loss, [None if x is None else x.grad for x in xs]


def ref(h_s, w_s, b_s, teacher, labels, grad_scale=-1.7, **kw):
    xs = [None if x is None else x.detach().double().cpu().requires_grad_() for x in
          (h_s, w_s, b_s)]  # fmt: skip
    logits = xs[0] @ xs[1].T + (0 if xs[2] is None else xs[2])
    loss = reference.renio_loss(logits, teacher, labels.cpu(), **kw)
    (loss * grad_scale).backward()
    return loss, [None if x is None else x.grad for x in xs]


def compare(got, want, dtype):
    (loss, grads), (want_loss, want_grads) = got, want
    assert rel_err(loss, want_loss) <= LOSS_RTOL[dtype], (float(loss), float(want_loss))
    for g, w in zip(grads, want_grads, strict=True):
        if w is not None:
            assert g.dtype != torch.float64 and torch.isfinite(g).all()
            assert rel_err(g, w) <= LINEAR_GRAD_RTOL[dtype]


@pytest.mark.parametrize("backend", CORE_BACKENDS)
@pytest.mark.parametrize(
    "kw",
    [dict(top_k=4), dict(top_k=2, beta=0.5, token_clip=0.05, temperature=1.3)],
    ids=["fkl", "jsd-clip"],
)
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_top_k_parity(backend, kw, chunk_size):
    h_s, w_s, b_s, h_t, w_t, b_t, labels = inputs()
    kw = {**KW, **kw}
    got = run(backend, h_s, w_s, b_s, h_t, w_t, b_t, labels, chunk_size=chunk_size, **kw)
    want = ref(h_s, w_s, b_s, teacher_logits(h_t, w_t, b_t).double().cpu(), labels, **kw)
    compare(got, want, torch.float32)


@pytest.mark.parametrize("backend", CORE_BACKENDS)
@pytest.mark.parametrize("mode", ["renormalized", "truncated"])
@pytest.mark.parametrize(
    "kw",
    [dict(), dict(beta=1.0, temperature=0.8), dict(divergence="tvd", token_clip=0.05)],
    ids=["fkl", "rkl", "tvd"],
)
def test_sparse_parity(backend, mode, kw):
    h_s, w_s, b_s, h_t, w_t, b_t, labels = inputs()
    kw = {**KW, **kw}
    logits = teacher_logits(h_t, w_t, b_t)
    teacher = sparse_from_logits(logits, labels, 5, mode, kw.get("temperature", 1.0), vocab=37)
    got = run(backend, h_s, w_s, b_s, teacher, None, None, labels, chunk_size=5, **kw)
    want = ref(h_s, w_s, b_s, as64(teacher), labels, **kw)
    compare(got, want, torch.float32)


@pytest.mark.parametrize("mode", ["renormalized", "truncated"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(mode, dtype):
    h_s, w_s, b_s, h_t, w_t, b_t, labels = inputs(dtype=dtype)
    logits = teacher_logits(h_t, w_t, b_t)
    teacher = sparse_from_logits(logits, labels, 5, mode, vocab=37)
    got = run("auto", h_s, w_s, b_s, teacher, None, None, labels, **KW)
    compare(got, ref(h_s, w_s, b_s, as64(teacher), labels, **KW), dtype)
    got = run("auto", h_s, w_s, b_s, h_t, w_t, b_t, labels, top_k=5, **KW)
    compare(got, ref(h_s, w_s, b_s, logits.double().cpu(), labels, top_k=5, **KW), dtype)


def test_matches_the_logits_path():
    h_s, w_s, b_s, h_t, w_t, b_t, labels = inputs(bias=False)
    logits = (h_s @ w_s.T).detach()
    teacher = sparse_from_logits(teacher_logits(h_t, w_t, b_t), labels, 5, "truncated", vocab=37)
    fused = rk.fused_linear_renio_loss(h_s, w_s, teacher, None, labels, backend="torch")
    torch.testing.assert_close(fused, rk.renio_loss(logits, teacher, labels, backend="torch"))


def test_top_k_at_least_vocab_is_the_dense_fused_loss():
    h_s, w_s, b_s, h_t, w_t, b_t, labels = inputs()
    full = run("torch", h_s, w_s, b_s, h_t, w_t, b_t, labels, **KW)
    top = run("torch", h_s, w_s, b_s, h_t, w_t, b_t, labels, top_k=37, **KW)
    assert torch.equal(full[0], top[0])
    for a, b in zip(full[1], top[1], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["renormalized", "truncated"])
def test_partial_gradients_no_grad_and_second_backward(mode):
    h_s, w_s, b_s, h_t, w_t, b_t, labels = inputs()
    teacher = sparse_from_logits(teacher_logits(h_t, w_t, b_t), labels, 5, mode, vocab=37)
    full = run("torch", h_s, w_s, b_s, teacher, None, None, labels, **KW)[1]
    # Only the hidden states trained (frozen lm_head, no bias).
    h = h_s.clone().requires_grad_()
    loss = rk.fused_linear_renio_loss(h, w_s, teacher, None, labels, student_bias=b_s, **KW)
    (loss * -1.7).backward(retain_graph=True)
    torch.testing.assert_close(h.grad, full[0])
    (loss * -1.7).backward()
    torch.testing.assert_close(h.grad, 2 * full[0])
    with torch.no_grad():
        assert torch.isfinite(rk.fused_linear_renio_loss(h_s, w_s, teacher, None, labels))


def test_module_takes_a_sparse_teacher():
    h_s, w_s, b_s, h_t, w_t, b_t, labels = inputs()
    teacher = sparse_from_logits(teacher_logits(h_t, w_t, b_t), labels, 5, vocab=37)
    loss = rk.FusedLinearReNIOLoss(beta=0.5)(h_s, w_s, teacher, None, labels, student_bias=b_s)
    want = rk.fused_linear_renio_loss(h_s, w_s, teacher, None, labels, student_bias=b_s, beta=0.5)
    assert torch.equal(loss, want)


def test_compiled_equals_eager():
    h_s, w_s, b_s, h_t, w_t, b_t, labels = inputs()
    teacher = sparse_from_logits(teacher_logits(h_t, w_t, b_t), labels, 5, vocab=37)

    def fn(h, w):
        return rk.fused_linear_renio_loss(h, w, teacher, None, labels, threshold=0.1)

    def grads(f):
        xs = [x.clone().requires_grad_() for x in (h_s, w_s)]
        loss = f(*xs)
        (loss * 1.7).backward()
        return [loss.detach()] + [x.grad for x in xs]

    torch._dynamo.reset()
    for got, want in zip(grads(torch.compile(fn, backend="aot_eager")), grads(fn), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_bad_calls():
    h_s, w_s, b_s, h_t, w_t, b_t, labels = inputs()
    teacher = sparse_from_logits(teacher_logits(h_t, w_t, b_t), labels, 5, vocab=37)
    with pytest.raises(ValueError, match="pass teacher_weight=None and teacher_bias=None"):
        rk.fused_linear_renio_loss(h_s, w_s, teacher, w_t, labels)
    with pytest.raises(ValueError, match="already carries its k ids"):
        rk.fused_linear_renio_loss(h_s, w_s, teacher, None, labels, top_k=3)
    wide = SparseTeacher(teacher.ids + 10, teacher.logprobs, teacher.sampled_logprob)
    with pytest.raises(ValueError, match="outside \\[0, Vs = 37\\)"):
        rk.fused_linear_renio_loss(h_s, w_s, wide, None, labels)
    with pytest.raises(ValueError, match="student_weight must be \\(V, H\\)"):
        rk.fused_linear_renio_loss(h_s, w_s.T, teacher, None, labels)


@pytest.mark.parametrize("mode", ["renormalized", "truncated"])
def test_autocast_changes_nothing(mode):
    """The chunk matmuls run with autocast off (fp32 logits), forward and backward."""
    h_s, w_s, b_s, h_t, w_t, b_t, labels = inputs()
    teacher = sparse_from_logits(teacher_logits(h_t, w_t, b_t), labels, 5, mode, vocab=37)
    plain = run("torch", h_s, w_s, b_s, teacher, None, None, labels, **KW)
    with torch.autocast(device_type=h_s.device.type, dtype=torch.bfloat16):
        cast = run("torch", h_s, w_s, b_s, teacher, None, None, labels, **KW)
    torch.testing.assert_close(cast[0], plain[0])
    for a, b in zip(cast[1], plain[1], strict=True):
        torch.testing.assert_close(a, b)
    with torch.autocast(device_type=h_s.device.type, dtype=torch.bfloat16):
        top = run("torch", h_s, w_s, b_s, h_t, w_t, b_t, labels, top_k=4, **KW)
    torch.testing.assert_close(top[0], run("torch", h_s, w_s, b_s, h_t, w_t, b_t, labels,
                                           top_k=4, **KW)[0])  # fmt: skip
