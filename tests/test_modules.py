"""ReNIOLoss / SampledReverseKLLoss modules: options, the ema state, state_dict round trips."""

import pytest
import torch

import renio_kernels as rk
from renio_kernels import reference
from tests.helpers import CORE_BACKENDS, DEVICE, make_inputs, rel_err


@pytest.mark.parametrize("backend", CORE_BACKENDS)
def test_ema_across_calls_matches_reference(backend):
    module = rk.ReNIOLoss(weight_norm="ema", threshold=0.1, backend=backend)
    ema_ref = None
    for step in range(3):
        s, t, labels = make_inputs(seed=step, device=DEVICE)
        x = s.clone().requires_grad_()
        loss = module(x, t, labels)
        loss.backward()
        ref, stats = reference.renio_loss(
            s.double(), t.double(), labels, weight_norm="ema", threshold=0.1,
            ema_mean=ema_ref, return_stats=True,
        )  # fmt: skip
        assert rel_err(loss, ref) < 1e-5
        mean_e = stats["batch_mean_e"]
        ema_ref = mean_e if ema_ref is None else 0.1 * mean_e + 0.9 * ema_ref
        torch.testing.assert_close(module.ema_mean.double(), ema_ref, rtol=1e-5, atol=0)


def test_ema_state_dict_round_trip_and_eval_mode():
    a = rk.ReNIOLoss(weight_norm="ema", threshold=0.1, backend="torch")
    assert torch.isnan(a.ema_mean)
    for seed in range(2):
        a(*make_inputs(seed=seed))
    b = rk.ReNIOLoss(weight_norm="ema", threshold=0.1, backend="torch")
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.ema_mean, a.ema_mean)
    inputs = make_inputs(seed=9)
    torch.testing.assert_close(a(*inputs), b(*inputs))
    torch.testing.assert_close(b.ema_mean, a.ema_mean)
    # eval(): the running mean is used but not advanced.
    before = b.ema_mean.clone()
    b.eval()
    b(*make_inputs(seed=10))
    torch.testing.assert_close(b.ema_mean, before)


def test_functional_ema_state_advances_in_place():
    state = torch.full((), float("nan"))
    s, t, labels = make_inputs()
    rk.renio_loss(s, t, labels, weight_norm="ema", ema_state=state, backend="torch")
    assert torch.isfinite(state)


def test_module_matches_functional_and_returns_stats():
    s, t, labels = make_inputs()
    kw = {"beta": 0.5, "token_clip": 0.05, "temperature": 1.5, "threshold": 0.1}
    module = rk.ReNIOLoss(**kw, backend="torch", return_stats=True)
    loss, stats = module(s, t, labels)
    torch.testing.assert_close(loss, rk.renio_loss(s, t, labels, backend="torch", **kw))
    assert set(stats) == {"weights", "divergence", "log_ratio", "selected"}
    assert "beta=0.5" in repr(module)


def test_sampled_reverse_kl_module():
    s, t, labels = make_inputs()
    module = rk.SampledReverseKLLoss(temperature=1.3, backend="torch")
    torch.testing.assert_close(
        module(s, t, labels),
        rk.sampled_reverse_kl_loss(s, t, labels, temperature=1.3, backend="torch"),
    )


def test_training_step():
    """The README's usage: a module's logits, a teacher's logits, one optimizer step."""
    torch.manual_seed(0)
    vocab, hidden = 50, 16
    student = torch.nn.Sequential(torch.nn.Embedding(vocab, hidden), torch.nn.Linear(hidden, vocab))
    teacher = torch.nn.Sequential(torch.nn.Embedding(vocab, hidden), torch.nn.Linear(hidden, vocab))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    loss_fn = rk.ReNIOLoss(beta=0.5, token_clip=0.05, backend="torch")
    ids = torch.randint(0, vocab, (4, 12))
    labels = ids[:, 1:].clone()
    labels[:, :3] = -100
    losses = []
    for _ in range(5):
        with torch.no_grad():
            t_logits = teacher(ids)[:, :-1]
        loss = loss_fn(student(ids)[:, :-1], t_logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
