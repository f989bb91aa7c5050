"""The fused-linear schedule: every gradient formed in the forward, four matmul passes.

Parity against the float64 reference on materialized logits for the cases the schedule has to
get right (sequence factors known only when a sequence closes, sequences spanning chunks,
``batch_mean``'s cap, factors outside fp32's range, every ``weight_norm``), on every backend, and
the matmul work itself counted so that a return to a recompute in the backward fails.
"""

from __future__ import annotations

import pytest
import torch

import renio_kernels as rk
from renio_kernels.core import autograd
from renio_kernels.ops import gemm
from renio_kernels.ops import linear as linear_chunks
from renio_kernels.ops.backends import resolve_backend
from tests.helpers import INTERPRET
from tests.test_fused_linear import _combine, _Spy, assert_close, make_linear, ref_fused, run_fused

NORMS = ("batch_mean", "clamp", "none", "ema")


def _confident(batch=12, seq=4, seed=0, ht=9):
    """A teacher close to the student, except on sequence 0, where the student is far more
    confident: with ``threshold=2`` and ``weight_temperature=0.5`` only sequence 0 has selected
    tokens, ``e = (e^5, 1, ..., 1)`` and its batch_mean weight ``12 e^5 / (e^5 + 11) > 10`` is
    capped at 10."""
    h_s, w_s, b_s, h_t, w_t, b_t, labels = make_linear(batch=batch, seq=seq, seed=seed, ht=ht)
    g = torch.Generator().manual_seed(seed + 1)
    vocab, width = w_s.shape
    w_t = 0.05 * torch.randn(w_t.shape, generator=g)
    w_t[:vocab, :width] += w_s
    b_t = 0.05 * torch.randn(b_t.shape, generator=g)
    b_t[:vocab] += b_s
    h_s[0] *= 4.0
    h_t[0] = 0.0
    labels[0] = (h_s[0] @ w_s.T + b_s).argmax(-1)
    return h_s, w_s, b_s, h_t, w_t, b_t, labels


CAPPED = dict(threshold=2.0, weight_temperature=0.5, beta=0.5, token_clip=0.05)


def _cpu_available() -> bool:
    try:
        resolve_backend("cpu", torch.device("cpu"))
    except ValueError:
        return False
    return True


def _backends():
    out = ["torch"]
    if _cpu_available():
        out.append("cpu")
    if INTERPRET:
        out.append(pytest.param("triton", marks=pytest.mark.triton))
    return out


def _small_chunks(monkeypatch, rows: int) -> None:
    """The automatic plan with at most ``rows`` tokens per chunk (whatever the budget)."""
    monkeypatch.setitem(rk.config.FUSED_LINEAR_MAX_ROWS, "cpu", rows)
    monkeypatch.setattr(rk.config, "FUSED_LINEAR_MIN_ROWS", 1)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("norm", NORMS)
def test_every_weight_norm_with_split_sequences(backend, norm):
    """T = 7 in chunks of 3: every chunk boundary splits a sequence, and sequences close in
    the middle of chunks."""
    small = backend == "triton"
    inputs = make_linear(batch=3 if small else 4, seq=7, hs=5, ht=8, vocab=19 if small else 37,
                         teacher_vocab=23 if small else 41)  # fmt: skip
    kw = dict(beta=0.5, token_clip=0.05, weight_norm=norm, threshold=0.1, temperature=1.3)
    state = torch.full((), 0.9, dtype=torch.float64)
    ema = dict(ema_state=state) if norm == "ema" else {}
    ref_ema = dict(ema_mean=torch.tensor(0.9, dtype=torch.float64)) if norm == "ema" else {}
    out, grads = run_fused(*inputs, combine=_combine, backend=backend, chunk_size=3, **ema, **kw)
    ref_out, ref_grads = ref_fused(*inputs, combine=_combine, **ref_ema, **kw)
    assert_close(out, grads, ref_out, ref_grads)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("seq_len, rows", [(7, 3), (3, 7), (12, 5)])
def test_automatic_plan_on_sequence_boundaries(monkeypatch, backend, seq_len, rows):
    """The automatic plan: whole sequences per chunk when they fit, else each sequence in
    pieces (the open sequence waits in G, or in the second accumulator once G holds others)."""
    _small_chunks(monkeypatch, rows)
    inputs = make_linear(batch=3, seq=seq_len, vocab=19, teacher_vocab=23)
    kw = dict(beta=0.5, threshold=0.1, weight_norm="none")
    out, grads = run_fused(*inputs, combine=_combine, backend=backend, **kw)
    ref_out, ref_grads = ref_fused(*inputs, combine=_combine, **kw)
    assert_close(out, grads, ref_out, ref_grads)


def test_chunk_bounds():
    bounds = linear_chunks.chunk_bounds
    assert bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    # Whole sequences, balanced: 6 sequences of 3, at most 3 per chunk.
    assert bounds(18, 10, 3) == [(0, 9), (9, 18)]
    assert bounds(12, 7, 3) == [(0, 6), (6, 12)]
    # Longer sequences in balanced pieces, never crossing a sequence boundary.
    assert bounds(20, 4, 10) == [(0, 4), (4, 8), (8, 10), (10, 14), (14, 18), (18, 20)]
    assert bounds(16, 6, 8) == [(0, 4), (4, 8), (8, 12), (12, 16)]


def test_ema_across_calls():
    """The ema weights' batch-wide scalar changes from call to call; each call's gradient
    follows the state it used."""
    inputs = make_linear(batch=3, seq=5)
    kw = dict(beta=0.5, weight_norm="ema", threshold=0.1)
    state = torch.full((), float("nan"), dtype=torch.float64)
    ref_state = None
    for step in range(3):
        h_s, w_s, *rest = inputs
        w_s = w_s * (1.0 + 0.2 * step)
        out, grads = run_fused(
            h_s, w_s, *rest, backend="torch", chunk_size=4, ema_state=state, return_stats=True,
            **kw,
        )  # fmt: skip
        ref_out, ref_grads = ref_fused(h_s, w_s, *rest, ema_mean=ref_state, return_stats=True, **kw)
        assert_close(out, grads, ref_out, ref_grads)
        mean_e = ref_out[1]["batch_mean_e"]
        ref_state = mean_e if ref_state is None else 0.1 * mean_e + 0.9 * ref_state
        torch.testing.assert_close(state, ref_state.to(state.dtype))


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_capped_weights_are_corrected(monkeypatch, backend, chunk_size):
    """batch_mean with 12 sequences, one capped at 10: the backward recomputes that sequence
    (and only it) for the difference to the factor's scale."""
    inputs = _confident()
    ref_out, ref_grads = ref_fused(*inputs, combine=_combine, return_stats=True, **CAPPED)
    weights = ref_out[1]["weights"]
    assert float(weights.max()) == 10.0 and float(weights[0]) == 10.0
    sweeps = []
    real = autograd.grad_sweep
    monkeypatch.setattr(autograd, "grad_sweep", lambda *a: sweeps.append(a[-2]) or real(*a))
    out, grads = run_fused(
        *inputs, combine=_combine, backend=backend, chunk_size=chunk_size, return_stats=True,
        **CAPPED,
    )  # fmt: skip
    assert_close(out, grads, ref_out, ref_grads)
    seq = inputs[-1].shape[1]
    assert sweeps == [[(0, seq)]]


def test_capped_check_needs_more_than_ten_sequences(monkeypatch):
    """With at most 10 sequences no weight can reach the cap: no recompute, nothing saved."""
    sweeps = []
    real = autograd.grad_sweep
    monkeypatch.setattr(autograd, "grad_sweep", lambda *a: sweeps.append(1) or real(*a))
    inputs = _confident(batch=10)
    out, grads = run_fused(*inputs, combine=_combine, backend="torch", **CAPPED)
    ref_out, ref_grads = ref_fused(*inputs, combine=_combine, **CAPPED)
    assert_close(out, grads, ref_out, ref_grads)
    assert sweeps == []


@pytest.mark.parametrize("host", [True, False])
@pytest.mark.parametrize("norm, extra", [
    ("batch_mean", dict(ratio_clip=None, weight_temperature=0.02)),  # factors beyond fp32
    ("ema", dict(ratio_clip=None, weight_temperature=0.02)),
    ("batch_mean", dict(weight_temperature=0.05)),  # bounded, but by more than fp16 allows
    ("clamp", dict(weight_temperature=0.02)),
    ("batch_mean", dict()),  # the default: a bounded span, L fixed without host reads
])  # fmt: skip
def test_factor_range_and_device_scalars(monkeypatch, host, norm, extra):
    """``exp(rbar / weight_temperature)`` far outside fp32: G is kept relative to the largest
    factor. ``host=False`` runs the weighting as on a GPU (device scalars, no host read): a fixed
    reference for a bounded span, else a rescale of G per chunk."""
    monkeypatch.setattr(linear_chunks, "host_scalars", lambda device: host)
    inputs = make_linear(batch=5, seq=6)
    kw = dict(beta=0.5, threshold=0.1, weight_norm=norm, **extra)
    ema = dict(ema_state=torch.full((), float("nan"), dtype=torch.float64)) if norm == "ema" else {}
    out, grads = run_fused(*inputs, combine=_combine, backend="torch", chunk_size=4, **ema, **kw)
    ref_out, ref_grads = ref_fused(*inputs, combine=_combine, **kw)
    assert_close(out, grads, ref_out, ref_grads)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("want", [(1, 1, 1), (1, 0, 0), (0, 1, 1), (0, 1, 0), (0, 0, 1)])
@pytest.mark.parametrize("use_renio", [True, False])
def test_frozen_inputs_and_ignored_rows(backend, want, use_renio):
    """Frozen lm_head / frozen hidden states, Hs != Ht, Vt > Vs, biases, a fully ignored
    sequence, grad_output != 1."""
    inputs = make_linear(batch=3, seq=4, hs=5, ht=7, vocab=19, teacher_vocab=23)
    inputs[-1][1] = -100  # a sequence without a valid token
    kw = dict(beta=0.5, token_clip=0.05, threshold=0.1, use_renio=use_renio)
    out, grads = run_fused(
        *inputs, combine=_combine, want=want, backend=backend, chunk_size=5, **kw
    )
    ref_out, ref_grads = ref_fused(*inputs, combine=_combine, **kw)
    ref_grads = [r if w else None for r, w in zip(ref_grads, want, strict=True)]
    assert_close(out, grads, ref_out, ref_grads)
    for g, w in zip(grads, want, strict=True):
        assert (g is not None) == bool(w)
    if want[0]:
        assert (grads[0][1] == 0).all()


@pytest.mark.parametrize("backend", _backends())
def test_fully_ignored_batch_every_backend(backend):
    inputs = make_linear(batch=2, seq=3, vocab=19, teacher_vocab=23, ignore="all")
    out, grads = run_fused(*inputs, backend=backend, chunk_size=4, threshold=0.1)
    assert float(out.detach()) == 0.0
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


CASES = {
    # name: (options, wanted gradients, passes)
    "default": ({}, (1, 1, 1), 4),
    "frozen-head": ({}, (1, 0, 0), 3),
    "frozen-hidden": ({}, (0, 1, 1), 3),
    "opd": ({"use_renio": False}, (1, 1, 1), 4),
    "ema": ({"weight_norm": "ema"}, (1, 1, 0), 4),
    "clamp": ({"weight_norm": "clamp"}, (1, 1, 0), 4),
    "none": ({"weight_norm": "none", "ratio_clip": None}, (1, 1, 0), 4),
    "no-grad": ({}, (0, 0, 0), 2),
}


@pytest.mark.parametrize("chunk_size", [None, 5])
@pytest.mark.parametrize("kw, want, passes", CASES.values(), ids=CASES.keys())
def test_matmul_passes(monkeypatch, kw, want, passes, chunk_size):
    """(tokens x vocab x hidden) matmul work, forward and backward together: 4 passes for the
    default case (the floor), 3 with a frozen lm_head or frozen hidden states, never 6."""
    spy = _Spy(monkeypatch)
    batch, seq, hidden, vocab = 4, 6, 8, 29
    inputs = make_linear(batch=batch, seq=seq, hs=hidden, ht=hidden, vocab=vocab, teacher_vocab=31)
    if kw.get("weight_norm") == "ema":
        kw = dict(kw, ema_state=torch.full((), float("nan"), dtype=torch.float64))
    run_fused(*inputs, combine=_combine, want=want, backend="torch", chunk_size=chunk_size,
              threshold=0.1, **kw)  # fmt: skip
    assert spy.passes(batch * seq, vocab, hidden) == passes


def test_matmul_passes_with_a_capped_sequence(monkeypatch):
    """The capped sequence's rows cost three more passes (its logits and its weight gradient),
    the other 11 sequences nothing more."""
    spy = _Spy(monkeypatch)
    inputs = _confident(ht=6)  # Hs = Ht: passes of equal size
    h_s, w_s, *_, labels = inputs
    ref_out, _ = ref_fused(*inputs, return_stats=True, **CAPPED)
    assert float(ref_out[1]["weights"][0]) == 10.0
    run_fused(*inputs, backend="torch", **CAPPED)
    tokens, seq = labels.numel(), labels.shape[1]
    assert spy.passes(tokens, w_s.shape[0], h_s.shape[-1]) == 4 + 3 * seq / tokens


def test_single_long_sequence_needs_one_accumulator(monkeypatch):
    """One sequence over many chunks accumulates in G itself (its factor is applied as G's
    reference when it closes): no second weight-sized buffer."""
    _small_chunks(monkeypatch, 4)
    extra = []
    real_new = linear_chunks._WeightedGrads._new

    def spy_new(self, sums):
        extra.append(sums is self.extra)
        return real_new(self, sums)

    monkeypatch.setattr(linear_chunks._WeightedGrads, "_new", spy_new)
    inputs = make_linear(batch=1, seq=23, ignore="none")
    kw = dict(beta=0.5, threshold=0.1, weight_norm="none")
    out, grads = run_fused(*inputs, combine=_combine, backend="torch", **kw)
    ref_out, ref_grads = ref_fused(*inputs, combine=_combine, **kw)
    assert_close(out, grads, ref_out, ref_grads)
    assert extra and not any(extra)


COMPILE_CASES = {
    "capped": (_confident, dict(CAPPED), None),
    "ema-split": (lambda: make_linear(batch=3, seq=7), dict(weight_norm="ema", threshold=0.1), 3),
    "unbounded": (lambda: make_linear(batch=3, seq=5),
                  dict(ratio_clip=None, weight_temperature=0.05, threshold=0.1), 4),
}  # fmt: skip


@pytest.mark.parametrize("make, kw, chunk_size", COMPILE_CASES.values(), ids=COMPILE_CASES.keys())
def test_compiled_equals_eager(make, kw, chunk_size):
    h_s, w_s, b_s, h_t, w_t, b_t, labels = make()
    state = torch.full((), 0.8, dtype=torch.float64) if kw.get("weight_norm") == "ema" else None

    def fn(h, w, b):
        return rk.fused_linear_renio_loss(
            h, w, h_t, w_t, labels, student_bias=b, teacher_bias=b_t, backend="torch",
            chunk_size=chunk_size, ema_state=None if state is None else state.clone(), **kw,
        )  # fmt: skip

    def run(f):
        xs = [x.clone().requires_grad_() for x in (h_s, w_s, b_s)]
        loss = f(*xs)
        (loss * -1.7).backward()
        return [loss.detach()] + [x.grad for x in xs]

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for got, want in zip(run(compiled), run(fn), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("capped", [False, True])
def test_second_backward_recomputes(capped):
    """The first eager backward hands out the forward's weight and bias sums scaled in place; a
    second one (retain_graph) recomputes them and gets the same gradients."""
    inputs = _confident() if capped else make_linear(batch=3, seq=5)
    kw = dict(CAPPED) if capped else dict(threshold=0.1)
    h_s, w_s, b_s = (x.clone().requires_grad_() for x in inputs[:3])
    loss = rk.fused_linear_renio_loss(
        h_s, w_s, inputs[3], inputs[4], inputs[6], student_bias=b_s, teacher_bias=inputs[5],
        backend="torch", chunk_size=5, **kw,
    )  # fmt: skip
    (1.3 * loss).backward(retain_graph=True)
    first = [x.grad.clone() for x in (h_s, w_s, b_s)]
    (1.3 * loss).backward()
    for x, g in zip((h_s, w_s, b_s), first, strict=True):
        torch.testing.assert_close(x.grad, 2 * g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("onednn", [True, False])
def test_cpu_gemm_paths(monkeypatch, onednn):
    """fp32 CPU matmuls through oneDNN's linear (the default where torch has it) or torch.mm:
    the same result to fp32 rounding, both against the float64 reference."""
    monkeypatch.setattr(rk.config, "FUSED_LINEAR_CPU_ONEDNN", onednn)
    inputs = make_linear(batch=3, seq=6)
    h_s, w_s = inputs[:2]
    assert gemm.Gemm.for_operands(h_s, w_s).onednn == (onednn and gemm._onednn_linear_works())
    kw = dict(beta=0.5, token_clip=0.05, threshold=0.1)
    out, grads = run_fused(*inputs, combine=_combine, backend="torch", chunk_size=4, **kw)
    ref_out, ref_grads = ref_fused(*inputs, combine=_combine, **kw)
    assert_close(out, grads, ref_out, ref_grads)


def test_column_sliced_hidden_states(monkeypatch):
    """Hidden states whose flat rows are a view with a row stride wider than H (a column slice)
    go through the matmuls without a copy of the whole tensor, with the same result."""
    h_s, w_s, b_s, h_t, w_t, b_t, labels = make_linear(batch=2, seq=5)
    width = h_s.shape[-1]
    base, base_grads = run_fused(h_s, w_s, b_s, h_t, w_t, b_t, labels, backend="torch",
                                 chunk_size=4, threshold=0.1)  # fmt: skip
    wide = torch.cat([h_s, torch.randn(2, 5, 3)], dim=-1).requires_grad_()
    wide_t = torch.cat([h_t, torch.randn(2, 5, 2)], dim=-1)[..., : h_t.shape[-1]]
    strides = []
    real = gemm.Gemm.mm

    def spy(gemm, a, b, *args, **kw):
        strides.append(a.stride())
        return real(gemm, a, b, *args, **kw)

    monkeypatch.setattr(gemm.Gemm, "mm", spy)
    w = w_s.clone().requires_grad_()
    loss = rk.fused_linear_renio_loss(
        wide[..., :width], w, wide_t, w_t, labels, student_bias=b_s, teacher_bias=b_t,
        backend="torch", chunk_size=4, threshold=0.1,
    )  # fmt: skip
    loss.backward()
    assert (width + 3, 1) in strides  # the student's rows reached the matmul as a strided view
    torch.testing.assert_close(loss, base)
    torch.testing.assert_close(wide.grad[..., :width], base_grads[0])
    assert torch.equal(wide.grad[..., width:], torch.zeros(2, 5, 3))
    torch.testing.assert_close(w.grad, base_grads[1])
