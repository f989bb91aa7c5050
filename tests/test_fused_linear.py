"""Fused-linear ReNIO loss against the float64 reference on materialized logits."""

from __future__ import annotations

import pytest
import torch

import renio_kernels as rk
from renio_kernels import reference
from renio_kernels.core import autograd
from renio_kernels.ops import gemm
from renio_kernels.ops import linear as linear_chunks
from renio_kernels.ops.linear import plan_chunk_rows
from tests.helpers import INTERPRET, LINEAR_GRAD_RTOL, LOSS_RTOL, rel_err

IGNORE = -100


def make_linear(
    batch=2,
    seq=7,
    hs=6,
    ht=9,
    vocab=37,
    teacher_vocab=41,
    bias=True,
    dtype=torch.float32,
    ignore="some",
    seed=0,
):
    """Student/teacher hidden states and lm_head weights whose logits are correlated.

    The teacher's hidden state starts with the student's and its weight with a noisy copy of the
    student's, so its logits are about ``0.7 * student + noise`` and some sampled tokens cross the
    ReNIO threshold. ``Hs != Ht`` and ``Vt > Vs`` by default.
    """
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(batch, seq, hs, generator=g)
    w_s = torch.randn(vocab, hs, generator=g) * (2.0 / hs**0.5)
    h_t = torch.randn(batch, seq, ht, generator=g)
    h_t[..., :hs] = h_s
    w_t = torch.randn(teacher_vocab, ht, generator=g) * (1.0 / ht**0.5)
    w_t[:vocab, :hs] += 0.7 * w_s
    b_s = torch.randn(vocab, generator=g) * 0.5 if bias else None
    b_t = torch.randn(teacher_vocab, generator=g) * 0.5 if bias else None
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    if ignore == "some":
        labels[0, :2] = IGNORE
        labels[-1, -1] = IGNORE
    elif ignore == "all":
        labels[:] = IGNORE
    cast = [None if x is None else x.to(dtype) for x in (h_s, w_s, b_s, h_t, w_t, b_t)]
    return (*cast, labels)


def ref_fused(h_s, w_s, b_s, h_t, w_t, b_t, labels, combine=lambda x: x, **kw):
    """float64 reference: materialize both logits, reference.renio_loss, backprop ``combine``."""
    s64 = [None if x is None else x.detach().double().requires_grad_() for x in (h_s, w_s, b_s)]
    logits_s = s64[0] @ s64[1].T + (0 if s64[2] is None else s64[2])
    logits_t = h_t.detach().double() @ w_t.detach().double().T
    if b_t is not None:
        logits_t = logits_t + b_t.detach().double()
    out = reference.renio_loss(logits_s, logits_t, labels, **kw)
    loss = out[0] if isinstance(out, tuple) else out
    combine(loss).backward()
    return out, [None if x is None else x.grad for x in s64]


def run_fused(h_s, w_s, b_s, h_t, w_t, b_t, labels, combine=lambda x: x, want=(1, 1, 1), **kw):
    """The fused loss on leaf copies (``want`` says which require grad) and their gradients."""
    leaves = [
        None if x is None else x.detach().clone().requires_grad_(bool(w))
        for x, w in zip((h_s, w_s, b_s), want, strict=True)
    ]
    out = rk.fused_linear_renio_loss(
        leaves[0], leaves[1], h_t, w_t, labels, student_bias=leaves[2], teacher_bias=b_t, **kw
    )
    loss = out[0] if isinstance(out, tuple) else out
    if loss.requires_grad:
        combine(loss).backward()
    return out, [None if x is None else x.grad for x in leaves]


def assert_close(out, grads, ref_out, ref_grads, dtype=torch.float32):
    loss = (out[0] if isinstance(out, tuple) else out).detach()
    ref_loss = (ref_out[0] if isinstance(ref_out, tuple) else ref_out).detach()
    assert loss.dtype == torch.float32
    assert abs(float(loss) - float(ref_loss)) <= LOSS_RTOL[dtype] * abs(float(ref_loss)) + 1e-7
    for g, ref in zip(grads, ref_grads, strict=True):
        if ref is None:
            continue
        assert g is not None
        assert torch.isfinite(g).all()
        assert rel_err(g, ref) <= LINEAR_GRAD_RTOL[dtype], rel_err(g, ref)


def _combine(x):
    # A non-trivial grad_output: the loss scaled and fed through a second term.
    return 1.7 * x + 0.3 * x * x


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("token_clip", [None, 0.05])
@pytest.mark.parametrize("bias", [False, True])
def test_parity_fp32(beta, token_clip, bias):
    inputs = make_linear(bias=bias)
    kw = dict(beta=beta, token_clip=token_clip, temperature=1.3)
    # chunk_size=3 with T=7: chunks cross sequence boundaries and split sequences.
    out, grads = run_fused(*inputs, combine=_combine, backend="torch", chunk_size=3, **kw)
    ref_out, ref_grads = ref_fused(*inputs, combine=_combine, **kw)
    assert_close(out, grads, ref_out, ref_grads)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("weight_norm", ["batch_mean", "ema"])
def test_parity_without_renio_weights(beta, weight_norm):
    """use_renio=False takes the one-sweep path; stats and the ema state still match."""
    inputs = make_linear()
    kw = dict(beta=beta, token_clip=0.05, use_renio=False, weight_norm=weight_norm)
    state = torch.full((), 0.7, dtype=torch.float64)
    out, grads = run_fused(
        *inputs, combine=_combine, backend="torch", chunk_size=4, return_stats=True,
        ema_state=state, **kw,
    )  # fmt: skip
    ref_out, ref_grads = ref_fused(
        *inputs, combine=_combine, return_stats=True, ema_mean=torch.tensor(0.7), **kw
    )
    assert_close(out, grads, ref_out, ref_grads)
    torch.testing.assert_close(out[1]["weights"].double(), ref_out[1]["weights"])
    if weight_norm == "ema":
        expected = 0.1 * ref_out[1]["batch_mean_e"] + 0.9 * 0.7
        torch.testing.assert_close(state, expected.to(state.dtype))


def test_stats_match_logits_loss():
    """Weights, divergences and ratios are those of renio_loss on the materialized logits."""
    h_s, w_s, b_s, h_t, w_t, b_t, labels = make_linear(batch=4, seq=5)
    loss, stats = rk.fused_linear_renio_loss(
        h_s, w_s, h_t, w_t, labels, student_bias=b_s, teacher_bias=b_t, return_stats=True,
        backend="torch", chunk_size=6,
    )  # fmt: skip
    ref_loss, ref_stats = rk.renio_loss(
        h_s @ w_s.T + b_s, h_t @ w_t.T + b_t, labels, return_stats=True, backend="torch"
    )
    torch.testing.assert_close(loss, ref_loss)
    assert ref_stats["selected"].any(), "inputs should select some pivotal tokens"
    for key in ("weights", "divergence", "log_ratio"):
        torch.testing.assert_close(stats[key], ref_stats[key], rtol=1e-5, atol=1e-6)
    assert torch.equal(stats["selected"], ref_stats["selected"])


@pytest.mark.parametrize("chunk_size", [None, 1, 5, 13, 100])
def test_chunk_size_does_not_change_result(chunk_size):
    inputs = make_linear(batch=3, seq=5)
    out, grads = run_fused(*inputs, backend="torch", chunk_size=chunk_size, beta=0.5)
    base, base_grads = run_fused(*inputs, backend="torch", chunk_size=15, beta=0.5)
    torch.testing.assert_close(out, base)
    for g, b in zip(grads, base_grads, strict=True):
        torch.testing.assert_close(g, b)


@pytest.mark.parametrize("use_renio", [True, False])
def test_fully_ignored_batch(use_renio):
    inputs = make_linear(ignore="all")
    out, grads = run_fused(*inputs, backend="torch", chunk_size=4, use_renio=use_renio)
    assert float(out) == 0.0
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


def test_positive_ignore_index():
    h_s, w_s, b_s, h_t, w_t, b_t, labels = make_linear(ignore="none")
    labels[1, 2:4] = 5
    kw = dict(ignore_index=5, beta=0.5)
    out, grads = run_fused(h_s, w_s, b_s, h_t, w_t, b_t, labels, backend="torch", **kw)
    ref_out, ref_grads = ref_fused(h_s, w_s, b_s, h_t, w_t, b_t, labels, **kw)
    assert_close(out, grads, ref_out, ref_grads)


class _Spy:
    """Counts the chunk logits and the matmul work, and records which gradient buffers the
    forward formed."""

    def __init__(self, monkeypatch):
        self.logits_calls = 0
        self.work = 0  # multiply-adds of every (rows x vocab x hidden) matmul
        self.allocated = []
        logits, sweep = gemm.LinearSide.logits, linear_chunks.forward_sweep
        mm, addmm = gemm.Gemm.mm, gemm.Gemm.addmm_

        def counting_logits(side, r0, r1, *a):
            self.logits_calls += 1
            return logits(side, r0, r1, *a)

        def counting_mm(gemm, a, b, *args, **kw):
            self.work += a.shape[0] * a.shape[1] * b.shape[1]
            return mm(gemm, a, b, *args, **kw)

        def counting_addmm(gemm, c, a, b, **kw):
            self.work += a.shape[0] * a.shape[1] * b.shape[1]
            return addmm(gemm, c, a, b, **kw)

        def recording_sweep(*args):
            out, grads = sweep(*args)
            if grads is not None:
                self.allocated.append(
                    tuple(x is not None for x in (grads.hidden, grads.weight, grads.bias))
                )
            return out, grads

        monkeypatch.setattr(gemm.LinearSide, "logits", counting_logits)
        monkeypatch.setattr(gemm.Gemm, "mm", counting_mm)
        monkeypatch.setattr(gemm.Gemm, "addmm_", counting_addmm)
        monkeypatch.setattr(autograd, "forward_sweep", recording_sweep)

    def passes(self, tokens: int, vocab: int, hidden: int) -> float:
        return self.work / (tokens * vocab * hidden)


@pytest.mark.parametrize("want", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 0, 0)])
@pytest.mark.parametrize("use_renio", [True, False])
def test_requires_grad_combinations(monkeypatch, want, use_renio):
    spy = _Spy(monkeypatch)
    inputs = make_linear(ht=6)  # Hs = Ht: every pass has the same size
    kw = dict(beta=0.5, token_clip=0.05, use_renio=use_renio)
    out, grads = run_fused(*inputs, want=want, backend="torch", chunk_size=4, **kw)
    ref_out, ref_grads = ref_fused(*inputs, **kw)
    for g, w in zip(grads, want, strict=True):
        assert (g is not None) == bool(w)
    ref_grads = [r if w else None for r, w in zip(ref_grads, want, strict=True)]
    assert_close(out, grads, ref_out, ref_grads)
    chunks = 4  # 14 tokens in chunks of 4
    # Both sides' logits once per chunk, in the forward only, whatever is wanted: no recompute.
    assert spy.logits_calls == 2 * chunks
    # The forward forms exactly the wanted gradients; the backward only scales them.
    assert spy.allocated == ([tuple(bool(w) for w in want)] if any(want) else [])
    if not any(want):
        assert not out.requires_grad
    # Matmul passes: two logits, plus grad_hidden and grad_weight when wanted (bias: no matmul).
    assert spy.passes(14, 37, 6) == 2 + want[0] + want[1]


@pytest.mark.parametrize("use_renio", [True, False])
def test_no_grad_forward(monkeypatch, use_renio):
    spy = _Spy(monkeypatch)
    h_s, w_s, b_s, h_t, w_t, b_t, labels = make_linear()
    h_s.requires_grad_()
    w_s.requires_grad_()
    with torch.no_grad():
        loss = rk.fused_linear_renio_loss(
            h_s, w_s, h_t, w_t, labels, student_bias=b_s, teacher_bias=b_t,
            use_renio=use_renio, backend="torch",
        )  # fmt: skip
    assert not loss.requires_grad and loss.grad_fn is None
    assert spy.allocated == []
    ref_out, _ = ref_fused(h_s, w_s, b_s, h_t, w_t, b_t, labels, use_renio=use_renio)
    assert abs(float(loss) - float(ref_out)) <= 1e-5 * abs(float(ref_out))


def test_two_backwards_accumulate():
    """The one-sweep path returns new tensors, so a second backward adds the same gradient."""
    for use_renio in (True, False):
        h_s, w_s, b_s, h_t, w_t, b_t, labels = make_linear()
        w_s.requires_grad_()
        loss = rk.fused_linear_renio_loss(
            h_s, w_s, h_t, w_t, labels, use_renio=use_renio, backend="torch", chunk_size=5
        )
        loss.backward(retain_graph=True)
        first = w_s.grad.clone()
        loss.backward()
        torch.testing.assert_close(w_s.grad, 2 * first)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("use_renio", [True, False])
def test_low_precision_torch_backend(dtype, use_renio):
    inputs = make_linear(dtype=dtype)
    kw = dict(beta=0.5, token_clip=0.05, use_renio=use_renio)
    out, grads = run_fused(*inputs, combine=_combine, backend="torch", chunk_size=4, **kw)
    ref_out, ref_grads = ref_fused(*inputs, combine=_combine, **kw)
    assert_close(out, grads, ref_out, ref_grads, dtype=dtype)
    for g in grads:
        assert g.dtype == dtype


def test_logits_are_not_rounded_to_bf16():
    """bf16 operands, fp32 logits: large logits whose bf16 rounding would move the loss."""
    h_s, w_s, b_s, h_t, w_t, b_t, labels = make_linear(bias=False, ignore="none")
    h_s, w_s, h_t, w_t = (x.mul(6.0).bfloat16() for x in (h_s, w_s, h_t, w_t))
    out, _ = run_fused(h_s, w_s, None, h_t, w_t, None, labels, backend="torch")
    ref_out, _ = ref_fused(h_s, w_s, None, h_t, w_t, None, labels)
    rounded = rk.renio_loss(
        (h_s @ w_s.T).float(), (h_t @ w_t.T).float(), labels, backend="torch"
    )  # what an unfused bf16 lm_head would give
    err = abs(float(out) - float(ref_out))
    assert err <= 1e-5 * abs(float(ref_out))
    assert abs(float(rounded) - float(ref_out)) > 10 * err


def test_mixed_dtypes_and_autocast():
    """bf16 hidden states (as autocast produces) with an fp32 weight; autocast is switched off."""
    h_s, w_s, b_s, h_t, w_t, b_t, labels = make_linear()
    h_s, h_t = h_s.bfloat16(), h_t.bfloat16()
    out, grads = run_fused(h_s, w_s, b_s, h_t, w_t, b_t, labels, backend="torch")
    ref_out, ref_grads = ref_fused(h_s, w_s, b_s, h_t, w_t, b_t, labels)
    assert_close(out, grads, ref_out, ref_grads, dtype=torch.bfloat16)
    assert grads[0].dtype == torch.bfloat16 and grads[1].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under, grads_under = run_fused(h_s, w_s, b_s, h_t, w_t, b_t, labels, backend="torch")
    torch.testing.assert_close(under, out)
    for g, b in zip(grads_under, grads, strict=True):
        torch.testing.assert_close(g, b)


def test_strided_hidden_states():
    h_s, w_s, b_s, h_t, w_t, b_t, labels = make_linear()
    base, base_grads = run_fused(h_s, w_s, b_s, h_t, w_t, b_t, labels, backend="torch")
    # A (T, B, H) buffer seen as (B, T, H), and a slice that drops the last position.
    h_s_t = h_s.transpose(0, 1).contiguous().transpose(0, 1)
    h_t_long = torch.cat([h_t, torch.randn(2, 1, h_t.shape[2])], dim=1)[:, :-1]
    w_t_cols = torch.cat([w_t, torch.zeros(w_t.shape[0], 3)], dim=1)[:, : w_t.shape[1]]
    assert not h_s_t.is_contiguous() and not h_t_long.is_contiguous()
    out, grads = run_fused(h_s_t, w_s, b_s, h_t_long, w_t_cols, b_t, labels, backend="torch")
    torch.testing.assert_close(out, base)
    for g, b in zip(grads, base_grads, strict=True):
        torch.testing.assert_close(g, b)


def test_inputs_unchanged():
    inputs = make_linear()
    copies = [None if x is None else x.clone() for x in inputs]
    run_fused(*inputs, backend="torch", chunk_size=4)
    run_fused(*inputs, backend="torch", chunk_size=4, use_renio=False)
    for x, c in zip(inputs, copies, strict=True):
        assert x is None or torch.equal(x, c)


@pytest.mark.triton
@pytest.mark.skipif(not INTERPRET, reason="CPU tensors reach Triton only under its interpreter")
@pytest.mark.parametrize("use_renio", [True, False])
def test_triton_backend_interpreter(use_renio):
    inputs = make_linear(batch=2, seq=3, hs=4, ht=5, vocab=19, teacher_vocab=23)
    kw = dict(beta=0.5, token_clip=0.05, use_renio=use_renio)
    out, grads = run_fused(*inputs, combine=_combine, backend="triton", chunk_size=4, **kw)
    ref_out, ref_grads = ref_fused(*inputs, combine=_combine, **kw)
    assert_close(out, grads, ref_out, ref_grads)


def test_plan_chunk_rows():
    cpu = torch.device("cpu")
    # On CPU the chunk buffers get what the per-vocabulary total leaves after the two (V, H) fp32
    # accumulators.
    budget = (rk.config.FUSED_LINEAR_TOTAL_PER_VOCAB["cpu"] - 2 * 256) * 151936
    for n_rows in (4096, 4097, 100_000):
        rows = plan_chunk_rows(n_rows, 151936, 256, 256, cpu)
        assert 16 <= rows and rows * (3 * 151936 + 512) <= budget
        n_chunks = -(-n_rows // rows)
        assert n_rows - (n_chunks - 1) * rows >= rows - n_chunks  # balanced last chunk
    assert plan_chunk_rows(10, 151936, 256, 256, cpu) == 10
    assert plan_chunk_rows(4096, 10**8, 256, 256, cpu) == 16  # floor of FUSED_LINEAR_MIN_ROWS
    assert plan_chunk_rows(4096, 151936, 256, 256, cpu, chunk_size=7) == 7
    assert plan_chunk_rows(5, 151936, 256, 256, cpu, chunk_size=70) == 5


def _bad(**changes):
    h_s, w_s, b_s, h_t, w_t, b_t, labels = make_linear()
    args = dict(
        student_hidden=h_s, student_weight=w_s, teacher_hidden=h_t, teacher_weight=w_t,
        labels=labels, student_bias=b_s, teacher_bias=b_t,
    )  # fmt: skip
    args.update(changes)
    return args


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (
            lambda a: {"student_hidden": a["student_hidden"][0]},
            r"student_hidden must be \(B, T, H\)",
        ),
        (lambda a: {"student_weight": a["student_weight"].T}, "not its transpose"),
        (
            lambda a: {"teacher_weight": a["teacher_weight"][:, :-1]},
            r"teacher_weight must be \(V, H\)",
        ),
        (lambda a: {"student_bias": a["student_bias"][:-1]}, r"student_bias must be \(V,\)"),
        (lambda a: {"teacher_bias": a["teacher_bias"][None]}, r"teacher_bias must be \(V,\)"),
        (
            lambda a: {"teacher_weight": a["teacher_weight"][:30], "teacher_bias": None},
            "teacher vocabulary .* smaller",
        ),
        (lambda a: {"teacher_hidden": a["teacher_hidden"][:, :-1]}, "same positions"),
        (lambda a: {"student_hidden": a["student_hidden"].double()}, "supported: float32"),
        (lambda a: {"labels": a["labels"].float()}, "expected int64"),
        (lambda a: {"labels": a["labels"][:, :-1]}, "labels has shape"),
        (lambda a: {"labels": a["labels"].clamp(min=0) + 37}, r"outside \[0, 37\)"),
        (lambda a: {"teacher_weight": a["teacher_weight"].to("meta")}, "move all inputs"),
        (lambda a: {"student_weight": a["student_weight"].numpy()}, "must be a torch.Tensor"),
        (lambda a: {"chunk_size": 0}, "chunk_size must be"),
        (lambda a: {"temperature": 0.0}, "temperature must be"),
        (lambda a: {"weight_norm": "ema"}, "keeps a running mean"),
        (lambda a: {"backend": "gpu"}, "unknown backend"),
    ],
)  # fmt: skip
def test_bad_input(changes, match):
    args = _bad()
    args.update(changes(args))
    with pytest.raises(ValueError, match=match):
        rk.fused_linear_renio_loss(**args)


def test_module_ema_and_state_dict():
    """The module's ema trajectory equals ReNIOLoss's on materialized logits, and survives a
    state_dict round trip."""
    h_s, w_s, b_s, h_t, w_t, b_t, labels = make_linear(batch=3, seq=4)
    fused = rk.FusedLinearReNIOLoss(weight_norm="ema", backend="torch", chunk_size=5)
    logits = rk.ReNIOLoss(weight_norm="ema", backend="torch")
    for step in range(2):
        w = w_s * (1.0 + 0.1 * step)
        got = fused(h_s, w, h_t, w_t, labels, b_s, b_t)
        want = logits(h_s @ w.T + b_s, h_t @ w_t.T + b_t, labels)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(fused.ema_mean, logits.ema_mean)
    assert torch.isfinite(fused.ema_mean)
    restored = rk.FusedLinearReNIOLoss(weight_norm="ema", backend="torch")
    restored.load_state_dict(fused.state_dict())
    torch.testing.assert_close(restored.ema_mean, fused.ema_mean)
    restored.eval()
    before = restored.ema_mean.clone()
    again = restored(h_s, w_s, h_t, w_t, labels, b_s, b_t)
    assert torch.equal(restored.ema_mean, before)  # eval: used, not advanced
    torch.testing.assert_close(again, fused.eval()(h_s, w_s, h_t, w_t, labels, b_s, b_t))
    assert "chunk_size=5" in repr(fused)


def test_hugging_face_recipe():
    """The docs' recipe: decoder hidden states and lm_head weights of two HF models."""
    transformers = pytest.importorskip("transformers")

    def tiny(vocab, width, seed):
        torch.manual_seed(seed)
        cfg = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        )  # fmt: skip
        return transformers.LlamaForCausalLM(cfg)

    student, teacher = tiny(50, 16, 0), tiny(56, 24, 1)  # padded teacher vocabulary, Ht != Hs
    input_ids = torch.randint(0, 50, (2, 9))
    labels = input_ids[:, 1:].clone()
    labels[:, :3] = IGNORE  # the prompt
    with torch.no_grad():
        t_hidden = teacher.get_decoder()(input_ids).last_hidden_state
    s_hidden = student.get_decoder()(input_ids).last_hidden_state
    lm_head = student.get_output_embeddings()
    loss = rk.fused_linear_renio_loss(
        s_hidden[:, :-1], lm_head.weight, t_hidden[:, :-1],
        teacher.get_output_embeddings().weight, labels, token_clip=0.05, chunk_size=5,
    )  # fmt: skip
    loss.backward()
    grad = lm_head.weight.grad.clone()
    student.zero_grad()
    with torch.no_grad():
        t_logits = teacher(input_ids).logits[:, :-1]
    ref = rk.renio_loss(
        student(input_ids).logits[:, :-1], t_logits, labels, token_clip=0.05, backend="torch"
    )
    ref.backward()
    torch.testing.assert_close(loss, ref)
    assert rel_err(grad, lm_head.weight.grad) <= 1e-5


def test_single_token_and_nan_propagation():
    inputs = make_linear(batch=1, seq=1, ignore="none")
    out, grads = run_fused(*inputs, backend="torch", beta=0.5)
    ref_out, ref_grads = ref_fused(*inputs, beta=0.5)
    assert_close(out, grads, ref_out, ref_grads)
    h_s, w_s, b_s, h_t, w_t, b_t, labels = make_linear(ignore="none")
    h_s[1, 3, 0] = float("nan")
    loss = rk.fused_linear_renio_loss(h_s, w_s, h_t, w_t, labels, backend="torch")
    assert torch.isnan(loss)


def test_teacher_in_another_dtype():
    """A bf16 teacher with an fp32 student: each side's logits are fp32."""
    h_s, w_s, b_s, h_t, w_t, b_t, labels = make_linear()
    h_t, w_t, b_t = h_t.bfloat16(), w_t.bfloat16(), b_t.bfloat16()
    out, grads = run_fused(h_s, w_s, b_s, h_t, w_t, b_t, labels, backend="torch", chunk_size=4)
    ref_out, ref_grads = ref_fused(h_s, w_s, b_s, h_t, w_t, b_t, labels)
    assert_close(out, grads, ref_out, ref_grads)


def test_sharded_dtensor_weight_is_rejected(tmp_path):
    """An FSDP2-style sharded lm_head must not silently score a slice of the vocabulary."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import renio_kernels as rk

    if not dist.is_available():
        pytest.skip("torch built without distributed")
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        w = distribute_tensor(torch.randn(11, 8), mesh, [Shard(0)])
        h = torch.randn(2, 3, 8)
        labels = torch.randint(0, 11, (2, 3))
        with pytest.raises(ValueError, match="student_weight is a sharded DTensor"):
            rk.fused_linear_renio_loss(h, w, h, torch.randn(11, 8), labels, backend="torch")
    finally:
        if created:
            dist.destroy_process_group()
