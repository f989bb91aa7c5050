"""The native CPU kernel's gradient-in-the-forward path (csrc/renio_cpu_grad.cpp) and its
gradient-buffer cache (csrc/renio_cpu_pool.cpp).

``renio_loss(..., backend="cpu")`` takes this path whenever a backward can follow, so the parity
tests of test_cpu.py cover it; here: agreement with the recompute-in-backward kernels, the
fallbacks (a second backward, a gradient through ``ls[x]``), the sweep-1 overflow headroom, and
the cache's reuse and release.
"""

from __future__ import annotations

import gc

import pytest
import torch

import renio_kernels
from renio_kernels import config
from renio_kernels.core.autograd import RowStatsFunction
from renio_kernels.ops.backends import resolve_backend
from renio_kernels.ops.cpu import native as cpu
from renio_kernels.ops.rows import DenseTeacher, DivergenceParams
from tests.helpers import GRAD_RTOL, LOSS_RTOL, make_inputs, ref_loss_and_grad, rel_err
from tests.ops.test_cpu import divergence_cases, ref_loss_and_grad_for

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _extension():
    if cpu.load_extension() is None:
        pytest.skip(f"native extension unavailable: {cpu.extension_error()}")


@pytest.fixture
def recompute():
    """The recompute-in-backward kernels."""
    with config.cpu_grad_in_forward(False):
        yield


def _loss_and_grad(s, t, labels, grad_scale=1.7, **kw):
    s = s.detach().clone().requires_grad_()
    loss = renio_kernels.renio_loss(s, t, labels, backend="cpu", **kw)
    (loss * grad_scale).backward()
    return loss.detach(), s.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("divergence", "beta"), divergence_cases())
@pytest.mark.parametrize("token_clip", [None, 0.05, 0.002])
def test_recompute_path_matches_reference(recompute, dtype, divergence, beta, token_clip):
    s, t, labels = make_inputs(3, 6, 2100, teacher_vocab=2111, dtype=dtype, seed=1)
    kw = dict(divergence=divergence, beta=beta, token_clip=token_clip, temperature=1.3)
    loss, grad = _loss_and_grad(s, t, labels, **kw)
    ref, ref_grad = ref_loss_and_grad_for(s, t, labels, grad_scale=1.7, **kw)
    assert abs(loss.item() - ref.item()) <= LOSS_RTOL[dtype] * abs(ref.item()) + 1e-7
    assert rel_err(grad, ref_grad) <= GRAD_RTOL[dtype]


@pytest.mark.parametrize(("divergence", "beta"), divergence_cases())
def test_both_paths_agree(divergence, beta):
    s, t, labels = make_inputs(4, 5, 4100, seed=2)
    kw = dict(divergence=divergence, beta=beta, token_clip=0.05, temperature=0.8)
    loss_fwd, grad_fwd = _loss_and_grad(s, t, labels, **kw)
    with config.cpu_grad_in_forward(False):
        loss_bwd, grad_bwd = _loss_and_grad(s, t, labels, **kw)
    # Same math, different exps (stored and rescaled vs recomputed): a few fp32 ulps.
    assert abs(loss_fwd.item() - loss_bwd.item()) <= 1e-6 * abs(loss_bwd.item())
    assert rel_err(grad_fwd, grad_bwd) <= 2e-6


def test_a_second_backward_recomputes():
    s, t, labels = make_inputs(2, 5, 300, seed=3)
    x = s.clone().requires_grad_()
    loss = renio_kernels.renio_loss(x, t, labels, backend="cpu", token_clip=0.05)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    (2.0 * loss).backward()  # the unit gradient was handed out: recomputed from the saved logits
    _, ref_grad = ref_loss_and_grad(s, t, labels, token_clip=0.05)
    assert rel_err(first, ref_grad) <= 1e-5
    assert rel_err(x.grad, 3.0 * ref_grad) <= 1e-5


def test_a_loss_through_d_and_ls_x_falls_back():
    # A custom loss with a gradient through both outputs: the unit gradient (through d only) is
    # dropped and the recompute kernel forms both terms; compare with the torch backend.
    s, t, labels = make_inputs(3, 4, 700, seed=4)
    params = DivergenceParams(beta=0.5, token_clip=0.05)
    a, b = torch.randn(labels.shape), torch.randn(labels.shape)
    grads = []
    for name in ("cpu", "torch"):
        x = s.clone().requires_grad_()
        backend = resolve_backend(name, x.device)
        d, ls_x, _ = RowStatsFunction.apply(
            x, labels, DenseTeacher(t), params, backend, True, True, True
        )
        ((d * a).sum() + (ls_x * b).sum()).backward()
        grads.append(x.grad)
    assert rel_err(grads[0], grads[1]) <= 2e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_that_climb_past_the_exp_headroom(dtype):
    # Sweep 1 takes a tile's exps against the max of the tiles before it and redoes a tile whose
    # own max is more than 64 above that: logits climbing 100 per tile redo every tile; a late
    # spike redoes the last one; a first tile of -inf takes the next tile's max.
    vocab = 5 * 2048 + 7
    ramp = torch.linspace(0, 500, vocab)
    s = torch.stack([ramp, ramp.flip(0), torch.zeros(vocab)]).view(1, 3, vocab).clone()
    s[0, 2, -3] = 150.0
    t = 0.9 * s + torch.randn(1, 3, vocab)
    s[0, 1, :2048] = float("-inf")
    s, t = s.to(dtype), t.to(dtype)
    labels = torch.tensor([[vocab - 1, 5000, vocab - 3]])
    kw = dict(beta=0.5, token_clip=0.05)
    loss, grad = _loss_and_grad(s, t, labels, **kw)
    ref, ref_grad = ref_loss_and_grad(s, t, labels, grad_scale=1.7, **kw)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert abs(loss.item() - ref.item()) <= LOSS_RTOL[dtype] * abs(ref.item()) + 1e-7
    assert rel_err(grad, ref_grad) <= GRAD_RTOL[dtype]


def test_no_gradient_work_without_a_backward():
    s, t, labels = make_inputs(2, 4, 40000, seed=5)  # 1.3 MB gradient: a cached size
    before = renio_kernels.cpu_grad_cache_info()
    with torch.no_grad():
        renio_kernels.renio_loss(s.requires_grad_(), t, labels, backend="cpu")
    renio_kernels.renio_loss(s.detach(), t, labels, backend="cpu")  # nothing requires grad
    after = renio_kernels.cpu_grad_cache_info()
    assert (after["reuses"], after["allocations"]) == (before["reuses"], before["allocations"])


@pytest.fixture
def fresh_cache():
    was = renio_kernels.set_cpu_grad_cache(True)
    renio_kernels.empty_cpu_grad_cache()
    yield
    renio_kernels.set_cpu_grad_cache(was)


def test_cache_reuses_a_freed_gradient(fresh_cache):
    s, t, labels = make_inputs(2, 4, 40000, seed=6)
    nbytes = s.numel() * 4
    info0 = renio_kernels.cpu_grad_cache_info()
    _, g1 = _loss_and_grad(s, t, labels)
    first = g1.clone()
    ptr = g1.data_ptr()
    g1.fill_(float("nan"))  # whatever a freed buffer holds must be overwritten
    del g1
    gc.collect()
    info1 = renio_kernels.cpu_grad_cache_info()
    assert info1["cached_buffers"] == 1 and info1["cached_bytes"] >= nbytes
    assert info1["allocations"] == info0["allocations"] + 1
    _, g2 = _loss_and_grad(s, t, labels)
    info2 = renio_kernels.cpu_grad_cache_info()
    assert info2["reuses"] == info1["reuses"] + 1 and info2["cached_buffers"] == 0
    assert g2.data_ptr() == ptr and torch.equal(g2, first)
    # A second live gradient gets its own buffer.
    _, g3 = _loss_and_grad(s, t, labels)
    assert g3.data_ptr() != g2.data_ptr() and torch.equal(g3, first)
    del g2, g3
    renio_kernels.empty_cpu_grad_cache()
    assert renio_kernels.cpu_grad_cache_info()["cached_bytes"] == 0


def test_cache_holds_at_most_two_buffers(fresh_cache):
    grads = []
    for seq in (4, 5, 6):
        s, t, labels = make_inputs(2, seq, 40000, seed=seq)
        grads.append(_loss_and_grad(s, t, labels)[1])
    del grads
    gc.collect()
    info = renio_kernels.cpu_grad_cache_info()
    assert info["cached_buffers"] == 2  # the smallest was released
    assert info["cached_bytes"] == (5 + 6) * 2 * 40000 * 4


def test_cache_off(fresh_cache):
    assert renio_kernels.set_cpu_grad_cache(False) is True
    s, t, labels = make_inputs(2, 4, 40000, seed=7)
    _, g = _loss_and_grad(s, t, labels)
    _, ref_grad = ref_loss_and_grad(s, t, labels, grad_scale=1.7)
    assert rel_err(g, ref_grad) <= 1e-5
    del g
    info = renio_kernels.cpu_grad_cache_info()
    assert not info["enabled"] and info["cached_bytes"] == 0
    with pytest.raises(TypeError, match="takes a bool"):
        renio_kernels.set_cpu_grad_cache(1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("divergence", "beta"), divergence_cases())
def test_fwd_grad_launcher(dtype, divergence, beta):
    s, t, labels = make_inputs(3, 5, 70, ignore="row", dtype=dtype, seed=8)
    params = DivergenceParams(beta=beta, divergence=divergence, token_clip=0.05)
    stats, unit = cpu.renio_fwd_grad_cpu(s, DenseTeacher(t), labels, params)
    ref_stats = cpu.renio_fwd_cpu(s, DenseTeacher(t), labels, params)
    for x, y in zip(stats, ref_stats, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    ignored = labels == -100
    assert unit.dtype == dtype and unit.is_contiguous()
    assert torch.equal(unit[ignored], torch.zeros_like(unit[ignored]))
    gd = torch.randn(labels.shape)
    expected = cpu.renio_bwd_cpu(s, DenseTeacher(t), labels, params, ref_stats, gd, None)
    scaled = cpu.renio_scale_grad_cpu(unit, gd, labels, -100)
    assert scaled is unit
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert rel_err(scaled, expected) <= tol


@pytest.mark.parametrize(
    ("s_dtype", "t_dtype"),
    [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float16),
        (torch.float16, torch.bfloat16),
    ],
)
def test_mixed_dtypes_over_several_tiles(s_dtype, t_dtype):
    # One side read in place, the other staged, both with a staged last tile.
    s, t, labels = make_inputs(2, 3, 2 * 2048 + 37, teacher_vocab=2 * 2048 + 40, seed=9)
    s, t = s.to(s_dtype), t.to(t_dtype)
    kw = dict(beta=0.3, token_clip=0.05, temperature=1.2)
    loss, grad = _loss_and_grad(s, t, labels, **kw)
    ref, ref_grad = ref_loss_and_grad(s, t, labels, grad_scale=1.7, **kw)
    low = torch.float16 if torch.float16 in (s_dtype, t_dtype) else torch.bfloat16
    assert grad.dtype == s_dtype
    assert abs(loss.item() - ref.item()) <= LOSS_RTOL[low] * abs(ref.item()) + 1e-7
    assert rel_err(grad, ref_grad) <= GRAD_RTOL[s_dtype if s_dtype != torch.float32 else low]


def test_no_buffer_leak_over_100_steps(fresh_cache):
    # Each step's gradient is freed before the next step: after the first, every step reuses the
    # cached buffer, so no allocation happens and the cache never grows (CHECKLIST 7).
    s, t, labels = make_inputs(2, 4, 40000, seed=10)
    x = s.clone().requires_grad_()
    counts = []
    for _ in range(100):
        renio_kernels.renio_loss(x, t, labels, backend="cpu", token_clip=0.05).backward()
        x.grad = None
        info = renio_kernels.cpu_grad_cache_info()
        counts.append((info["allocations"], info["cached_buffers"]))
    assert counts[-1] == counts[1] and counts[-1][1] == 1


def test_the_deprecated_module_switch_still_works(monkeypatch):
    s, t, labels = make_inputs(2, 3, 500, seed=9)
    _, grad_default = _loss_and_grad(s, t, labels, token_clip=0.05)
    with config.cpu_grad_in_forward(False):
        _, grad_recompute = _loss_and_grad(s, t, labels, token_clip=0.05)
    monkeypatch.setattr(config, "CPU_GRAD_IN_FORWARD", False, raising=False)
    with pytest.warns(DeprecationWarning, match="cpu_grad_in_forward"):
        _, grad_legacy = _loss_and_grad(s, t, labels, token_clip=0.05)
    assert torch.equal(grad_legacy, grad_recompute)


def _tvd_rows_float64(s, t, labels, grad_d, temperature, token_clip):
    """Per-row TVD ``d`` and the gradient of ``sum(grad_d * d)`` in float64 (autograd; abs has
    gradient sign(x), 0 at 0, and clamp passes it on [0, clip] inclusive, as the kernels)."""
    s64 = s.detach().double().requires_grad_()
    vocab = s.shape[-1]
    ls = torch.log_softmax(s64 / temperature, dim=-1)
    lt = torch.log_softmax(t[..., :vocab].double() / temperature, dim=-1)
    e = 0.5 * (ls.exp() - lt.exp()).abs()
    if token_clip is not None:
        clamped = e > token_clip
        assert clamped.any() and not clamped.all()  # the clip gates some columns, not all
        e = e.clamp(0.0, token_clip)
    d = torch.where(labels != -100, e.sum(-1), torch.zeros((), dtype=e.dtype))
    (grad_d.double() * d).sum().backward()
    return d.detach(), s64.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("token_clip", [None, 0.002])
@pytest.mark.parametrize("vocab", [5, 2100, 4100])
@pytest.mark.parametrize("path", ["grad_in_forward", "recompute"])
def test_tvd_rows_match_float64(dtype, token_clip, vocab, path):
    # Per row, so no ReNIO weighting can hide a row: d and the gradient through d with a random
    # per-row grad_d (the scale the backward brings), on 5 columns (less than one vector), 2100
    # (a tile and a partial one) and 4100 (two tiles and 4 columns), a padded teacher, a fully
    # ignored row and a clip that is active on some of each row's columns.
    s, t, labels = make_inputs(3, 4, vocab, teacher_vocab=vocab + 9, dtype=dtype, seed=vocab)
    labels[1] = -100
    grad_d = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1))
    params = DivergenceParams(divergence="tvd", temperature=0.9, token_clip=token_clip)
    if path == "grad_in_forward":
        stats, grad = cpu.renio_fwd_grad_cpu(s, DenseTeacher(t), labels, params)
        cpu.renio_scale_grad_cpu(grad, grad_d, labels, -100)
    else:
        stats = cpu.renio_fwd_cpu(s, DenseTeacher(t), labels, params)
        grad = cpu.renio_bwd_cpu(s, DenseTeacher(t), labels, params, stats, grad_d, None)
    ref_d, ref_grad = _tvd_rows_float64(s, t, labels, grad_d, 0.9, token_clip)
    assert grad.dtype == dtype
    assert rel_err(stats.d, ref_d) <= LOSS_RTOL[dtype]
    assert rel_err(grad, ref_grad) <= GRAD_RTOL[dtype]
    assert torch.equal(grad[1], torch.zeros_like(grad[1])) and (stats.d[1] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("token_clip", [None, 0.002])
@pytest.mark.parametrize("vocab", [5, 4100])
@pytest.mark.parametrize("grad_in_forward", [True, False])
def test_tvd_loss_matches_reference(dtype, token_clip, vocab, grad_in_forward):
    # The loss end to end: ReNIO weighting, a fully ignored sequence, grad_output = 1.7.
    s, t, labels = make_inputs(3, 4, vocab, teacher_vocab=vocab + 3, dtype=dtype, seed=3)
    labels[1] = -100
    kw = dict(divergence="tvd", token_clip=token_clip, temperature=1.1)
    with config.cpu_grad_in_forward(grad_in_forward):
        loss, grad = _loss_and_grad(s, t, labels, **kw)
    ref, ref_grad = ref_loss_and_grad_for(s, t, labels, grad_scale=1.7, **kw)
    assert grad.dtype == dtype
    assert abs(loss.item() - ref.item()) <= LOSS_RTOL[dtype] * abs(ref.item()) + 1e-7
    assert rel_err(grad, ref_grad) <= GRAD_RTOL[dtype]
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))
