"""``weight_scope="global"``: the step's gradient over ranks x accumulation micro-batches equals
the gradient of one batch holding every sequence (micro_batch scope), for every weight_norm and
reduction, on the logits and the fused-linear loss; in one process and on 2 gloo processes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import renio_kernels as rk
from renio_kernels.core.reference import per_token
from tests.distributed import run_workers

NORMS = ("batch_mean", "clamp", "none", "ema")
REDUCTIONS = ("sequence_mean", "token_mean", "sum")
N_SEQ, SEQ, VOCAB, HIDDEN = 8, 5, 23, 12


def _problem(seed: int, n_seq: int = N_SEQ, capped: bool = False):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n_seq, SEQ, HIDDEN, generator=g)
    h_t = torch.randn(n_seq, SEQ, HIDDEN, generator=g)
    w_s = torch.randn(VOCAB, HIDDEN, generator=g) * 0.6
    w_t = 0.5 * torch.randn(VOCAB + 2, HIDDEN, generator=g)
    w_t[:VOCAB] += 0.8 * w_s  # a teacher close enough that some tokens are pivotal
    labels = torch.randint(0, VOCAB, (n_seq, SEQ), generator=g)
    labels[1] = -100  # a sequence without a valid token
    labels[2, :2] = -100
    if capped:
        # Sequence 0 is far more confident than the teacher everywhere (r at ratio_clip), the
        # rest agree with it (r = 0): with weight_temperature 0.5 its weight exceeds the cap.
        h_t = h_s.clone()
        w_t = torch.cat((w_s, torch.zeros(2, HIDDEN)))
        labels = (h_s @ w_s.T).argmax(-1)
        h_t[0] = 0.0
    return h_s, w_s, h_t, w_t, labels


def _loss(path, h_s, w, h_t, w_t, labels, **kw):
    if path == "linear":
        return rk.fused_linear_renio_loss(h_s, w, h_t, w_t, labels, chunk_size=7, **kw)
    return rk.renio_loss(h_s @ w.T, h_t @ w_t.T, labels, backend="torch", **kw)


def _one_batch(path, prob, steps=1, **kw):
    """Gradient and loss of the last of ``steps`` optimizer steps on the whole batch."""
    ema = torch.full((), float("nan")) if kw.get("weight_norm") == "ema" else None
    for step in range(steps):
        h_s, w_s, h_t, w_t, labels = prob(step)
        w = w_s.clone().requires_grad_()
        loss = _loss(path, h_s, w, h_t, w_t, labels, ema_state=ema, **kw)
        loss.backward()
    return w.grad, loss.detach()


def _global_step(path, prob, rank, world, micro, steps=1, **kw):
    """The same steps split over ``world`` ranks x ``micro`` micro-batches, global scope."""
    norm = rk.StepNormalizer()
    for step in range(steps):
        h_s, w_s, h_t, w_t, labels = prob(step)
        w = w_s.clone().requires_grad_()
        per_rank = labels.shape[0] // world
        for k in range(micro):
            size = per_rank // micro
            idx = slice(rank * per_rank + k * size, rank * per_rank + (k + 1) * size)
            loss = _loss(
                path, h_s[idx], w, h_t[idx], w_t, labels[idx], weight_scope="global",
                normalizer=norm, **kw,
            )  # fmt: skip
            loss.backward()
        if world > 1:  # what DDP / FSDP2 do during the backward: average over the ranks
            dist.all_reduce(w.grad)
            w.grad /= world
        result = norm.finish([w])
    return w.grad, result


def _close(x, ref, msg=""):
    """Equal within fp32 rounding of the sums: elementwise, relative to the tensor's scale."""
    atol = 1e-6 * float(ref.abs().max())
    torch.testing.assert_close(x, ref, rtol=2e-5, atol=atol, msg=msg)


def _check_all_cases(rank, world, micro):
    for path in ("logits", "linear"):
        for weight_norm in NORMS:
            for reduction in REDUCTIONS:
                kw = dict(beta=0.5, weight_norm=weight_norm, reduction=reduction)
                steps = 2 if weight_norm == "ema" else 1
                grad, result = _global_step(path, _problem, rank, world, micro, steps, **kw)
                ref_grad, ref_loss = _one_batch(path, _problem, steps, **kw)
                where = f"{path} {weight_norm} {reduction} world={world} micro={micro}"
                _close(grad, ref_grad, where)
                torch.testing.assert_close(
                    result.loss.float(), ref_loss, rtol=2e-5, atol=1e-7, msg=where
                )


@pytest.mark.parametrize("micro", [1, 2, 4])
def test_accumulation_equals_one_batch(micro):
    _check_all_cases(0, 1, micro)


def _worker_cases(rank, world):
    _check_all_cases(rank, world, micro=2)
    _check_all_cases(rank, world, micro=1)
    _check_cap(rank, world)


def test_two_ranks_two_micro_batches_equal_one_batch():
    run_workers(_worker_cases, 2)


def _capped_problem(step):
    return _problem(seed=5, n_seq=16, capped=True)


def _expected_capped(path, micro_batches, **kw):
    """The documented semantics: ``w_b = min(f_b, 10 M_k) / M`` with ``M_k`` the mean factor of
    sequence b's micro-batch (over all ranks) and ``M`` the step's; float64, plain autograd."""
    h_s, w_s, h_t, w_t, labels = _capped_problem(0)
    w = w_s.double().requires_grad_()
    d, r, mask = per_token(h_s.double() @ w.T, (h_t @ w_t.T).double(), labels, beta=0.5)
    weights = rk.reference.sequence_weights(r, mask, weight_norm="none", weight_temperature=0.5)
    f = weights[0]
    cap = torch.empty_like(f)
    for idx in micro_batches:
        cap[idx] = 10 * f[idx].mean()
    wts = torch.minimum(f, cap) / f.mean()
    loss = (wts * d.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    loss.backward()
    return w.grad.float(), wts


def _check_cap(rank, world):
    kw = dict(beta=0.5, weight_temperature=0.5)
    for path in ("logits", "linear"):
        # One micro-batch per rank: the cap over the whole step, exactly the one-batch loss.
        grad, _ = _global_step(path, _capped_problem, rank, world, 1, **kw)
        ref_grad, _ = _one_batch(path, _capped_problem, **kw)
        _, stats = _loss(path, *_capped_problem(0), return_stats=True, **kw)
        assert stats["weights"][0] == 10.0  # the cap binds
        _close(grad, ref_grad)
        # Two micro-batches per rank: capped against each micro-batch's mean over all ranks.
        grad, _ = _global_step(path, _capped_problem, rank, world, 2, **kw)
        per_rank, size = 16 // world, 16 // world // 2
        micro = [
            [r * per_rank + k * size + i for r in range(world) for i in range(size)]
            for k in range(2)
        ]
        expected, wts = _expected_capped(path, micro)
        assert wts[0] > 10.0  # its micro-batch's cap does not bind where the step's would
        _close(grad, expected)


def test_cap_in_one_process():
    _check_cap(0, 1)


def test_step_result_and_provisional_loss():
    norm = rk.StepNormalizer()
    h_s, w_s, h_t, w_t, labels = _problem(0)
    w = w_s.clone().requires_grad_()
    first = _loss("logits", h_s[:4], w, h_t[:4], w_t, labels[:4], weight_scope="global",
                  normalizer=norm)  # fmt: skip
    # The first micro-batch's loss is that batch's own (micro_batch scope) loss.
    torch.testing.assert_close(first, _loss("logits", h_s[:4], w, h_t[:4], w_t, labels[:4]))
    first.backward()
    assert norm.pending and norm.micro_batches == 1
    result = norm.finish([w])
    assert not norm.pending
    assert result.grad_scale.item() == 1.0 and result.sequences.item() == 4
    assert result.tokens.item() == (labels[:4] != -100).sum().item()


def test_module_global_scope_and_eval_mode():
    h_s, w_s, h_t, w_t, labels = _problem(0)
    module = rk.FusedLinearReNIOLoss(weight_scope="global", weight_norm="ema", chunk_size=5)
    w = w_s.clone().requires_grad_()
    for half in (slice(0, 4), slice(4, 8)):
        module(h_s[half], w, h_t[half], w_t, labels[half]).backward()
    result = module.finish([w])
    ref_grad, ref_loss = _one_batch("linear", _problem, weight_norm="ema")
    _close(w.grad, ref_grad)
    torch.testing.assert_close(result.loss.float(), ref_loss, rtol=2e-5, atol=1e-7)
    assert torch.isfinite(module.ema_mean)  # the running mean lives in the module's buffer
    saved = module.ema_mean.clone()
    module.eval()
    with torch.no_grad():  # eval: the per-batch loss, the step and the running mean untouched
        module(h_s, w_s, h_t, w_t, labels)
    assert not module.normalizer.pending and torch.equal(module.ema_mean, saved)
    fresh = rk.FusedLinearReNIOLoss(weight_scope="global", weight_norm="ema")
    fresh.load_state_dict(module.state_dict())
    assert torch.equal(fresh.normalizer.ema_mean, saved)


def test_errors_say_how_to_fix_the_call():
    h_s, w_s, h_t, w_t, labels = _problem(0)
    s, t = h_s @ w_s.T, h_t @ w_t.T
    with pytest.raises(ValueError, match=r"needs normalizer=renio_kernels.StepNormalizer\(\)"):
        rk.renio_loss(s, t, labels, weight_scope="global")
    with pytest.raises(ValueError, match="normalizer= is used only with weight_scope='global'"):
        rk.renio_loss(s, t, labels, normalizer=rk.StepNormalizer())
    ema = torch.full((), float("nan"))
    with pytest.raises(ValueError, match="lives in the StepNormalizer"):
        rk.renio_loss(s, t, labels, weight_scope="global", weight_norm="ema", ema_state=ema,
                      normalizer=rk.StepNormalizer())  # fmt: skip
    with pytest.raises(RuntimeError, match="before any loss with weight_scope='global'"):
        rk.StepNormalizer().finish([])
    norm = rk.StepNormalizer()
    rk.renio_loss(s, t, labels, weight_scope="global", normalizer=norm)
    with pytest.raises(ValueError, match="options changed within one optimizer step"):
        rk.renio_loss(s, t, labels, weight_scope="global", normalizer=norm, beta=1.0)
    with pytest.raises(RuntimeError, match="built with weight_scope='micro_batch'"):
        rk.ReNIOLoss().finish([])
    with pytest.raises(ValueError, match="unknown weight_scope 'all'"):
        rk.ReNIOLoss(weight_scope="all")


def test_global_scope_under_torch_compile():
    """The normalizer's bookkeeping runs eagerly (a graph break); the numbers are the eager ones."""
    h_s, w_s, h_t, w_t, labels = _problem(0)

    def run(compiled):
        norm = rk.StepNormalizer()
        w = w_s.clone().requires_grad_()

        def step(hs, w, ht, y):
            return rk.renio_loss(hs @ w.T, ht @ w_t.T, y, weight_scope="global", normalizer=norm)

        fn = torch.compile(step, backend="aot_eager", dynamic=False) if compiled else step
        for half in (slice(0, 4), slice(4, 8)):
            fn(h_s[half], w, h_t[half], labels[half]).backward()
        return w.grad, norm.finish([w]).loss

    (grad, loss), (grad_c, loss_c) = run(False), run(True)
    _close(grad_c, grad)
    torch.testing.assert_close(loss_c, loss)


@pytest.mark.parametrize("path", ["logits", "linear"])
def test_top_k_under_the_global_scope(path):
    """The top-k path ends in the same reduction: accumulation == one batch there too."""
    for weight_norm in ("batch_mean", "ema"):
        kw = dict(beta=0.5, weight_norm=weight_norm, top_k=5, reduction="token_mean")
        steps = 2 if weight_norm == "ema" else 1
        grad, result = _global_step(path, _problem, 0, 1, 2, steps, **kw)
        ref_grad, ref_loss = _one_batch(path, _problem, steps, **kw)
        _close(grad, ref_grad, f"{path} {weight_norm}")
        torch.testing.assert_close(result.loss.float(), ref_loss, rtol=2e-5, atol=1e-7)


def test_no_grad_evaluates_the_batch_and_leaves_the_step():
    """Under ``torch.no_grad()`` (an evaluation loop) the global scope is the batch passed in:
    the loss equals the per-batch loss and nothing is added to the step."""
    h_s, w_s, h_t, w_t, labels = _problem(0)
    for weight_norm in ("batch_mean", "ema"):
        norm = rk.StepNormalizer()
        norm.ema_mean.fill_(1.3)
        kw = dict(beta=0.5, weight_norm=weight_norm)
        with torch.no_grad():
            loss = _loss("logits", h_s, w_s, h_t, w_t, labels, weight_scope="global",
                         normalizer=norm, **kw)  # fmt: skip
        ema = torch.full((), 1.3, dtype=torch.float64) if weight_norm == "ema" else None
        ref = _loss("logits", h_s, w_s, h_t, w_t, labels, ema_state=ema, **kw)
        torch.testing.assert_close(loss, ref)
        assert not norm.pending and norm.ema_mean.item() == 1.3


def test_grad_output_and_two_backwards_scale_exactly():
    """``(2 * loss).backward()`` per micro-batch doubles the step's gradient; the rescale is a
    factor on whatever was accumulated."""
    grads = []
    for scale in (1.0, 2.0):
        norm = rk.StepNormalizer()
        h_s, w_s, h_t, w_t, labels = _problem(0)
        w = w_s.clone().requires_grad_()
        for half in (slice(0, 4), slice(4, 8)):
            loss = _loss("linear", h_s[half], w, h_t[half], w_t, labels[half],
                         weight_scope="global", normalizer=norm)  # fmt: skip
            (scale * loss).backward()
        norm.finish([w])
        grads.append(w.grad)
    _close(grads[1], 2 * grads[0])
