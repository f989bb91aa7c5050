"""Inputs that used to give a silently wrong number now give the right one or a clear error."""

import pytest
import torch

import renio_kernels as rk
from tests.helpers import CORE_BACKENDS, DEVICE, make_inputs
from tests.test_fused_linear import make_linear


@pytest.mark.parametrize("backend", CORE_BACKENDS)
def test_double_backward_is_a_clear_error(backend):
    s, t, labels = make_inputs(device=DEVICE)
    x = s.clone().requires_grad_()
    loss = rk.renio_loss(x, t, labels, backend=backend, beta=0.5)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(loss, x, create_graph=True)
    # A plain backward of the same graph still works afterwards.
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all()


def test_double_backward_fused_linear_is_a_clear_error():
    h_s, w_s, b_s, h_t, w_t, b_t, labels = make_linear()
    for use_renio in (True, False):
        h = h_s.clone().requires_grad_()
        loss = rk.fused_linear_renio_loss(h, w_s, h_t, w_t, labels, use_renio=use_renio)
        with pytest.raises(RuntimeError, match="double backward is not supported"):
            torch.autograd.grad(loss, h, create_graph=True)


@pytest.mark.parametrize("name", ["temperature", "weight_temperature"])
def test_temperatures_whose_reciprocal_overflows_are_rejected(name):
    s, t, labels = make_inputs()
    with pytest.raises(ValueError, match=f"{name} must be >= 2.94e-39"):
        rk.renio_loss(s, t, labels, **{name: 1e-45})
    rk.renio_loss(s, t, labels, **{name: 1e-3})  # small but representable: fine


@pytest.mark.parametrize(
    ("state", "match"),
    [
        (torch.zeros((), dtype=torch.int64), "0-dim floating-point tensor.*torch.int64"),
        (0.5, "0-dim floating-point tensor.*got float"),
        (torch.zeros(1), "got a 1-dim torch.float32 tensor"),
    ],
)
def test_ema_state_must_be_a_float_scalar_tensor(state, match):
    s, t, labels = make_inputs()
    with pytest.raises(ValueError, match=match):
        rk.renio_loss(s, t, labels, weight_norm="ema", ema_state=state)


def _bad(kind: str, x: torch.Tensor) -> torch.Tensor:
    if kind == "sparse":
        return x.to_sparse()
    return torch.nested.nested_tensor(list(x.unbind(0)))


@pytest.mark.parametrize("kind", ["sparse", "nested"])
@pytest.mark.parametrize("arg", [0, 1, 2])
def test_sparse_and_nested_inputs_name_the_argument(kind, arg):
    inputs = list(make_inputs())
    name = ("student_logits", "teacher_logits", "labels")[arg]
    inputs[arg] = _bad(kind, inputs[arg])
    match = f"{name} is a nested tensor" if kind == "nested" else f"{name} is a torch.sparse_coo"
    with pytest.raises(ValueError, match=match):
        rk.renio_loss(*inputs)


def test_meta_labels_with_check_labels_say_how_to_skip_the_check():
    s, t, labels = (x.to("meta") for x in make_inputs())
    with pytest.raises(ValueError, match="labels is on the meta device.*check_labels=False"):
        rk.renio_loss(s, t, labels)


def test_fused_linear_bad_weights_and_hidden_sizes():
    h_s, w_s, b_s, h_t, w_t, b_t, labels = make_linear()
    with pytest.raises(ValueError, match="student_weight is a torch.sparse_coo tensor"):
        rk.fused_linear_renio_loss(h_s, w_s.to_sparse(), h_t, w_t, labels)
    with pytest.raises(ValueError, match="student_hidden has hidden size 0"):
        rk.fused_linear_renio_loss(h_s[..., :0], w_s[:, :0], h_t, w_t, labels)


@pytest.mark.parametrize("backend", CORE_BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("offset", [1e5, -3e4])
def test_a_constant_on_the_logits_costs_no_digits(backend, beta, offset):
    """Softmax is shift-invariant; the kernels' log-probabilities are too, to fp32 rounding of
    the shifted values (they are formed as ``(x - anchor) - lse``, not ``x - (max + log z)``)."""
    from tests.helpers import LOSS_RTOL, ref_loss_and_grad, rel_err

    s, t, labels = make_inputs(batch=3, seq=5, vocab=300, device=DEVICE, seed=1)
    s, t = s + offset, t + offset  # exactly representable shifts of the fp32 inputs
    kw = dict(beta=beta, threshold=0.1, token_clip=0.05)
    ref, ref_grad = ref_loss_and_grad(s, t, labels, grad_scale=1.7, **kw)
    x = s.clone().requires_grad_()
    (1.7 * rk.renio_loss(x, t, labels, backend=backend, **kw)).backward()
    loss = rk.renio_loss(s, t, labels, backend=backend, **kw)
    assert rel_err(loss, ref) <= LOSS_RTOL[torch.float32]
    assert rel_err(x.grad, ref_grad) <= 1e-5


def test_fused_linear_shift_of_the_logits_through_the_bias():
    h_s, w_s, b_s, h_t, w_t, b_t, labels = make_linear(vocab=300, teacher_vocab=300)
    b_s, b_t = b_s + 1e5, b_t + 1e5
    logits_s = (h_s @ w_s.T + b_s).detach()
    logits_t = h_t @ w_t.T + b_t
    for use_renio in (True, False):
        fused = rk.fused_linear_renio_loss(
            h_s, w_s, h_t, w_t, labels, student_bias=b_s, teacher_bias=b_t, use_renio=use_renio
        )
        ref = rk.reference.renio_loss(
            logits_s.double(), logits_t.double(), labels, use_renio=use_renio
        )
        assert abs(fused.item() - ref.item()) <= 1e-5 * abs(ref.item())


@pytest.mark.parametrize("backend", CORE_BACKENDS)
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_digits_match_a_plain_mixture_implementation(backend, beta):
    """fp32 per-token generalized JSD within 2x the mean error of plain PyTorch's mixture formula
    on the same inputs, and its worst token within 3x (the log of the mixture is taken in
    probability space; a log-add-exp of ``ls + log(1 - beta)`` and ``lt + log(beta)`` cost about
    4x)."""
    from renio_kernels.ops.backends import resolve_backend
    from renio_kernels.ops.rows import DenseTeacher, DivergenceParams

    g = torch.Generator().manual_seed(0)
    s, t = (torch.randn(2, 32, 2048, generator=g) * 2 for _ in range(2))
    labels = torch.randint(0, 2048, (2, 32), generator=g)
    ref = rk.reference.per_token(s.double(), t.double(), labels, beta=beta)[0]

    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    ps, pt = ls.exp(), lt.exp()
    log_m = ((1 - beta) * ps + beta * pt).log()
    plain = (beta * pt * (lt - log_m) + (1 - beta) * ps * (ls - log_m)).sum(-1)
    plain_err = (plain.double() - ref).abs() / ref

    kernels = resolve_backend(backend, s.device, "jsd")
    stats = kernels.fwd(
        s.to(DEVICE), DenseTeacher(t.to(DEVICE)), labels.to(DEVICE), DivergenceParams(beta=beta),
        with_divergence=True, store_c=False,
    )  # fmt: skip
    err = (stats.d.double().cpu() - ref).abs() / ref
    assert err.mean() <= 2 * plain_err.mean(), (err.mean(), plain_err.mean())
    assert err.max() <= 3 * plain_err.max(), (err.max(), plain_err.max())


@pytest.mark.parametrize("backend", CORE_BACKENDS)
def test_jsd_where_both_probabilities_are_subnormal(backend):
    """Wide logits: tokens whose probabilities are subnormal on both sides (ls ~ -116,
    lt ~ -104). Their JSD terms are ~1e-46; a mixture formed in probability space underflows to
    0 there and turned them into inf (then clamped to the token clip)."""
    from tests.helpers import ref_loss_and_grad, rel_err

    vocab = 300
    s = torch.linspace(0, 120, vocab).repeat(2, 3, 1)
    t = 0.9 * s + torch.randn(2, 3, vocab, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, vocab, (2, 3), generator=torch.Generator().manual_seed(1))
    kw = dict(beta=0.5, token_clip=0.05, use_renio=False)
    ref, ref_grad = ref_loss_and_grad(s, t, labels, **kw)
    x = s.to(DEVICE).requires_grad_()
    loss = rk.renio_loss(x, t.to(DEVICE), labels.to(DEVICE), backend=backend, **kw)
    loss.backward()
    assert rel_err(loss, ref) <= 1e-5, (loss.item(), ref.item())
    assert rel_err(x.grad, ref_grad) <= 1e-5


def test_batch_mean_over_one_sequence_warns_that_renio_is_off():
    s, t, labels = make_inputs(batch=1)
    with pytest.warns(UserWarning, match="holds one sequence here, so its weight is exactly 1"):
        rk.renio_loss(s, t, labels)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rk.renio_loss(s, t, labels, weight_norm="none")
        rk.renio_loss(s, t, labels, use_renio=False)
        rk.renio_loss(*make_inputs(batch=2))
