"""``top_k``: the divergence over the teacher's top-k columns, both sides renormalized there,
against the float64 reference, on every backend; the tie rule; ``top_k >= Vs``."""

import pytest
import torch

import renio_kernels as rk
from renio_kernels import ReNIOOptions, reference
from renio_kernels.ops.sparse import select_top_k
from tests.helpers import (
    CORE_BACKENDS,
    DEVICE,
    TRITON_DTYPES,
    assert_compiled_matches_eager,
    assert_parity,
    make_inputs,
    ref_loss_and_grad,
)

KW = {"threshold": 0.1}
DIVERGENCES = [
    {"beta": 0.0},
    {"beta": 1.0},
    {"beta": 0.5},
    {"divergence": "tvd"},
]


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    from renio_kernels import config

    monkeypatch.setattr(config, "TRITON", config.TritonConfig(block_v=16, interpret_block_v=16))


def run(backend, s, t, labels, grad_scale=-2.5, **kw):
    s = s.detach().clone().requires_grad_()
    loss, stats = rk.renio_loss(s, t, labels, backend=backend, return_stats=True, **kw)
    (loss * grad_scale).backward()
    return loss, stats, s.grad


def check(backend, dtype=torch.float32, inputs=None, grad_scale=-2.5, **kw):
    s, t, labels = inputs or make_inputs(dtype=dtype, device=DEVICE, teacher_vocab=41)
    kw = {**KW, **kw}
    (ref, ref_stats), ref_grad = ref_loss_and_grad(
        s, t, labels, grad_scale=grad_scale, return_stats=True, **kw
    )
    loss, stats, grad = run(backend, s, t, labels, grad_scale=grad_scale, **kw)
    assert_parity(loss, grad, ref, ref_grad, s.dtype)
    assert torch.equal(stats["selected"].cpu(), ref_stats["selected"])
    return loss, grad


@pytest.mark.parametrize("backend", CORE_BACKENDS)
@pytest.mark.parametrize("div", DIVERGENCES, ids=lambda d: next(iter(d.values())).__str__())
@pytest.mark.parametrize("token_clip", [None, 0.05])
@pytest.mark.parametrize("top_k", [3, 36])
def test_parity(backend, div, token_clip, top_k):
    check(backend, top_k=top_k, token_clip=token_clip, **div)


@pytest.mark.parametrize("backend", CORE_BACKENDS)
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
def test_dtypes_and_temperature(backend, dtype):
    check(backend, dtype=dtype, top_k=5, beta=0.5, temperature=0.7, token_clip=0.05)


@pytest.mark.parametrize("backend", CORE_BACKENDS)
def test_ignored_rows(backend):
    check(backend, inputs=make_inputs(ignore="row", device=DEVICE), top_k=4)
    s, t, labels = make_inputs(ignore="all", device=DEVICE)
    loss, _, grad = run(backend, s, t, labels, top_k=4)
    assert float(loss.detach()) == 0.0 and not grad.any()


@pytest.mark.parametrize("backend", CORE_BACKENDS)
def test_gradient_is_nonzero_at_exactly_k_columns(backend):
    s, t, labels = make_inputs(device=DEVICE, teacher_vocab=41)
    _, _, grad = run(backend, s, t, labels, top_k=6, use_renio=False)
    nonzero = (grad != 0).sum(-1)
    valid = labels != -100
    assert torch.equal(nonzero[valid], torch.full_like(nonzero[valid], 6))
    assert not nonzero[~valid].any()
    ids = select_top_k(t, s.shape[-1], 6)
    assert torch.equal((grad != 0)[valid], torch.zeros_like(grad, dtype=torch.bool).scatter_(
        -1, ids, True)[valid])  # fmt: skip


def test_k1_has_no_divergence():
    """One column renormalized is probability 1 on both sides: d = 0, no gradient."""
    s, t, labels = make_inputs(device=DEVICE)
    loss, _, grad = run("torch", s, t, labels, top_k=1)
    assert float(loss.detach()) == 0.0 and not grad.any()


@pytest.mark.parametrize("backend", CORE_BACKENDS)
@pytest.mark.parametrize("top_k", [37, 38, 1000])
def test_top_k_at_least_vocab_is_the_full_loss(backend, top_k):
    """``top_k >= Vs`` (37 here) is the dense loss: the same kernels, bit for bit."""
    s, t, labels = make_inputs(device=DEVICE, teacher_vocab=41)
    full = run(backend, s, t, labels, beta=0.5, token_clip=0.05)
    top = run(backend, s, t, labels, beta=0.5, token_clip=0.05, top_k=top_k)
    assert torch.equal(full[0], top[0]) and torch.equal(full[2], top[2])


def test_reference_top_k_at_vocab_is_the_reference_full_loss():
    s, t, labels = make_inputs(teacher_vocab=41)
    s, t = s.double(), t.double()
    full = reference.renio_loss(s, t, labels, beta=0.5)
    assert torch.equal(reference.renio_loss(s, t, labels, beta=0.5, top_k=37), full)
    # The sparse machinery at k = Vs - 1 against the reference, and the reference at k = Vs - 1
    # differs from the full loss (the subset is really used).
    assert float(reference.renio_loss(s, t, labels, beta=0.5, top_k=36)) != float(full)


def test_padded_teacher_columns_are_never_selected():
    s, t, labels = make_inputs(device=DEVICE, teacher_vocab=41)
    t[..., 37:] = 100.0
    check("torch", inputs=(s, t, labels), top_k=4)
    assert int(select_top_k(t, 37, 4).max()) < 37


def _ordered_ids(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(x.double(), dim=-1, descending=True, stable=True).indices[..., :k]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tie_rule_lower_column_first(dtype):
    """Among equal teacher logits the lower column id is selected (a stable descending sort),
    including -0.0 == +0.0, -inf, negative values and rows of one repeated value."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-3, 4, (3, 5, 29), generator=g).to(dtype) * 0.5
    x[0, 0] = 1.0  # every column tied
    x[0, 1, ::2] = -0.0
    x[0, 1, 1::2] = 0.0
    x[1, 2, :10] = float("-inf")
    x[2, 3] = -torch.arange(29, dtype=dtype)  # strictly decreasing negatives
    x[2, 4, 3] = float("nan")
    x[1, 4, 5] = -float("nan")
    for k in (1, 4, 13, 28):
        for exact in (True, False):  # the GPU's and the CPU's implementation of the one rule
            got = select_top_k(x, 29, k, exact_keys=exact)
            nan_rows = torch.isnan(x).any(-1)
            assert torch.equal(got[~nan_rows], _ordered_ids(x, k)[~nan_rows]), (k, exact)
            assert torch.equal(got, select_top_k(x, 29, k, exact_keys=not exact))
            assert torch.equal(got, select_top_k(x, 29, k, chunk_elements=40, exact_keys=exact))
    assert torch.equal(select_top_k(x, 29, 3)[0, 0], torch.tensor([0, 1, 2]))
    assert torch.equal(reference.top_k_ids(x.double(), 29, 3)[0, 0], torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("backend", CORE_BACKENDS)
def test_ties_in_the_loss(backend):
    """Quantized teacher logits, so the k-th value is tied: every backend picks the reference's
    columns (the loss depends on which tied column is in)."""
    s, t, labels = make_inputs(device=DEVICE)
    t = (t * 2).round() / 2
    check(backend, inputs=(s, t, labels), top_k=5, beta=0.5)


def test_option_validation():
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="top_k must be None .* or an int >= 1"):
            ReNIOOptions(top_k=bad)
    assert ReNIOOptions(top_k=3).top_k == 3
    s, t, labels = make_inputs()
    with pytest.raises(ValueError, match="top_k must be None"):
        rk.renio_loss(s, t, labels, top_k=0)


def test_module_and_second_backward():
    s, t, labels = make_inputs(device=DEVICE)
    x = s.clone().requires_grad_()
    loss = rk.ReNIOLoss(top_k=4, beta=0.5)(x, t, labels)
    assert torch.equal(loss, rk.renio_loss(s, t, labels, top_k=4, beta=0.5))
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first)


def test_compiled_equals_eager():
    """The top-k path runs eagerly inside a compiled function (one graph break)."""
    s, t, labels = make_inputs(device=DEVICE)

    def fn(x):
        return rk.renio_loss(x, t, labels, top_k=4, beta=0.5, token_clip=0.05, threshold=0.1)

    assert_compiled_matches_eager(fn, s)


def test_inf_teacher_logits_and_views():
    """``-inf`` teacher logits (no mass) among the top-k contribute nothing; strided views are
    read in place."""
    s, t, labels = make_inputs(device=DEVICE, seq=6, teacher_vocab=41)
    t[..., 3:] = float("-inf")  # 3 finite columns, k = 5
    check("auto", inputs=(s, t, labels), top_k=5, beta=0.5)
    s, t, labels = make_inputs(device=DEVICE, seq=6, teacher_vocab=41)
    check("auto", inputs=(s[:, :-1], t[:, :-1], labels[:, :-1]), top_k=5)


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_nan_outside_the_top_k_is_not_hidden(side):
    s, t, labels = make_inputs(device=DEVICE, teacher_vocab=41)
    x = s if side == "student" else t
    x[1, 2] = -50.0  # far below the row's top-k
    x[1, 2, 0] = float("nan")
    # A NaN teacher logit sorts by its sign bit (here first, so it is selected); a NaN
    # student logit outside the ids reaches the loss through the log-normalizer.
    assert torch.isnan(rk.renio_loss(s, t, labels, top_k=4))
    assert torch.isnan(reference.renio_loss(s.double(), t.double(), labels, top_k=4))


def test_training_script_flags():
    """``--top-k-loss`` (alias ``--top_k_loss``, the paper trainer's) is the loss's; ``--top-k``
    stays the sampler's."""
    from renio_kernels.train import config

    cfg = config.parse_config(["--top-k-loss", "5", "--top-k", "3"])
    assert config.loss_options(cfg).top_k == 5 and cfg.top_k == 3
    assert config.loss_options(config.parse_config(["--top_k_loss", "7"])).top_k == 7
    assert config.loss_options(config.parse_config(["--top-k-loss", "none"])).top_k is None


def test_top_k_at_least_vocab_compiles_without_graph_breaks():
    """``top_k >= Vs`` is decided at trace time: the dense custom ops, ``fullgraph=True``."""
    s, t, labels = make_inputs(device=DEVICE)

    def fn(x):
        return rk.renio_loss(x, t, labels, top_k=37, backend="torch")

    torch._dynamo.reset()
    x = s.clone().requires_grad_()
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, fn(s), rtol=1e-6, atol=1e-7)
