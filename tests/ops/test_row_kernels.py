"""The row kernels directly: every output written, per-row values, both gradient terms, chunking.

Output buffers are poisoned (``torch.empty`` patched to fill NaN / a sentinel) so a row a kernel
forgets to write shows up instead of passing on a lucky zero.
"""

import pytest
import torch

from renio_kernels.ops.rows import ANCHOR_COLUMNS, DenseTeacher, DivergenceParams
from renio_kernels.ops.torch.chunked import renio_bwd_torch, renio_fwd_torch, row_chunks
from tests.helpers import DEVICE, HAS_CUDA, INTERPRET, make_inputs

_real_empty = torch.empty


def _poisoned_empty(*args, **kwargs):
    out = _real_empty(*args, **kwargs)
    return out.fill_(float("nan") if out.is_floating_point() else -12345)


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setattr(torch, "empty", _poisoned_empty)


def _ref_rows(s, t, labels, params):
    """Per-row float64 values straight from the definitions (``lse`` relative to the row's
    anchor, the largest of its first ``ANCHOR_COLUMNS`` logits / tau: ``ops.rows``)."""
    vocab = s.shape[-1]
    a = s.double() / params.temperature
    b = t[..., :vocab].double() / params.temperature
    an_s, an_t = (x[..., :ANCHOR_COLUMNS].amax(-1) for x in (a, b))
    lse_s, lse_t = a.logsumexp(-1) - an_s, b.logsumexp(-1) - an_t
    valid = labels != params.ignore_index
    idx = labels.clamp(min=0).unsqueeze(-1)
    ls_x = (a.gather(-1, idx).squeeze(-1) - an_s - lse_s) * valid
    lt_x = (b.gather(-1, idx).squeeze(-1) - an_t - lse_t) * valid
    return lse_s * valid, lse_t * valid, ls_x, lt_x


def _backends():
    from renio_kernels.ops.triton.bwd import renio_bwd
    from renio_kernels.ops.triton.fwd import renio_fwd

    return {"torch": (renio_fwd_torch, renio_bwd_torch), "triton": (renio_fwd, renio_bwd)}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("with_divergence", [True, False])
def test_forward_writes_every_output(backend, with_divergence, poison):
    fwd, _ = _backends()[backend]
    s, t, labels = make_inputs(batch=3, seq=4, vocab=53, teacher_vocab=60, device=DEVICE)
    params = DivergenceParams(beta=0.5, temperature=1.3, token_clip=0.05)
    kw = {"block_v": 16} if backend == "triton" else {"chunk_elements": 64}
    stats = fwd(
        s, DenseTeacher(t), labels, params, with_divergence=with_divergence, store_c=True, **kw
    )
    for name in ("lse_s", "lse_t", "ls_x", "lt_x", "d"):
        assert torch.isfinite(getattr(stats, name)).all(), name
    assert (stats.c is not None) == with_divergence
    valid = labels != -100
    if not with_divergence:
        assert (stats.d == 0).all()
    assert (stats.lse_s[~valid] == 0).all() and (stats.ls_x[~valid] == 0).all()
    for got, ref in zip(stats[:4], _ref_rows(s, t, labels, params), strict=True):
        torch.testing.assert_close(got.double().cpu(), ref.cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("terms", ["div", "sampled", "both"])
def test_backward_terms_match_autograd(backend, terms, poison):
    """grad = gd * d(d)/ds + gx * d(ls[x])/ds, against autograd on float64 definitions."""
    from renio_kernels import reference

    fwd, bwd = _backends()[backend]
    s, t, labels = make_inputs(batch=2, seq=3, vocab=41, device=DEVICE)
    params = DivergenceParams(beta=1.0, temperature=0.8, token_clip=0.05)
    kw = {"block_v": 16} if backend == "triton" else {"chunk_elements": 41 * 2}
    stats = fwd(s, DenseTeacher(t), labels, params, with_divergence=True, store_c=True, **kw)
    gd = torch.randn(labels.shape, device=labels.device) if terms != "sampled" else None
    gx = torch.randn(labels.shape, device=labels.device) if terms != "div" else None
    grad = bwd(s, DenseTeacher(t), labels, params, stats, gd, gx, **kw)

    s64 = s.double().requires_grad_()
    d, _, mask = reference.per_token(
        s64, t.double(), labels, beta=1.0, temperature=0.8, token_clip=0.05
    )
    ls = torch.log_softmax(s64 / 0.8, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1))
    total = 0.0
    if gd is not None:
        total = total + (gd.double() * d).sum()
    if gx is not None:
        total = total + (gx.double() * ls.squeeze(-1) * mask).sum()
    (expected,) = torch.autograd.grad(total, s64)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-6)
    assert (grad[~mask] == 0).all()


@pytest.mark.parametrize(
    ("batch", "seq", "vocab", "chunk"), [(3, 5, 10, 20), (3, 5, 10, 100), (2, 7, 10, 10_000)]
)
def test_row_chunks_cover_every_row_once(batch, seq, vocab, chunk):
    seen = torch.zeros(batch, seq, dtype=torch.int64)
    for bs, ts in row_chunks(batch, seq, vocab, chunk):
        seen[bs, ts] += 1
    assert (seen == 1).all()


def test_torch_backend_chunk_size_does_not_change_results(monkeypatch):
    import renio_kernels as rk
    from renio_kernels import config

    s, t, labels = make_inputs(batch=3, seq=6, vocab=29)
    results = []
    for chunk in (29, 29 * 4, 29 * 100):
        monkeypatch.setattr(config, "TORCH_CHUNK_ELEMENTS", chunk)
        x = s.clone().requires_grad_()
        loss = rk.renio_loss(x, t, labels, backend="torch", beta=0.5, threshold=0.1)
        loss.backward()
        results.append((loss.detach(), x.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=0)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-6, atol=1e-9)


@pytest.mark.gpu
def test_int64_offsets_past_2_31():
    """B*T*V > 2^31 elements: row offsets must be computed in int64 (Liger #251)."""
    if not HAS_CUDA or INTERPRET:
        pytest.skip("needs a CUDA GPU (the interpreter cannot show int32 overflow)")
    import renio_kernels as rk

    vocab = 32768
    rows = (2**31) // vocab + 8
    need = rows * vocab * 2 * 3  # bf16 student, teacher, gradient
    if torch.cuda.mem_get_info()[0] < need * 1.3:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    s = torch.randn(1, rows, vocab, device="cuda", dtype=torch.bfloat16)
    t = torch.randn(1, rows, vocab, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (1, rows), device="cuda")
    labels[0, : rows - 4] = -100  # only the last rows (past 2^31 elements) count
    x = s.requires_grad_()
    loss = rk.renio_loss(x, t, labels, backend="triton")
    loss.backward()
    tail = slice(rows - 4, rows)
    ref = rk.renio_loss(
        s.detach()[:, tail].float(), t[:, tail].float(), labels[:, tail], backend="torch"
    )
    torch.testing.assert_close(loss.float(), ref, rtol=2e-3, atol=1e-4)
    assert x.grad[0, : rows - 4].abs().max() == 0 and x.grad[0, tail].abs().max() > 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backward_can_write_over_the_logits_it_reads(backend):
    """``bwd(..., out=student)``: the gradient written over the logits equals the one written to
    a fresh buffer (the fused-linear sweeps use it for the chunk's logits buffer)."""
    fwd, bwd = _backends()[backend]
    s, t, labels = make_inputs(batch=2, seq=5, vocab=70, teacher_vocab=75, device=DEVICE)
    params = DivergenceParams(beta=0.5, temperature=1.3, token_clip=0.05)
    kw = {"block_v": 16} if backend == "triton" else {"chunk_elements": 70 * 3}
    stats = fwd(s, DenseTeacher(t), labels, params, with_divergence=True, store_c=True, **kw)
    gd = torch.randn(labels.shape, device=labels.device)
    fresh = bwd(s, DenseTeacher(t), labels, params, stats, gd, None, **kw)
    buffer = s.clone()
    over = bwd(buffer, DenseTeacher(t), labels, params, stats, gd, None, out=buffer, **kw)
    assert over.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(over, fresh, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_linear_sweeps_write_the_gradient_over_the_chunk_logits(monkeypatch, backend):
    import renio_kernels as rk
    from renio_kernels.ops import backends

    real = backends.resolve_backend(backend, torch.device(DEVICE))
    calls = []

    def bwd(*args, **kwargs):
        calls.append(kwargs.get("out") is args[0])
        return real.bwd(*args, **kwargs)

    spy = backends.RowBackend(real.name, real.fwd, bwd, real.divergences, bwd_in_place=True)
    monkeypatch.setattr(backends, "_triton_backend" if backend == "triton" else "_torch_backend",
                        lambda: spy)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    hs, ht = torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    ws, wt = torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g)
    labels = torch.randint(0, 40, (2, 6), generator=g)
    h = hs.requires_grad_()
    rk.fused_linear_renio_loss(h, ws, ht, wt, labels, backend=backend, chunk_size=4).backward()
    assert calls and all(calls)
