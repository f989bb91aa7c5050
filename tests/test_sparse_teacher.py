"""``SparseTeacher`` (top-k ids and log-probs from a teacher server) through ``renio_loss``:
parity with the float64 reference for both modes on every backend, and the input checks."""

import pytest
import torch

import renio_kernels as rk
from renio_kernels import SparseTeacher, reference
from tests.helpers import (
    CORE_BACKENDS,
    DEVICE,
    TRITON_DTYPES,
    assert_compiled_matches_eager,
    assert_parity,
    make_inputs,
    rel_err,
)

KW = {"threshold": 0.1}
MODES = ["renormalized", "truncated"]
DIVERGENCES = [{"beta": 0.0}, {"beta": 1.0}, {"beta": 0.5}, {"divergence": "tvd"}]


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    from renio_kernels import config

    monkeypatch.setattr(config, "TRITON", config.TritonConfig(block_v=16, interpret_block_v=16))


def sparse_from_logits(t, labels, k, mode="renormalized", temperature=1.0, vocab=None,
                       dtype=None, ids=None, shuffle=True, seed=0):  # fmt: skip
    """What a teacher server sends: its top-k (in shuffled order) and log-probs at the loss
    temperature over the first ``vocab`` columns, and the sampled token's log-prob."""
    vocab = vocab or t.shape[-1]
    lt = torch.log_softmax(t[..., :vocab].double() / temperature, dim=-1)
    if ids is None:
        ids = torch.sort(lt, dim=-1, descending=True, stable=True).indices[..., :k]
        if shuffle:
            g = torch.Generator().manual_seed(seed)
            ids = ids[..., torch.randperm(k, generator=g)]
    idx = torch.where(labels != -100, labels, 0).unsqueeze(-1)
    dtype = dtype or t.dtype
    return SparseTeacher(
        ids.to(t.device), lt.gather(-1, ids).to(dtype).to(t.device),
        lt.gather(-1, idx).squeeze(-1).to(dtype).to(t.device), mode,
    )  # fmt: skip


def as64(teacher: SparseTeacher) -> SparseTeacher:
    return SparseTeacher(
        teacher.ids.cpu(), teacher.logprobs.double().cpu(), teacher.sampled_logprob.double().cpu(),
        teacher.mode,
    )  # fmt: skip


def run(backend, s, teacher, labels, grad_scale=-2.5, **kw):
    x = s.detach().clone().requires_grad_()
    loss, stats = rk.renio_loss(x, teacher, labels, backend=backend, return_stats=True, **kw)
    (loss * grad_scale).backward()
    return loss, stats, x.grad


def ref(s, teacher, labels, grad_scale=-2.5, **kw):
    x = s.detach().double().cpu().requires_grad_()
    loss, stats = reference.renio_loss(x, as64(teacher), labels.cpu(), return_stats=True, **kw)
    (loss * grad_scale).backward()
    return loss, stats, x.grad


def check(backend, mode, dtype=torch.float32, k=5, inputs=None, **kw):
    s, t, labels = inputs or make_inputs(dtype=dtype, device=DEVICE)
    kw = {**KW, **kw}
    teacher = sparse_from_logits(t, labels, k, mode, kw.get("temperature", 1.0))
    loss, stats, grad = run(backend, s, teacher, labels, **kw)
    want, want_stats, want_grad = ref(s, teacher, labels, **kw)
    assert_parity(loss, grad, want, want_grad, s.dtype)
    assert torch.equal(stats["selected"].cpu(), want_stats["selected"])
    return loss, grad


@pytest.mark.parametrize("backend", CORE_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("div", DIVERGENCES, ids=lambda d: str(next(iter(d.values()))))
@pytest.mark.parametrize("token_clip", [None, 0.05])
def test_parity(backend, mode, div, token_clip):
    check(backend, mode, token_clip=token_clip, **div)


@pytest.mark.parametrize("backend", CORE_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
def test_dtypes_temperature_and_k(backend, mode, dtype):
    check(backend, mode, dtype=dtype, beta=0.5, temperature=0.7, token_clip=0.05)
    check(backend, mode, dtype=dtype, k=1)
    check(backend, mode, dtype=dtype, k=37, beta=1.0)


@pytest.mark.parametrize("backend", CORE_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_ignored_rows(backend, mode):
    check(backend, mode, inputs=make_inputs(ignore="row", device=DEVICE))
    s, t, labels = make_inputs(ignore="all", device=DEVICE)
    teacher = sparse_from_logits(t, torch.zeros_like(labels), 4, mode)
    # Garbage at ignored rows is never read: out-of-range and repeated ids, NaN log-probs.
    teacher = SparseTeacher(teacher.ids * 0 - 7, teacher.logprobs * float("nan"),
                            teacher.sampled_logprob * float("nan"), mode)  # fmt: skip
    loss, _, grad = run(backend, s, teacher, labels)
    assert float(loss.detach()) == 0.0 and not grad.any()


@pytest.mark.parametrize("backend", CORE_BACKENDS)
def test_all_ids_renormalized_is_the_full_loss(backend):
    s, t, labels = make_inputs(device=DEVICE)
    teacher = sparse_from_logits(t, labels, 37, "renormalized")
    kw = dict(KW, beta=0.5, token_clip=0.05)
    sparse = run(backend, s, teacher, labels, **kw)
    full = run(backend, s, t, labels, **kw)
    torch.testing.assert_close(sparse[0], full[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sparse[2], full[2], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", CORE_BACKENDS)
def test_renormalized_top_k_equals_top_k_option(backend):
    """A renormalized sparse teacher holding the teacher's top-k is the ``top_k`` loss, and
    only uses its log-probs up to a row constant (raw ``logits / tau`` work too)."""
    s, t, labels = make_inputs(device=DEVICE)
    kw = dict(KW, beta=0.5, temperature=1.3)
    want = run(backend, s, t, labels, top_k=5, **kw)
    teacher = sparse_from_logits(t, labels, 5, temperature=1.3)
    shifted = SparseTeacher(teacher.ids, teacher.logprobs + 3.0, teacher.sampled_logprob)
    for got in (run(backend, s, teacher, labels, **kw), run(backend, s, shifted, labels, **kw)):
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", CORE_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_gradient_support(backend, mode):
    """Renormalized: exactly k non-zero columns per valid row, at the ids. Truncated: dense
    (through the student's log-normalizer)."""
    s, t, labels = make_inputs(device=DEVICE)
    teacher = sparse_from_logits(t, labels, 6, mode)
    _, _, grad = run(backend, s, teacher, labels, use_renio=False)
    valid = labels != -100
    assert not grad[~valid].any()
    at_ids = torch.zeros_like(grad, dtype=torch.bool).scatter_(-1, teacher.ids, True)
    if mode == "renormalized":
        assert torch.equal((grad != 0)[valid], at_ids[valid])
    else:
        assert (grad != 0)[valid].all()


@pytest.mark.parametrize("backend", CORE_BACKENDS)
def test_truncated_divergence_is_clamped_at_zero(backend):
    """Forward KL over a subset can be negative (the student holds more of the subset's mass
    than the teacher): then d = 0 and that row gets no gradient."""
    s, t, labels = make_inputs(device=DEVICE, ignore="none")
    teacher = sparse_from_logits(t, labels, 4, "truncated")
    low = teacher.logprobs.clone()
    low[0] -= 5.0  # sequence 0: the teacher's mass on the ids is small -> sum < 0
    teacher = SparseTeacher(teacher.ids, low, teacher.sampled_logprob, "truncated")
    loss, stats, grad = run(backend, s, teacher, labels, use_renio=False)
    want, want_stats, want_grad = ref(s, teacher, labels, use_renio=False)
    assert float(stats["divergence"][0]) == 0.0 and float(want_stats["divergence"][0]) == 0.0
    assert not grad[0].any() and grad[1].any()
    assert rel_err(loss, want) <= 1e-5 and rel_err(grad, want_grad) <= 1e-5


def test_ratio_uses_the_sampled_logprob():
    s, t, labels = make_inputs(device=DEVICE)
    teacher = sparse_from_logits(t, labels, 3)
    _, stats, _ = run("torch", s, teacher, labels, ratio_clip=None)
    _, dense_stats, _ = run("torch", s, t, labels, ratio_clip=None)
    torch.testing.assert_close(stats["log_ratio"], dense_stats["log_ratio"], rtol=0, atol=1e-6)


def test_compiled_equals_eager():
    s, t, labels = make_inputs(device=DEVICE)
    teacher = sparse_from_logits(t, labels, 4, "truncated")

    def fn(x):
        return rk.renio_loss(x, teacher, labels, beta=0.5, token_clip=0.05, threshold=0.1)

    assert_compiled_matches_eager(fn, s)


# --- input checks --------------------------------------------------------------------------------


def _bad(**changes):
    s, t, labels = make_inputs()
    teacher = sparse_from_logits(t, labels, 4)
    fields = {"ids": teacher.ids, "logprobs": teacher.logprobs,
              "sampled_logprob": teacher.sampled_logprob, "mode": teacher.mode}  # fmt: skip
    fields.update(changes)
    return s, SparseTeacher(**fields), labels


def _ids_with(value, pos=(1, 2, 0)):
    s, t, labels = make_inputs()
    ids = sparse_from_logits(t, labels, 4).ids.clone()
    ids[pos] = value if value is not None else ids[pos[0], pos[1], 1]
    return ids


BAD = {
    "id out of range": (dict(ids=_ids_with(37)), "ids contain 37, outside \\[0, Vs = 37\\)"),
    "negative id": (dict(ids=_ids_with(-1)), "ids contain -1, outside"),
    "repeated id": (dict(ids=_ids_with(None)), "repeat an id within the row at \\(b, t\\) = "),
    "NaN logprob": (dict(logprobs=torch.full((2, 5, 4), float("nan"))), "logprobs is NaN"),
    "+inf logprob": (dict(logprobs=torch.full((2, 5, 4), float("inf"))), "logprobs is NaN or"),
    "NaN sampled": (dict(sampled_logprob=torch.full((2, 5), float("nan"))), "sampled_logprob is"),
    "k mismatch": (dict(logprobs=torch.zeros(2, 5, 3)), "one log-prob per id"),
    "ids 2-dim": (dict(ids=torch.zeros(2, 5, dtype=torch.long)), "expected \\(B, T, k\\)"),
    "ids wrong positions": (dict(ids=torch.zeros(2, 4, 4, dtype=torch.long)), "\\(B, T\\) = "),
    "sampled shape": (dict(sampled_logprob=torch.zeros(2, 4)), "one per position"),
    "float ids": (dict(ids=torch.zeros(2, 5, 4)), "ids has dtype torch.float32; expected int64"),
    "int logprobs": (dict(logprobs=torch.zeros(2, 5, 4, dtype=torch.long)), "logprobs has dtype"),
    "float64 sampled": (dict(sampled_logprob=torch.zeros(2, 5, dtype=torch.float64)),
                        "sampled_logprob has dtype torch.float64"),
    "k > Vs": (dict(ids=torch.zeros(2, 5, 38, dtype=torch.long),
                    logprobs=torch.zeros(2, 5, 38)), "k = 38 ids .* 1 <= k <= Vs = 37"),
    "mode": (dict(mode="top"), "unknown SparseTeacher mode 'top'"),
    "not a tensor": (dict(ids=[[0]]), "SparseTeacher.ids must be a torch.Tensor"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_inputs(case):
    changes, match = case
    s, teacher, labels = _bad(**changes)
    with pytest.raises(ValueError, match=match):
        rk.renio_loss(s, teacher, labels)


def test_unchecked_bad_ids_give_nan():
    s, teacher, labels = _bad(ids=_ids_with(99))
    unchecked = SparseTeacher(teacher.ids, teacher.logprobs, teacher.sampled_logprob, check=False)
    assert torch.isnan(rk.renio_loss(s, unchecked, labels))


def test_misuse():
    s, teacher, labels = _bad()
    with pytest.raises(ValueError, match="a SparseTeacher already carries its k ids"):
        rk.renio_loss(s, teacher, labels, top_k=3)
    with pytest.raises(ValueError, match="sampled_reverse_kl_loss takes dense teacher logits"):
        rk.sampled_reverse_kl_loss(s, teacher, labels)
    with pytest.raises(ValueError, match="unknown backend"):
        rk.renio_loss(s, teacher, labels, backend="cuda")
    if DEVICE == "cpu":
        meta = SparseTeacher(teacher.ids.to("meta"), teacher.logprobs, teacher.sampled_logprob)
        with pytest.raises(ValueError, match="SparseTeacher.ids is on meta but labels is on cpu"):
            rk.renio_loss(s, meta, labels)


# --- hardening -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_views_offsets_and_untouched_inputs(mode):
    """Strided views are read in place; a constant on the logits changes nothing (exactly
    representable shifts of the fp32 inputs); the caller's tensors are left as they were."""
    s, t, labels = make_inputs(seq=6, device=DEVICE)
    s = (s * 1024).round() / 1024  # so that s + 1024 is exact in fp32
    teacher = sparse_from_logits(t, labels, 4, mode)
    kw = dict(KW, beta=0.5)
    base = run("torch", s, teacher, labels, **kw)
    view = SparseTeacher(teacher.ids[:, :-1], teacher.logprobs[:, :-1],
                         teacher.sampled_logprob[:, :-1], mode)  # fmt: skip
    got = run("auto", s[:, :-1], view, labels[:, :-1], **kw)
    want = ref(s[:, :-1], view, labels[:, :-1], **kw)
    assert rel_err(got[0], want[0]) <= 1e-5 and rel_err(got[2], want[2]) <= 1e-5
    shifted = run("auto", s + 1024.0, teacher, labels, **kw)
    torch.testing.assert_close(shifted[0], base[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shifted[2], base[2], rtol=1e-4, atol=1e-6)
    copies = [x.clone() for x in (s, teacher.ids, teacher.logprobs, teacher.sampled_logprob)]
    run("auto", s, teacher, labels, **kw)
    for x, c in zip((s, teacher.ids, teacher.logprobs, teacher.sampled_logprob), copies,
                    strict=True):  # fmt: skip
        assert torch.equal(x, c)


@pytest.mark.parametrize("mode", MODES)
def test_nan_inf_and_single_position(mode):
    s, t, labels = make_inputs(device=DEVICE)
    teacher = sparse_from_logits(t, labels, 4, mode)
    nan = s.clone()
    nan[1, 2, 5] = float("nan")  # a column outside the ids: the log-normalizer is NaN
    assert torch.isnan(rk.renio_loss(nan, teacher, labels))
    assert torch.isnan(reference.renio_loss(nan.double(), as64(teacher), labels))
    # A teacher id with no mass (-inf log-prob) contributes nothing, as with dense logits.
    lp = teacher.logprobs.clone()
    lp[..., -1] = float("-inf")
    no_mass = SparseTeacher(teacher.ids, lp, teacher.sampled_logprob, mode)
    got = run("auto", s, no_mass, labels, **KW)
    want = ref(s, no_mass, labels, **KW)
    assert torch.isfinite(got[0]) and rel_err(got[0], want[0]) <= 1e-5
    assert rel_err(got[2], want[2]) <= 1e-5
    one = SparseTeacher(*(x[:1, 1:2] for x in (teacher.ids, teacher.logprobs,
                                               teacher.sampled_logprob)), mode)  # fmt: skip
    got = run("auto", s[:1, 1:2], one, labels[:1, 1:2], weight_norm="none")
    want = ref(s[:1, 1:2], one, labels[:1, 1:2], weight_norm="none")
    assert rel_err(got[0], want[0]) <= 1e-5 and rel_err(got[2], want[2]) <= 1e-5


def test_no_grad_and_double_backward():
    s, t, labels = make_inputs(device=DEVICE)
    teacher = sparse_from_logits(t, labels, 4)
    with torch.no_grad():
        assert torch.isfinite(rk.renio_loss(s.requires_grad_(), teacher, labels))
    x = s.detach().clone().requires_grad_()
    loss = rk.renio_loss(x, teacher, labels)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(loss, x, create_graph=True)
