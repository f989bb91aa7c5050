"""The oracle itself, checked against independent formulations of docs/SPEC.md."""

import math

import pytest
import torch
import torch.nn.functional as F

from renio_kernels import reference
from renio_kernels.core.reduction import sequence_weights
from tests.helpers import make_inputs


def _logps(s, t, tau=1.0):
    v = s.shape[-1]
    return torch.log_softmax(s / tau, -1), torch.log_softmax(t[..., :v] / tau, -1)


def test_forward_and_reverse_kl_match_kl_div():
    s, t, labels = make_inputs(ignore="none")
    s, t = s.double(), t.double()
    ls, lt = _logps(s, t)
    d0, _, _ = reference.per_token(s, t, labels, beta=0.0)
    d1, _, _ = reference.per_token(s, t, labels, beta=1.0)
    kl_ts = F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)
    kl_st = F.kl_div(lt, ls, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(d0, kl_ts)
    torch.testing.assert_close(d1, kl_st)


def test_jsd_matches_mixture_definition():
    s, t, labels = make_inputs(ignore="none")
    s, t = s.double(), t.double()
    ls, lt = _logps(s, t)
    beta = 0.3
    m = (1 - beta) * ls.exp() + beta * lt.exp()
    expected = beta * (lt.exp() * (lt - m.log())).sum(-1) + (1 - beta) * (
        ls.exp() * (ls - m.log())
    ).sum(-1)
    d, _, _ = reference.per_token(s, t, labels, beta=beta)
    torch.testing.assert_close(d, expected)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_spec_gradient_formula(beta, clip):
    """SPEC's closed form g_j = (c_j - ps_j C) / tau equals autograd through the oracle."""
    tau = 1.7
    s, t, labels = make_inputs(ignore="none", seed=3)
    s = s.double().requires_grad_()
    t = t.double()
    d, _, _ = reference.per_token(s, t, labels, beta=beta, temperature=tau, token_clip=clip)
    (auto,) = torch.autograd.grad(d.sum(), s)
    with torch.no_grad():
        ls, lt = _logps(s, t, tau)
        ps, pt = ls.exp(), lt.exp()
        if beta == 0.0:
            e, de = pt * (lt - ls), -pt
        elif beta == 1.0:
            e, de = ps * (ls - lt), ps * (ls - lt + 1)
        else:
            log_m = torch.log((1 - beta) * ps + beta * pt)
            e = beta * pt * (lt - log_m) + (1 - beta) * ps * (ls - log_m)
            de = (1 - beta) * ps * (ls - log_m)
        if clip:
            de = torch.where((e >= 0) & (e <= clip), de, 0.0)
        c_sum = de.sum(-1, keepdim=True)
        closed = (de - ps * c_sum) / tau
    torch.testing.assert_close(auto, closed)


def test_ratio_is_sampled_log_ratio_clipped():
    s, t, labels = make_inputs(ignore="some")
    s, t = s.double(), t.double()
    ls, lt = _logps(s, t)
    _, r, mask = reference.per_token(s, t, labels, ratio_clip=0.5)
    idx = labels.clamp(min=0).unsqueeze(-1)
    raw = (ls.gather(-1, idx) - lt.gather(-1, idx)).squeeze(-1)
    torch.testing.assert_close(r[mask], raw.clamp(max=0.5)[mask])
    assert (r[~mask] == 0).all()


def _weights(rbar_rows, norm, ema=None, wt=1.0):
    # One selected token per sequence carrying the ratio; others below the threshold.
    r = torch.tensor(rbar_rows, dtype=torch.float64).unsqueeze(-1)
    mask = torch.ones_like(r, dtype=torch.bool)
    return sequence_weights(
        r, mask, threshold=-1e9, weight_temperature=wt, weight_norm=norm, ema_mean=ema
    )


def test_weight_norms_by_hand():
    e = torch.exp(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))
    w, _, mean_e = _weights([0.0, 1.0, 2.0], "batch_mean")
    torch.testing.assert_close(w, e / e.mean())
    torch.testing.assert_close(mean_e, e.mean())
    w, _, _ = _weights([0.0, 1.0, 2.0], "none")
    torch.testing.assert_close(w, e)
    clamped = e.clamp(0.1, 10)
    w, _, _ = _weights([0.0, 1.0, 2.0], "clamp")
    torch.testing.assert_close(w, clamped / clamped.mean())
    # batch_mean caps at 10: one sequence far above the others.
    w, _, _ = _weights([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 8.0], "batch_mean")
    assert w.max() == 10.0
    # clamp bounds e to [0.1, 10] before renormalizing.
    w, _, _ = _weights([-5.0, 0.0, 5.0], "clamp")
    expected = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    torch.testing.assert_close(w, expected / expected.mean())
    # weight_temperature divides rbar.
    w, _, _ = _weights([0.0, 2.0], "none", wt=2.0)
    torch.testing.assert_close(w, torch.tensor([1.0, math.e], dtype=torch.float64))


def test_ema_first_call_and_update():
    e = torch.exp(torch.tensor([0.0, 1.0], dtype=torch.float64))
    w, _, _ = _weights([0.0, 1.0], "ema", ema=torch.tensor(float("nan")))
    torch.testing.assert_close(w, e / e.mean())
    prev = torch.tensor(3.0, dtype=torch.float64)
    w, _, _ = _weights([0.0, 1.0], "ema", ema=prev)
    torch.testing.assert_close(w, e / (0.1 * e.mean() + 0.9 * prev))


def test_selected_tokens_and_empty_selection():
    r = torch.tensor([[0.9, 0.1, 1.5], [0.2, 0.3, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    w, selected, _ = sequence_weights(r, mask, threshold=0.8, weight_norm="none")
    assert selected.tolist() == [[True, False, False], [False, False, False]]
    # Sequence 0: rbar = 0.9 (the masked 1.5 is excluded); sequence 1: empty -> rbar = 0.
    torch.testing.assert_close(w, torch.exp(torch.tensor([0.9, 0.0], dtype=torch.float64)))


def test_loss_is_weighted_mean_of_sequence_divergence():
    s, t, labels = make_inputs(ignore="some", seed=5)
    s, t = s.double(), t.double()
    loss, stats = reference.renio_loss(s, t, labels, threshold=-1.0, return_stats=True)
    d, _, mask = reference.per_token(s, t, labels)
    n = mask.sum(-1).clamp(min=1)
    torch.testing.assert_close(stats["divergence"], (d * mask).sum(-1) / n)
    torch.testing.assert_close(loss, (stats["weights"] * stats["divergence"]).mean())
    assert not torch.allclose(stats["weights"], torch.ones_like(stats["weights"]))
