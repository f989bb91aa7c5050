"""Hostile inputs: infinities, NaN, shifts, identical models, extreme ratios."""

import pytest
import torch

import renio_kernels as rk
from renio_kernels import reference
from tests.helpers import CORE_BACKENDS, DEVICE, make_inputs, ref_loss_and_grad, rel_err

BACKENDS = CORE_BACKENDS


def loss_and_grad(backend, s, t, labels, **kw):
    x = s.detach().clone().requires_grad_()
    loss = rk.renio_loss(x, t, labels, backend=backend, **kw)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_neg_inf_teacher_logits_contribute_nothing(backend, beta):
    s, t, labels = make_inputs(ignore="none", device=DEVICE)
    t[..., 3:9] = float("-inf")
    s[0, 0, 4] = float("-inf")  # both -inf at one position
    labels[labels == 4] = 5
    loss, grad = loss_and_grad(backend, s, t, labels, beta=beta)
    (ref, ref_grad) = ref_loss_and_grad(s, t, labels, beta=beta)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert rel_err(loss, ref) < 1e-5 and rel_err(grad, ref_grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_student_logits(backend):
    """Reverse KL and JSD ignore -inf student logits; forward KL goes to +inf unless clipped."""
    s, t, labels = make_inputs(ignore="none", device=DEVICE)
    s[..., 3:9] = float("-inf")
    labels[(labels >= 3) & (labels < 9)] = 10
    for beta in (0.5, 1.0):
        loss, grad = loss_and_grad(backend, s, t, labels, beta=beta)
        ref, ref_grad = ref_loss_and_grad(s, t, labels, beta=beta)
        assert rel_err(loss, ref) < 1e-5 and rel_err(grad, ref_grad) < 1e-5
    loss, _ = loss_and_grad(backend, s, t, labels, beta=0.0)
    assert loss.item() == float("inf")
    loss, grad = loss_and_grad(backend, s, t, labels, beta=0.0, token_clip=0.05)
    ref, ref_grad = ref_loss_and_grad(s, t, labels, beta=0.0, token_clip=0.05)
    assert rel_err(loss, ref) < 1e-5 and rel_err(grad, ref_grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_neg_inf_row_is_nan(backend):
    s, t, labels = make_inputs(ignore="none", device=DEVICE)
    s[1, 2] = float("-inf")
    loss, _ = loss_and_grad(backend, s, t, labels)
    assert torch.isnan(loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_nan_propagates(backend, side, beta):
    s, t, labels = make_inputs(ignore="none", device=DEVICE)
    (s if side == "student" else t)[0, 1, 7] = float("nan")
    loss, _ = loss_and_grad(backend, s, t, labels, beta=beta, token_clip=0.05)
    assert torch.isnan(loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_ignored_row_is_harmless(backend):
    s, t, labels = make_inputs(ignore="row", device=DEVICE)
    s[0, 1] = float("nan")
    loss, grad = loss_and_grad(backend, s, t, labels)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (grad[0] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_shift_invariance(backend):
    s, t, labels = make_inputs(device=DEVICE)
    kw = {"beta": 0.5, "token_clip": 0.05, "threshold": 0.1}
    base, grad = loss_and_grad(backend, s, t, labels, **kw)
    shifted, grad_shifted = loss_and_grad(backend, s + 1e4, t - 1e4, labels, **kw)
    # fp32 logits near 1e4 carry ~1e-3 absolute rounding; the loss must stay close, not explode.
    assert abs(float(shifted) - float(base)) < 2e-3 * max(1.0, abs(float(base)))
    assert rel_err(grad_shifted, grad) < 5e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_student_equals_teacher(backend, beta):
    s, _, labels = make_inputs(device=DEVICE)
    x = s.clone().requires_grad_()
    loss, stats = rk.renio_loss(x, s, labels, beta=beta, backend=backend, return_stats=True)
    loss.backward()
    assert abs(float(loss)) < 1e-6
    assert (stats["divergence"] > -1e-6).all()
    assert x.grad.abs().max() < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_sampled_log_ratios(backend):
    """ls[x] - lt[x] = +-100: clipped before exp, weights finite."""
    s, t, labels = make_inputs(batch=3, ignore="none", device=DEVICE)
    idx = labels.unsqueeze(-1)
    s.scatter_(-1, idx, 60.0)
    t.scatter_(-1, idx, -60.0)
    s[2].scatter_(-1, idx[2], -60.0)
    t[2].scatter_(-1, idx[2], 60.0)
    for norm in ("batch_mean", "clamp", "none"):
        x = s.clone().requires_grad_()
        loss, stats = rk.renio_loss(
            x, t, labels, backend=backend, weight_norm=norm, threshold=-200.0, return_stats=True
        )
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        assert torch.isfinite(stats["weights"]).all()
        assert stats["log_ratio"].max() <= 2.5 and stats["log_ratio"].min() < -60
        ref = reference.renio_loss(
            s.double(), t.double(), labels, weight_norm=norm, threshold=-200.0
        )
        assert rel_err(loss, ref) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_ratio_clip_none(backend):
    s, t, labels = make_inputs(device=DEVICE)
    _, stats = rk.renio_loss(s, t, labels, backend=backend, ratio_clip=None, return_stats=True)
    (_, ref_stats), _ = ref_loss_and_grad(s, t, labels, ratio_clip=None, return_stats=True)
    torch.testing.assert_close(
        stats["log_ratio"].double(), ref_stats["log_ratio"], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_out_of_range_label_poisons(backend):
    s, t, labels = make_inputs(ignore="none", device=DEVICE)
    labels[0, 0] = 10_000
    loss = rk.renio_loss(s, t, labels, backend=backend, check_labels=False)
    assert torch.isnan(loss)
