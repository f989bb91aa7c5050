"""Vocabulary-parallel loss on 2 and 4 gloo processes: parity with the unsharded ``renio_loss``
(and the float64 reference) for Megatron-style slices, DTensor ``Shard(-1)`` logits and the
fused-linear loss with sharded lm_heads; the boundary checks.

Every rank builds the full inputs from one seed and takes its slice; its gradient is compared with
the same slice of the unsharded gradient. Each world size is one spawn running every check.
"""

from __future__ import annotations

import gc
import inspect
import json
import math

import pytest
import torch
import torch.distributed as dist

import renio_kernels as rk
from renio_kernels import reference
from renio_kernels.core.options import option_fields
from renio_kernels.ops.gemm import LinearSide
from renio_kernels.vocab_parallel import (
    vocab_parallel_fused_linear_renio_loss,
    vocab_parallel_renio_loss,
)
from tests.distributed import run_workers
from tests.helpers import LOSS_RTOL, make_inputs

GRAD_SCALE = 1.7  # a non-trivial grad_output
BF16 = torch.bfloat16
# (dtype, options): each divergence, the token clip, temperature and every ReNIO option somewhere.
CASES = [
    (torch.float32, {}),
    (torch.float32, {"beta": 1.0, "token_clip": 0.05, "temperature": 1.5}),
    (
        torch.float32,
        {
            "beta": 0.5,
            "token_clip": 0.3,
            "ratio_clip": 1.0,
            "threshold": 0.2,
            "weight_norm": "clamp",
        },
    ),  # fmt: skip
    (torch.float32, {"divergence": "tvd", "token_clip": 0.02, "use_renio": False}),
    (
        torch.float32,
        {"token_clip": 0.05, "weight_norm": "none", "ignore_index": -1, "weight_temperature": 2.0},
    ),  # fmt: skip
    (torch.float32, {"beta": 0.3, "weight_norm": "ema"}),
    (BF16, {}),
    (BF16, {"beta": 0.3, "token_clip": 0.05, "temperature": 0.7}),
    (BF16, {"divergence": "tvd"}),
    (torch.float16, {"beta": 1.0, "token_clip": 0.05}),
]
# Per-rank width W and vocab_size: an odd width; a padded vocabulary (the last rank partly
# padding); with 4 ranks, a rank that holds padding only.
# Every rank builds the same full tensor: distribute_tensor need not scatter it from rank 0 (a
# collective whose pending work sometimes aborted a worker at gloo's teardown).
LOCAL = {"src_data_rank": None}
LAYOUTS = {2: [(53, None), (27, 49)], 4: [(53, None), (27, 103), (8, 20)]}


def _labels(vocab_size, ignore_index, seed):
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, vocab_size, (3, 5), generator=g)
    labels[0, :2] = ignore_index
    labels[1] = ignore_index  # a fully ignored row
    labels[2, -1] = ignore_index
    return labels


def _logits(world, width, vocab_size, dtype, ignore_index, seed):
    s, t, _ = make_inputs(batch=3, seq=5, vocab=world * width, seed=seed)
    # Padding columns hold large logits: read by mistake, they would dominate every softmax.
    s[..., vocab_size:] = 30.0
    t[..., vocab_size:] = 30.0
    return s.to(dtype), t.to(dtype), _labels(vocab_size, ignore_index, seed)


def _plain(s, t, labels, vocab_size, opts, dtype):
    """float64 reference loss and full-width gradient; with ``dtype``, plain PyTorch computing in
    that dtype (whose error bounds ours)."""
    x = s.detach()[..., :vocab_size].to(dtype).requires_grad_()
    loss = reference.renio_loss(x, t[..., :vocab_size].to(dtype), labels, **opts)
    loss.backward(torch.tensor(GRAD_SCALE, dtype=dtype))
    grad = torch.zeros(s.shape, dtype=torch.float64)
    grad[..., :vocab_size] = x.grad.double()
    return loss.detach().double(), grad


def _err(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


class Figures:
    """Max abs errors per dtype: vs the unsharded loss and vs the float64 reference."""

    def __init__(self):
        self.rows = {}

    def add(self, key, **errs):
        row = self.rows.setdefault(key, {})
        for k, v in errs.items():
            row[k] = max(row.get(k, 0.0), v)


def _check_logits(rank, world, figs: Figures, seed=0):
    for width, vocab_size in LAYOUTS[world]:
        real = vocab_size or world * width
        lo, hi = rank * width, (rank + 1) * width
        for dtype, opts in CASES:
            ii = opts.get("ignore_index", -100)
            s, t, labels = _logits(world, width, real, dtype, ii, seed)
            ema = (
                {"ema_state": torch.full((), math.nan)} if opts.get("weight_norm") == "ema" else {}
            )
            x = s[..., lo:hi].clone().requires_grad_()
            loss = vocab_parallel_renio_loss(
                x, t[..., lo:hi], labels, vocab_size=vocab_size, **opts, **ema
            )
            loss.backward(torch.tensor(GRAD_SCALE))
            full = s[..., :real].clone().requires_grad_()
            ema_u = {k: v.clone().fill_(math.nan) for k, v in ema.items()}
            loss_u = rk.renio_loss(full, t[..., :real], labels, backend="torch", **opts, **ema_u)
            loss_u.backward(torch.tensor(GRAD_SCALE))
            grad_u = torch.zeros(s.shape, dtype=dtype)
            grad_u[..., :real] = full.grad
            if ema:
                assert torch.allclose(ema["ema_state"], ema_u["ema_state"], rtol=1e-6, atol=0)
            # Every rank returns the same loss, bit for bit.
            every = [torch.zeros(()) for _ in range(world)]
            dist.all_gather(every, loss.detach())
            assert all(torch.equal(v, loss) for v in every), every
            assert x.grad.dtype == dtype and torch.all(x.grad[..., max(0, real - lo) :] == 0)
            ref, ref_grad = _plain(s, t, labels, real, opts, torch.float64)
            err_loss, err_grad = _err(loss, ref), _err(x.grad, ref_grad[..., lo:hi])
            if dtype == torch.float32:
                assert err_loss <= LOSS_RTOL[dtype] * abs(float(ref)) + 1e-7, (opts, err_loss)
                assert err_grad <= 1e-5 * float(ref_grad.abs().max()), (opts, err_grad)
            else:
                # At most twice plain PyTorch's own error at this dtype.
                plain, plain_grad = _plain(s, t, labels, real, opts, dtype)
                plain_loss, plain_grad = _err(plain, ref), _err(plain_grad, ref_grad)
                assert err_loss <= 2 * plain_loss, (opts, err_loss, plain_loss)
                assert err_grad <= 2 * plain_grad, (opts, err_grad, plain_grad)
                figs.add(f"{str(dtype).removeprefix('torch.')}_plain_pytorch",
                         loss_vs_float64=plain_loss, grad_vs_float64=plain_grad)  # fmt: skip
            figs.add(
                str(dtype).removeprefix("torch."), loss_vs_unsharded=_err(loss, loss_u),
                grad_vs_unsharded=_err(x.grad, grad_u[..., lo:hi]), loss_vs_float64=err_loss,
                grad_vs_float64=err_grad,
            )  # fmt: skip


def _check_dtensor(rank, world, figs: Figures):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    s, t, labels = _logits(world, 53, 106, torch.float32, -100, seed=3)
    s, t = s[..., :106], t[..., :106]  # 4 ranks: torch.chunk's uneven 27, 27, 27, 25 columns
    opts = {"beta": 0.5, "token_clip": 0.05, "temperature": 1.3}
    sd = distribute_tensor(s, mesh, [Shard(-1)], **LOCAL).requires_grad_()
    td = distribute_tensor(t, mesh, [Shard(-1)], **LOCAL)
    loss, stats = rk.renio_loss(sd, td, labels, return_stats=True, **opts)
    loss.backward(torch.tensor(GRAD_SCALE))
    full = s.clone().requires_grad_()
    loss_u, stats_u = rk.renio_loss(full, t, labels, backend="torch", return_stats=True, **opts)
    loss_u.backward(torch.tensor(GRAD_SCALE))
    assert sd.grad.placements == (Shard(2),)
    grad, per = sd.grad.to_local(), -(-106 // world)
    grad_u = full.grad[..., rank * per : (rank + 1) * per]
    assert _err(loss, loss_u) <= 1e-6 and _err(grad, grad_u) <= 1e-6
    assert torch.allclose(stats["weights"], stats_u["weights"], atol=1e-6)
    figs.add("dtensor_float32", loss_vs_unsharded=_err(loss, loss_u),
             grad_vs_unsharded=_err(grad, grad_u))  # fmt: skip
    # The module, with labels as a replicated DTensor.
    labels_d = distribute_tensor(labels, mesh, [Replicate()], **LOCAL)
    with torch.no_grad():
        assert torch.equal(rk.ReNIOLoss(**opts)(sd, td, labels_d), loss.detach())
    with pytest.raises(ValueError, match=r"supported: both logits placed Shard\(-1\)"):
        rk.renio_loss(distribute_tensor(s, mesh, [Replicate()], **LOCAL), td, labels)
    with pytest.raises(ValueError, match="teacher_logits is a plain tensor"):
        rk.renio_loss(sd, t, labels)
    with pytest.raises(ValueError, match="use backend='auto'"):
        rk.renio_loss(sd, td, labels, backend="triton")
    with pytest.raises(ValueError, match="leave group and vocab_size None"):
        vocab_parallel_renio_loss(sd, td, labels, vocab_size=100)


def _linear_inputs(world, width, vocab_size, seed, hs=6, ht=9):
    g = torch.Generator().manual_seed(seed)
    rows = world * width
    h_s = torch.randn(3, 5, hs, generator=g)
    w_s = torch.randn(rows, hs, generator=g) * (2.0 / hs**0.5)
    h_t = torch.randn(3, 5, ht, generator=g)
    h_t[..., :hs] = h_s
    w_t = torch.randn(rows, ht, generator=g) * (1.0 / ht**0.5)
    w_t[:, :hs] += 0.7 * w_s
    b_s, b_t = torch.randn(rows, generator=g) * 0.5, torch.randn(rows, generator=g) * 0.5
    return (h_s, w_s, b_s, h_t, w_t, b_t), _labels(vocab_size, -100, seed)


def _linear_plain(inputs, labels, vocab_size, opts, dtype):
    """Gradients (hidden, weight, bias) of materialized logits in ``dtype`` (float64: the
    reference; bf16: plain PyTorch's own bf16 error)."""
    h_s, w_s, b_s, h_t, w_t, b_t = (x.detach().to(dtype) for x in inputs)
    leaves = [x.requires_grad_() for x in (h_s, w_s, b_s)]
    logits_s = h_s @ w_s[:vocab_size].T + b_s[:vocab_size]
    logits_t = h_t @ w_t[:vocab_size].T + b_t[:vocab_size]
    loss = reference.renio_loss(logits_s, logits_t, labels, **opts)
    loss.backward(torch.tensor(GRAD_SCALE, dtype=dtype))
    return loss, [x.grad for x in leaves]


def _check_linear(rank, world, figs: Figures):
    opts = {"beta": 0.5, "token_clip": 0.1, "temperature": 1.2}
    dtypes = (torch.float32, BF16, torch.float32)[: len(LAYOUTS[world])]
    for (width, vocab_size), dtype in zip(LAYOUTS[world], dtypes, strict=True):
        real = vocab_size or world * width
        inputs, labels = _linear_inputs(world, width, real, seed=width)
        inputs = tuple(x.to(dtype) for x in inputs)
        h_s, w_s, b_s, h_t, w_t, b_t = inputs
        part = slice(rank * width, (rank + 1) * width)
        mine = [h_s.clone(), w_s[part].clone(), b_s[part].clone()]
        for x in mine:
            x.requires_grad_()
        loss = vocab_parallel_fused_linear_renio_loss(
            mine[0], mine[1], h_t, w_t[part], labels, student_bias=mine[2],
            teacher_bias=b_t[part], vocab_size=vocab_size, chunk_size=4, **opts,
        )  # fmt: skip
        loss.backward(torch.tensor(GRAD_SCALE))
        # The hidden states' gradient is a partial sum per rank: all-reduced, it is the whole.
        g_h = mine[0].grad.float()
        dist.all_reduce(g_h)
        ours = [g_h, mine[1].grad, mine[2].grad]
        ref, ref_grads = _linear_plain(inputs, labels, real, opts, torch.float64)
        ref_grads = [ref_grads[0], ref_grads[1][part], ref_grads[2][part]]
        errs = [_err(a, b) for a, b in zip(ours, ref_grads, strict=True)]
        if dtype == torch.float32:
            assert _err(loss, ref) <= 1e-5 * abs(float(ref)), (_err(loss, ref), float(ref))
            for e, r in zip(errs, ref_grads, strict=True):
                assert e <= 1e-4 * float(r.abs().max()), errs
        else:
            plain, plain_grads = _linear_plain(inputs, labels, real, opts, dtype)
            plain_grads = [plain_grads[0], plain_grads[1][part], plain_grads[2][part]]
            assert _err(loss, ref) <= 2 * _err(plain, ref)
            for e, p, r in zip(errs, plain_grads, ref_grads, strict=True):
                assert e <= 2 * _err(p, r), (errs, _err(p, r))
        # The unsharded fused-linear loss on the same full weights.
        full = [h_s.clone(), w_s[:real].clone(), b_s[:real].clone()]
        for x in full:
            x.requires_grad_()
        loss_u = rk.fused_linear_renio_loss(
            full[0], full[1], h_t, w_t[:real], labels, student_bias=full[2],
            teacher_bias=b_t[:real], **opts,
        )  # fmt: skip
        loss_u.backward(torch.tensor(GRAD_SCALE))
        grads_u = [full[0].grad, torch.zeros_like(w_s), torch.zeros_like(b_s)]
        grads_u[1][:real], grads_u[2][:real] = full[1].grad, full[2].grad
        grads_u = [grads_u[0], grads_u[1][part], grads_u[2][part]]
        name = f"fused_linear_{str(dtype).removeprefix('torch.')}"
        figs.add(
            name, loss_vs_unsharded=_err(loss, loss_u),
            grad_vs_unsharded=max(_err(a, b) for a, b in zip(ours, grads_u, strict=True)),
            loss_vs_float64=_err(loss, ref), grad_vs_float64=max(errs),
        )  # fmt: skip


def _check_boundary(rank, world):
    s, t, labels = _logits(world, 8, 16, torch.float32, -100, seed=5)
    mine = (s[..., rank * 8 : rank * 8 + 8], t[..., rank * 8 : rank * 8 + 8])
    with pytest.raises(ValueError, match="both sides must be sharded the same way"):
        vocab_parallel_renio_loss(mine[0], t[..., :9], labels)
    with pytest.raises(ValueError, match=r"vocab_size=17 must be in \[1, 16\]"):
        vocab_parallel_renio_loss(*mine, labels, vocab_size=17)
    with pytest.raises(ValueError, match=r"labels contain 12, outside \[0, 12\)"):
        vocab_parallel_renio_loss(*mine, labels.clamp(max=12), vocab_size=12)
    # Ranks that disagree all raise (none is left waiting in a collective).
    with pytest.raises(ValueError, match="disagree on"):
        vocab_parallel_renio_loss(mine[0][:, : 5 - rank], mine[1][:, : 5 - rank],
                                  labels[:, : 5 - rank])  # fmt: skip
    with pytest.raises(ValueError, match="disagree on"):
        vocab_parallel_renio_loss(*mine, torch.where(labels >= 0, (labels + rank) % 16, labels))
    # Under no_grad nothing is saved, and the loss is the same.
    with torch.no_grad():
        a = vocab_parallel_renio_loss(*mine, labels)
    assert torch.equal(a, vocab_parallel_renio_loss(*mine, labels).detach())


class CopyToTensorParallel(torch.autograd.Function):
    """docs/scaling.md's recipe: identity forward, all-reduce (SUM) of the gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad


def _check_edges(rank, world):
    """Rows without a valid token, a rank whose slice is -inf, no_grad and frozen lm_heads."""
    s, t, labels = _logits(world, 8, 16, torch.float32, -100, seed=7)
    part = slice(rank * 8, rank * 8 + 8)
    # The teacher puts no mass on rank 0's columns in one row (forward KL: those terms are 0).
    t[2, 1, :8] = -math.inf
    x = s[..., part].clone().requires_grad_()
    loss = vocab_parallel_renio_loss(x, t[..., part], labels, token_clip=0.5)
    loss.backward()
    full = s.clone().requires_grad_()
    loss_u = rk.renio_loss(full, t, labels, backend="torch", token_clip=0.5)
    loss_u.backward()
    assert torch.isfinite(loss) and _err(loss, loss_u) <= 1e-6
    assert _err(x.grad, full.grad[..., part]) <= 1e-6
    # A large offset on every logit costs no digits: (x / tau - max) - log z, as on one device.
    # (The offset inputs are themselves rounded: compare with the float64 loss of the same ones.)
    far_s, far_t = s + 1e4, t + 1e4
    far = vocab_parallel_renio_loss(far_s[..., part], far_t[..., part], labels, token_clip=0.5)
    ref, _ = _plain(far_s, far_t, labels, 16, {"token_clip": 0.5}, torch.float64)
    assert _err(far, ref) <= 1e-6, (float(far), float(ref))
    # A fully ignored batch: loss 0, gradients exactly 0.
    x.grad = None
    ignored = torch.full_like(labels, -100)
    loss = vocab_parallel_renio_loss(x, t[..., part], ignored)
    loss.backward()
    assert float(loss) == 0.0 and torch.all(x.grad == 0)
    # Fused-linear: no gradient work under no_grad; a frozen lm_head gets none, the hidden
    # states theirs.
    (h_s, w_s, b_s, h_t, w_t, b_t), labels = _linear_inputs(world, 8, 16, seed=7)
    h = h_s.clone().requires_grad_()
    w = w_s[part].clone().requires_grad_()
    args = (h, w, h_t, w_t[part], labels)
    with torch.no_grad():
        cold = vocab_parallel_fused_linear_renio_loss(*args)
    assert cold.grad_fn is None
    # The local logits exist one chunk at a time, never (B * T, W) at once.
    seen = []
    real_logits = LinearSide.logits

    def logits(side, r0, r1, buffer=None):
        seen.append(r1 - r0)
        return real_logits(side, r0, r1, buffer)

    LinearSide.logits = logits
    try:
        vocab_parallel_fused_linear_renio_loss(*args, chunk_size=4).backward()
    finally:
        LinearSide.logits = real_logits
    assert max(seen) == 4 and len(seen) == 2 * 2 * 4  # 15 rows: 4 chunks, 2 sides, fwd + bwd
    h.grad = w.grad = None
    w.requires_grad_(False)
    loss = vocab_parallel_fused_linear_renio_loss(*args)
    loss.backward()
    assert w.grad is None and h.grad is not None and torch.equal(cold, loss.detach())
    # The documented recipe gives each rank the all-reduced hidden gradient.
    partial, h.grad = h.grad.clone(), None
    dist.all_reduce(partial)
    vocab_parallel_fused_linear_renio_loss(CopyToTensorParallel.apply(h), *args[1:]).backward()
    assert torch.equal(h.grad, partial)


def _check_global_scope(rank, world):
    """Tensor parallel over every rank and data parallel over none (each rank its own data-parallel
    group of one), 2 accumulation micro-batches with ``weight_scope="global"`` == the unsharded
    loss on the whole batch."""
    dp_groups = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    width = 53
    s, t, labels = _logits(world, width, world * width, torch.float32, -100, seed=3)
    cols = slice(rank * width, (rank + 1) * width)
    for kw in (dict(weight_norm="batch_mean"), dict(weight_norm="ema", reduction="token_mean")):
        norm = rk.StepNormalizer(dp_groups[rank])
        x = s[..., cols].clone().requires_grad_()
        for half in (slice(0, 2), slice(2, 3)):
            loss = vocab_parallel_renio_loss(
                x[half], t[half, :, cols], labels[half], weight_scope="global", normalizer=norm,
                **kw,
            )  # fmt: skip
            loss.backward()
        result = norm.finish([x])
        full = s.clone().requires_grad_()
        ema = torch.full((), float("nan")) if kw["weight_norm"] == "ema" else None
        ref = rk.renio_loss(full, t, labels, backend="torch", ema_state=ema, **kw)
        ref.backward()
        torch.testing.assert_close(result.loss.float(), ref.detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(x.grad, full.grad[..., cols], rtol=1e-5, atol=1e-7)


def _worker(rank, world, out_path, boundary):
    figs = Figures()
    _check_logits(rank, world, figs)
    _check_dtensor(rank, world, figs)
    _check_linear(rank, world, figs)
    if boundary:
        _check_global_scope(rank, world)
        _check_boundary(rank, world)
        _check_edges(rank, world)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(figs.rows, f)
    # Tracebacks kept by pytest.raises hold DTensors in reference cycles; freed only at
    # interpreter exit, after the process group is destroyed, they sometimes abort the worker
    # (std::terminate in torch's teardown). Free them while the group exists.
    gc.collect()


@pytest.mark.parametrize("world", [2, 4])
def test_parity_with_unsharded_loss(world, tmp_path):
    out = tmp_path / "figures.json"
    run_workers(_worker, world, str(out), world == 2)
    for key, row in json.loads(out.read_text()).items():
        print(f"world {world} {key}: " + ", ".join(f"{k} {v:.2e}" for k, v in row.items()))


def test_needs_an_initialized_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    s, t, labels = make_inputs()
    with pytest.raises(ValueError, match="needs torch.distributed initialized"):
        vocab_parallel_renio_loss(s, t, labels)


@pytest.mark.parametrize(
    "fn", [vocab_parallel_renio_loss, vocab_parallel_fused_linear_renio_loss],
    ids=lambda f: f.__name__,
)  # fmt: skip
def test_signatures_carry_every_option(fn):
    params = inspect.signature(fn).parameters
    for f in option_fields():
        assert params[f.name].default == f.default, (fn.__name__, f.name)
        assert f"{f.name}: {f.metadata['doc']}" in fn.__doc__, (fn.__name__, f.name)


def test_top_k_is_refused_before_any_collective():
    s, t, labels = make_inputs()
    with pytest.raises(ValueError, match="top_k is not supported by the vocabulary-parallel"):
        vocab_parallel_renio_loss(s, t, labels, top_k=4)
