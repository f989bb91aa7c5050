"""``torch.compile(fullgraph=True)`` through the ``renio::`` custom ops, against eager.

Most cases use ``backend="aot_eager"``: it runs Dynamo (where graph breaks happen), the fake
implementations and AOTAutograd's joint forward/backward trace, and is fast enough for CPU CI;
one case goes through Inductor's code generation. The kernels are the torch backend's (the CPU
path; the Triton interpreter is not run under compile).
"""

from __future__ import annotations

import pytest
import torch

import renio_kernels as rk
from tests.helpers import make_inputs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def run(fn, s, t, labels, grad_scale=-1.7):
    s = s.detach().clone().requires_grad_()
    out = fn(s, t.clone(), labels)
    loss = out[0] if isinstance(out, tuple) else out
    (loss * grad_scale).backward()
    return out, s.grad


def assert_parity(fn, *inputs, backend="aot_eager", dynamic=None):
    compiled = torch.compile(fn, fullgraph=True, backend=backend, dynamic=dynamic)
    out_c, grad_c = run(compiled, *inputs)
    out_e, grad_e = run(fn, *inputs)
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_c, grad_e, rtol=1e-6, atol=1e-7)


CASES = {
    "fkl": {},
    "jsd-clip": {"beta": 0.5, "token_clip": 0.05, "threshold": 0.1},
    "rkl-clamp-tau": {"beta": 1.0, "temperature": 0.7, "weight_norm": "clamp", "threshold": 0.1},
    "plain-opd": {"use_renio": False, "ratio_clip": None},
}


@pytest.mark.parametrize("kw", CASES.values(), ids=CASES.keys())
def test_renio_loss_fullgraph(kw):
    inputs = make_inputs(batch=3, seq=6, vocab=37, teacher_vocab=41)

    def fn(s, t, labels):
        loss, stats = rk.renio_loss(s, t, labels, backend="torch", return_stats=True, **kw)
        return loss, stats["weights"], stats["log_ratio"]

    assert_parity(fn, *inputs)


def test_inductor_fullgraph():
    inputs = make_inputs(batch=2, seq=5, vocab=33, ignore="row")

    def fn(s, t, labels):
        return rk.renio_loss(s, t, labels, beta=0.3, token_clip=0.1, backend="torch")

    assert_parity(fn, *inputs, backend="inductor")


def test_sampled_reverse_kl_fullgraph():
    def fn(s, t, labels):
        return rk.sampled_reverse_kl_loss(s, t, labels, temperature=1.3, backend="torch")

    assert_parity(fn, *make_inputs(batch=2, seq=5, vocab=37))


def test_symbolic_options_and_shapes():
    """dynamic=True traces float options as symbolic floats (fp64-backed, Liger #1362) and shapes
    as symbols. Every call must match eager; a new shape reuses the graph, a new option value
    recompiles once (the custom op call specializes its float arguments, which keeps the kernels
    on real Python floats)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def fn(s, t, labels, beta, tau):
        return rk.renio_loss(s, t, labels, beta=beta, temperature=tau, backend="torch")

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter, dynamic=True)
    frames = []
    for seq, beta, tau in ((5, 0.3, 1.0), (7, 0.3, 1.0), (6, 0.6, 0.8)):
        s, t, labels = make_inputs(batch=2, seq=seq, vocab=37)
        got = compiled(s, t, labels, beta, tau)
        want = rk.renio_loss(s, t, labels, beta=beta, temperature=tau, backend="torch")
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        frames.append(counter.frame_count)
    assert frames[1] == frames[0] < frames[2]


def test_ema_module_state_advances_like_eager():
    inputs = [make_inputs(batch=3, seq=4, vocab=29, seed=i) for i in range(2)]
    eager, compiled_mod = (rk.ReNIOLoss(weight_norm="ema", backend="torch") for _ in range(2))
    compiled = torch.compile(compiled_mod, fullgraph=True, backend="aot_eager")
    for s, t, labels in inputs:
        torch.testing.assert_close(compiled(s, t, labels), eager(s, t, labels))
        torch.testing.assert_close(compiled_mod.ema_mean, eager.ema_mean)
    assert torch.isfinite(eager.ema_mean)


def test_label_check_without_host_sync():
    """Under compile the range check is an async assert (RuntimeError), not a graph break."""
    s, t, labels = make_inputs(batch=2, seq=4, vocab=29)
    labels[1, 2] = 29
    compiled = torch.compile(
        lambda s, t, x: rk.renio_loss(s, t, x, backend="torch"), fullgraph=True, backend="eager"
    )
    with pytest.raises(RuntimeError, match="outside"):
        compiled(s, t, labels)
    with pytest.raises(ValueError, match="outside"):
        rk.renio_loss(s, t, labels, backend="torch")
    unchecked = torch.compile(
        lambda s, t, x: rk.renio_loss(s, t, x, backend="torch", check_labels=False),
        fullgraph=True,
        backend="eager",
    )
    assert torch.isnan(unchecked(s, t, labels))


def test_invalid_option_raises_under_compile():
    s, t, labels = make_inputs(batch=1, seq=3, vocab=11)
    compiled = torch.compile(
        lambda s, t, x: rk.renio_loss(s, t, x, beta=1.5, backend="torch"), backend="eager"
    )
    with pytest.raises(ValueError, match="beta must be in"):
        compiled(s, t, labels)


def test_custom_op_opcheck():
    """torch.library.opcheck: schema (no undeclared mutation), fake impl, autograd."""
    s, t, labels = make_inputs(batch=2, seq=3, vocab=13)
    # store_c=False is only ever used when the student needs no gradient.
    cases = ((True, True, True), (True, False, False), (False, False, True))
    for backend, unit_grad in (("torch", False), ("cpu", True), ("cpu", False)):
        for with_div, store_c, grad in cases:
            student = s.clone().requires_grad_(grad)
            args = (student, [t], labels, "dense", "jsd", 0.5, 1.0, 0.05, -100, backend,
                    with_div, store_c, unit_grad)  # fmt: skip
            torch.library.opcheck(torch.ops.renio.row_stats_fwd.default, args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton under compile)")
def test_triton_kernels_under_inductor_on_gpu():
    s, t, labels = (x.cuda() for x in make_inputs(batch=2, seq=8, vocab=1000, teacher_vocab=1003))

    def fn(s, t, labels):
        return rk.renio_loss(s, t, labels, beta=0.5, token_clip=0.05, backend="triton")

    assert_parity(fn, s, t, labels, backend="inductor")


LINEAR_CASES = {
    "renio-bias": ({"beta": 0.5, "token_clip": 0.3, "threshold": 0.1}, (True, True, True)),
    "plain-opd": ({"use_renio": False}, (True, True, False)),
    "frozen-head": ({"beta": 1.0, "weight_norm": "clamp", "threshold": 0.1}, (True, False, False)),
}


@pytest.mark.parametrize("kw, grads", LINEAR_CASES.values(), ids=LINEAR_CASES.keys())
def test_fused_linear_fullgraph(kw, grads):
    g = torch.Generator().manual_seed(1)
    batch, seq, hs_, ht_, vocab = 2, 5, 8, 12, 37
    hs, ht = torch.randn(batch, seq, hs_, generator=g), torch.randn(batch, seq, ht_, generator=g)
    ws, wt = torch.randn(vocab, hs_, generator=g), torch.randn(vocab + 3, ht_, generator=g)
    bs = torch.randn(vocab, generator=g) * 0.1
    _, _, labels = make_inputs(batch=batch, seq=seq, vocab=vocab)

    def fn(h, w, b):
        return rk.fused_linear_renio_loss(
            h, w, ht, wt, labels, student_bias=b, backend="torch", chunk_size=3, **kw
        )

    def run(f):
        xs = [x.clone().requires_grad_(r) for x, r in zip((hs, ws, bs), grads, strict=True)]
        (f(*xs) * -1.7).backward()
        return [x.grad for x in xs]

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(hs, ws, bs), fn(hs, ws, bs), rtol=1e-6, atol=1e-7)
    for got, want in zip(run(compiled), run(fn), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fused_linear_custom_op_opcheck():
    g = torch.Generator().manual_seed(2)
    hs, ht = torch.randn(2, 3, 6, generator=g), torch.randn(2, 3, 5, generator=g)
    ws, wt, bs = torch.randn(11, 6, generator=g), torch.randn(11, 5, generator=g), torch.randn(11)
    _, _, labels = make_inputs(batch=2, seq=3, vocab=11)
    for use_renio, ratio_clip, norm in ((False, 2.5, "batch_mean"), (True, None, "ema")):
        args = (
            hs.requires_grad_(), ws.requires_grad_(), bs.requires_grad_(), ht, wt, None, labels,
            "jsd", 0.5, 1.0, 0.3, -100, "torch", 2, True, True, True, use_renio, ratio_clip, 0.1,
            1.0, norm,
        )  # fmt: skip
        torch.library.opcheck(torch.ops.renio.fused_linear_fwd.default, args)


def test_compiled_and_eager_take_the_same_numerical_path(monkeypatch):
    """The native CPU kernel forms the gradient in the forward in both modes (the compiled
    backward scales it into a new tensor): the same numbers, bit for bit."""
    from renio_kernels.ops.cpu import native

    if native.load_extension() is None:
        pytest.skip(f"native extension unavailable: {native.extension_error()}")
    calls = []
    real = native.renio_fwd_grad_cpu
    monkeypatch.setattr(native, "renio_fwd_grad_cpu", lambda *a: calls.append(1) or real(*a))
    inputs = make_inputs(batch=3, seq=6, vocab=300, teacher_vocab=301)

    def fn(s, t, labels):
        return rk.renio_loss(s, t, labels, backend="cpu", token_clip=0.05, threshold=0.1)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    (loss_c, grad_c), (loss_e, grad_e) = run(compiled, *inputs), run(fn, *inputs)
    assert len(calls) == 2
    assert torch.equal(loss_c, loss_e) and torch.equal(grad_c, grad_e)


def test_fused_linear_opd_same_path_compiled_and_eager(monkeypatch):
    """The forward forms every gradient (4 matmul passes) in both modes, use_renio or not."""
    from renio_kernels.core import autograd

    sweeps = []
    real = autograd.grad_sweep
    monkeypatch.setattr(autograd, "grad_sweep", lambda *a: sweeps.append(1) or real(*a))
    g = torch.Generator().manual_seed(3)
    hs, ht = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 6, generator=g)
    ws, wt = torch.randn(37, 8, generator=g), torch.randn(37, 6, generator=g)
    _, _, labels = make_inputs(batch=2, seq=5, vocab=37)

    def fn(h, w):
        return rk.fused_linear_renio_loss(h, w, ht, wt, labels, use_renio=False, chunk_size=3)

    grads = []
    for f in (torch.compile(fn, fullgraph=True, backend="aot_eager"), fn):
        h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
        (f(h, w) * -1.7).backward()
        grads.append((h.grad, w.grad))
    assert sweeps == []  # no backward recompute sweep in either mode
    fn(hs, ws.clone().requires_grad_()).backward()
    assert sweeps == []
    # Nor with the ReNIO weights (4 passes too); the spy sees a recompute when there is one.
    with_renio = rk.fused_linear_renio_loss(hs, ws.clone().requires_grad_(), ht, wt, labels)
    with_renio.backward()
    assert sweeps == []
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
