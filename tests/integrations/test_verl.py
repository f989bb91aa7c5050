"""The ReNIO losses registered in verl (renio_kernels.integrations.verl), run through verl's code.

Every loss here goes through verl 0.9.1's ``distillation_ppo_loss``: first as verl's engines call it
as the logits processor (the top-k forward KL from the student's logits), then as the final loss
(the registered function, verl's clamp and ``agg_loss`` with the global batch information). The
float64 reference below is written from docs/SPEC.md and verl's formulas, not from the module.
"""

from __future__ import annotations

import ast
import importlib
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

L = pytest.importorskip("verl.trainer.distillation.losses")
from tensordict import TensorDict  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.torch_functional import logprobs_from_logits  # noqa: E402
from verl.workers.config import ActorConfig, DistillationConfig, DistillationLossConfig  # noqa: E402

import renio_kernels.integrations.verl as rv  # noqa: E402
from tests.distributed import run_workers  # noqa: E402

V, K = 13, 4
PAPER = dict(ratio_clip=2.5, threshold=0.8, weight_temperature=1.0)


def _off_losses():
    """verl's losses with the ReNIO weights off (for the equality with verl's own)."""
    for base in rv.BASES:
        name = f"test_off_{base}"
        if name not in L.DISTILLATION_LOSS_REGISTRY:
            rv.register_renio_loss(name, base, use_renio=False, weight_scope="micro_batch")
    for norm in ("clamp", "none", "ema"):
        for scope in ("global", "micro_batch"):
            name = f"test_{norm}_{scope}_forward_kl_topk"
            if name not in L.DISTILLATION_LOSS_REGISTRY:
                rv.register_renio_loss(
                    name, "forward_kl_topk", weight_norm=norm, weight_scope=scope
                )


_off_losses()


def _nested(ts):
    return torch.nested.as_nested_tensor(ts, layout=torch.jagged)


def make_batch(seed: int, plens, rlens, masked=()):
    """Sequences whose sampled tokens are partly in the teacher's top-k, partly not."""
    g = torch.Generator().manual_seed(seed)
    n = sum(plens) + sum(rlens)
    teacher = (2.0 * torch.randn(n, V, generator=g, dtype=torch.float64)).log_softmax(-1)
    tlp, tid = teacher.topk(K, -1)
    seqs, off = [], 0
    for i, (p, r) in enumerate(zip(plens, rlens, strict=True)):
        s = torch.randint(0, V, (p + r,), generator=g)
        for t in range(p, p + r):  # every other response token: the teacher's 2nd choice
            if (t + i) % 2 == 0:
                s[t] = tid[off + t - 1, 1]
        seqs.append(s)
        off += p + r
    logits = torch.randn(n, V, generator=g) * 1.5
    off = 0
    for i, (s, p) in enumerate(zip(seqs, plens, strict=True)):
        for t in range(p, len(s)):  # the student confident where the teacher is not: pivotal
            if (t + i) % 3 == 1:
                logits[off + t - 1, s[t]] += 4.0
        off += len(s)
    return dict(
        seqs=seqs, plens=list(plens), rlens=list(rlens), teacher=teacher,
        tlp=tlp.float(), tid=tid, logits=logits, masked=set(masked),
    )  # fmt: skip


def _rows(batch, idx):
    """Row ranges of sequences ``idx`` in the packed (N, V) layout."""
    cu = [0]
    for s in batch["seqs"]:
        cu.append(cu[-1] + len(s))
    return [torch.arange(cu[i], cu[i + 1]) for i in idx]


def micro_batch(batch, idx, *, dp_size, num_tokens, num_seqs, old_log_probs=None):
    rows = _rows(batch, idx)
    seqs = [batch["seqs"][i] for i in idx]
    ps = [batch["plens"][i] for i in idx]
    masks = [
        torch.full((batch["rlens"][i],), i not in batch["masked"], dtype=torch.bool) for i in idx
    ]
    fields = {
        "input_ids": _nested(seqs),
        "prompts": _nested([s[:p] for s, p in zip(seqs, ps, strict=True)]),
        "responses": _nested([s[p:] for s, p in zip(seqs, ps, strict=True)]),
        "response_mask": _nested(masks),
        "teacher_ids": _nested([batch["tid"][r] for r in rows]),
        "teacher_logprobs": _nested([batch["tlp"][r] for r in rows]),
        # the estimators' teacher input: the sampled token's log-prob, (L, 1)
        "teacher_sampled": _nested(
            [_teacher_sampled(batch, i, r) for i, r in zip(idx, rows, strict=True)]
        ),
    }
    if old_log_probs is not None:
        fields["old_log_probs"] = _nested([old_log_probs[i] for i in idx])
    data = TensorDict(fields, batch_size=[len(idx)])
    tu.assign_non_tensor(
        data, dp_size=dp_size, batch_num_tokens=num_tokens, global_batch_size=num_seqs
    )
    return data


def _teacher_sampled(batch, i, rows):
    s = batch["seqs"][i]
    nxt = torch.roll(s, -1)
    return batch["teacher"][rows].gather(-1, nxt[:, None]).float()


def configs(mode, *, agg="token-mean", pg=False, clamp=None, strategy="fsdp", lp_clamp=-10.0):
    actor = ActorConfig(
        strategy=strategy, ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2, rollout_n=1,
        loss_agg_mode=agg,
    )  # fmt: skip
    loss = DistillationLossConfig(
        loss_mode=mode, topk=K, use_policy_gradient=pg, use_task_rewards=False,
        loss_max_clamp=clamp, log_prob_min_clamp=lp_clamp,
    )  # fmt: skip
    return actor, DistillationConfig(enabled=False, distillation_loss=loss)


def verl_loss(mode, data, logits_rows, seqs, *, distillation_only=False, **kw):
    """What verl's FSDP engine does for one micro-batch: the logits processor, the student's
    sampled log-probs, then the final loss."""
    actor, dist = configs(mode, **kw)
    cu = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
    topk = dist.distillation_loss.loss_settings.use_topk
    model_output = {}
    if topk:
        out = L.distillation_ppo_loss(actor, dist, data=data, student_logits=logits_rows[None])
        for k, v in out.items():
            model_output[k] = torch.nested.nested_tensor_from_jagged(v.squeeze(0), cu)
    else:
        data["teacher_logprobs"] = data["teacher_sampled"]
    if not distillation_only:
        lp = logprobs_from_logits(logits_rows, torch.roll(torch.cat(seqs), -1))
        model_output["log_probs"] = torch.nested.nested_tensor_from_jagged(lp, cu)
    if dist.distillation_loss.use_policy_gradient:
        # verl's distillation_ppo_loss also runs its task-reward PPO loss here (which needs
        # advantages); distillation_loss is the distillation part alone
        return L.distillation_loss(actor, dist, model_output, data)
    return L.distillation_ppo_loss(actor, dist, model_output=model_output, data=data)


# ---------------------------------------------------------------- float64 reference


def reference(batch, logits64, base, *, agg="token-mean", weight_norm="batch_mean",
              use_renio=True):  # fmt: skip
    """The whole batch's loss in float64 (one batch holding every sequence)."""
    w_terms, factors = [], []
    off = 0
    for i, (s, p, r) in enumerate(zip(batch["seqs"], batch["plens"], batch["rlens"], strict=True)):
        rows = torch.arange(off + p - 1, off + p + r - 1)
        off += len(s)
        x = s[p:]
        ls = logits64[rows].log_softmax(-1)
        ls_x = ls.gather(-1, x[:, None]).squeeze(-1)
        lt_x_true = batch["teacher"][rows].gather(-1, x[:, None]).squeeze(-1)
        if base == "forward_kl_topk":
            lt_k = batch["tlp"][rows].double()
            ls_k = ls.gather(-1, batch["tid"][rows])
            lt_c, ls_c = lt_k.clamp(min=-10), ls_k.clamp(min=-10)
            d = (lt_c.exp() * (lt_c - ls_c)).sum(-1).clamp(min=0)
            lt_x = _teacher_at_sampled(batch, rows, x)
        else:
            lt_x = lt_x_true.float().double()
            kl = (lt_x - ls_x).clamp(-20, 20)
            if base == "k3":
                d = (kl.exp() - kl - 1).clamp(-10, 10)
            elif base == "k2":
                d = 0.5 * (ls_x - lt_x) ** 2
            else:  # k1 as verl's vanilla PPO loss uses it, advantage -d at ratio 1
                d = (ls_x - lt_x).detach() * torch.exp(ls_x - ls_x.detach())
        valid = i not in batch["masked"]
        rr = (ls_x - lt_x).clamp(max=PAPER["ratio_clip"]).detach()
        sel = (rr >= PAPER["threshold"]) & valid
        rbar = rr[sel].mean() if sel.any() else torch.zeros((), dtype=torch.float64)
        factors.append(torch.exp(rbar / PAPER["weight_temperature"]))
        if agg == "token-mean":
            w_terms.append(d.sum() if valid else d.sum() * 0)
        else:  # seq-mean-token-mean
            w_terms.append(d.mean() if valid else d.sum() * 0)
    e = torch.stack(factors)
    if not use_renio:
        w = torch.ones_like(e)
    elif weight_norm == "batch_mean":
        w = torch.clamp(e / e.mean(), max=10)
    elif weight_norm == "clamp":
        f = e.clamp(0.1, 10)
        w = f / f.mean()
    else:
        w = e
    total = sum(wb * t for wb, t in zip(w, w_terms, strict=True))
    if agg == "token-mean":
        denom = sum(r for i, r in enumerate(batch["rlens"]) if i not in batch["masked"])
    else:
        denom = len(batch["seqs"])
    return total / denom


def _teacher_at_sampled(batch, rows, x):
    """``lt[x]`` as verl's top-k data allows: exact inside the top-k, else its upper bound."""
    lt_k = batch["tlp"][rows].double()
    inside = (batch["tid"][rows] == x[:, None]).any(-1)
    exact = batch["teacher"][rows].gather(-1, x[:, None]).squeeze(-1).float().double()
    bound = torch.minimum(lt_k.min(-1).values, torch.log(1 - lt_k.exp().sum(-1)))
    return torch.where(inside, exact, bound)


def _check_grad(got, want, rtol=2e-5, atol=2e-7):
    err = (got.double() - want).abs().max().item()
    assert err <= atol + rtol * want.abs().max().item(), err
    return err


SHAPE = dict(plens=[3, 2, 4, 2], rlens=[5, 1, 6, 4], masked=(1,))


def _run(mode, batch, groups, *, leaf, agg="token-mean", dp_size=1, **kw):
    """Backward every micro-batch (lists of sequence indices) into ``leaf``; their losses."""
    tokens = sum(r for i, r in enumerate(batch["rlens"]) if i not in batch["masked"]) * dp_size
    losses = []
    old_log_probs = kw.pop("old_log_probs", None)
    for idx in groups:
        data = micro_batch(
            batch, idx, dp_size=dp_size, num_tokens=tokens, num_seqs=len(batch["seqs"]) * dp_size,
            old_log_probs=old_log_probs,
        )  # fmt: skip
        rows = torch.cat(_rows(batch, idx))
        seqs = [batch["seqs"][i] for i in idx]
        loss, metrics = verl_loss(mode, data, leaf[rows], seqs, agg=agg, **kw)
        if loss.requires_grad:
            loss.backward()
        losses.append((loss.detach(), metrics))
    return losses


def _ref_grad(batch, base, **kw):
    x = batch["logits"].double().requires_grad_()
    loss = reference(batch, x, base, **kw)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("weight_norm", ["batch_mean", "clamp", "none"])
def test_topk_matches_float64_reference(agg, weight_norm):
    """One micro-batch holding the batch: loss and student-logit gradients against float64."""
    batch = make_batch(0, **SHAPE)
    mode = {
        "batch_mean": "renio_mb_forward_kl_topk",
        "clamp": "test_clamp_micro_batch_forward_kl_topk",
        "none": "test_none_micro_batch_forward_kl_topk",
    }[weight_norm]
    leaf = batch["logits"].clone().requires_grad_()
    [(loss, metrics)] = _run(mode, batch, [[0, 1, 2, 3]], leaf=leaf, agg=agg)
    want, want_grad = _ref_grad(batch, "forward_kl_topk", agg=agg, weight_norm=weight_norm)
    assert abs(loss.item() - want.item()) <= 2e-6 * abs(want.item())
    _check_grad(leaf.grad, want_grad)
    # the fixture exercises both teacher cases: sampled token inside and outside the top-k
    assert 0 < metrics["renio/lt_bounded_frac"].aggregate() < 1
    assert 0 < metrics["renio/selected_frac"].aggregate() < 1


def test_topk_distillation_only_uses_old_log_probs():
    """verl's distillation_only runs (top-k, no policy gradient, no task reward) hand the loss
    no student log-probs: the weights come from old_log_probs, here the same parameters'."""
    batch = make_batch(1, **SHAPE)
    old = _sampled_log_probs(batch)
    leaf = batch["logits"].clone().requires_grad_()
    [(loss, _)] = _run(
        "renio_mb_forward_kl_topk", batch, [[0, 1, 2, 3]], leaf=leaf, old_log_probs=old,
        distillation_only=True,
    )  # fmt: skip
    want, want_grad = _ref_grad(batch, "forward_kl_topk")
    assert abs(loss.item() - want.item()) <= 2e-6 * abs(want.item())
    _check_grad(leaf.grad, want_grad)


@pytest.mark.parametrize("base", ["k3", "k2"])
def test_estimators_match_float64_reference(base):
    batch = make_batch(2, **SHAPE)
    leaf = batch["logits"].clone().requires_grad_()
    [(loss, _)] = _run(f"renio_mb_{base}", batch, [[0, 1, 2, 3]], leaf=leaf)
    want, want_grad = _ref_grad(batch, base)
    assert abs(loss.item() - want.item()) <= 2e-6 * abs(want.item())
    _check_grad(leaf.grad, want_grad)


@pytest.mark.parametrize("base", rv.BASES)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_use_renio_false_is_verls_own_loss(base, agg):
    """With the weights off, loss, gradients and verl's metrics equal verl's own loss_mode."""
    pg = base in ("k1", "kl")  # verl refuses to backpropagate k1 directly
    batch = make_batch(3, **SHAPE)
    old = [torch.zeros(r) for r in batch["rlens"]]
    grads, results = [], []
    for mode in (base, f"test_off_{base}"):
        leaf = batch["logits"].clone().requires_grad_()
        [(loss, metrics)] = _run(
            mode, batch, [[0, 1, 2, 3]], leaf=leaf, agg=agg, pg=pg, old_log_probs=old
        )
        grads.append(leaf.grad)
        results.append((loss, metrics))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(grads[0], grads[1])
    theirs, ours = results[0][1], results[1][1]
    for key, value in theirs.items():
        got = ours[key]
        if hasattr(value, "aggregate"):
            value, got = value.aggregate(), got.aggregate()
        assert value == got, key


@pytest.mark.parametrize("weight_norm", ["batch_mean", "clamp", "ema"])
def test_global_scope_two_micro_batches_equal_one_batch(weight_norm):
    """Two micro-batches of one optimizer step give one batch's gradient after finish_step;
    normalizing per micro-batch does not."""
    batch = make_batch(4, **SHAPE)
    mode = {
        "batch_mean": "renio_forward_kl_topk",
        "clamp": "test_clamp_global_forward_kl_topk",
        "ema": "test_ema_global_forward_kl_topk",
    }[weight_norm]
    leaf = batch["logits"].clone().requires_grad_()
    _run(mode, batch, [[0, 2], [1, 3]], leaf=leaf)
    result = rv.finish_step(parameters=[leaf])
    # ema's first step: the running mean is the step's mean, as batch_mean's
    ref_norm = "batch_mean" if weight_norm == "ema" else weight_norm
    want, want_grad = _ref_grad(batch, "forward_kl_topk", weight_norm=ref_norm)
    err = _check_grad(leaf.grad, want_grad)
    assert err < 1e-6 and abs(result.grad_scale.item() - 1) > 1e-3
    # the step's loss, as one batch holding both micro-batches gives it
    assert abs(result.loss.item() - want.item()) <= 1e-6 * abs(want.item())
    mb = batch["logits"].clone().requires_grad_()
    _run("renio_mb_forward_kl_topk", batch, [[0, 2], [1, 3]], leaf=mb)
    assert (mb.grad.double() - want_grad).abs().max() > 100 * err + 1e-5
    assert not rv.step_normalizer().pending
    rv.step_normalizer().ema_mean.fill_(math.nan)


def test_engine_hook_rescales_before_the_optimizer_step():
    """verl's BaseEngine.train_batch, wrapped on import, finishes the step between the last
    backward and optimizer_step (where verl clips)."""
    from verl.workers.engine.base import BaseEngine

    batch = make_batch(5, **SHAPE)

    class Engine(BaseEngine):
        def __init__(self):
            self.module = torch.nn.Module()
            self.module.leaf = torch.nn.Parameter(batch["logits"].clone())
            self.seen = None

        def optimizer_zero_grad(self):
            self.module.leaf.grad = None

        def forward_backward_batch(self, data, loss_function, forward_only=False):
            _run("renio_forward_kl_topk", batch, [[0, 1], [2, 3]], leaf=self.module.leaf)
            return {"metrics": {}}

        def optimizer_step(self):
            self.seen = self.module.leaf.grad.clone()
            return 0.0

        def is_mp_src_rank_with_outputs(self):
            return True

    engine = Engine()
    engine.train_batch(TensorDict({}, batch_size=[]), loss_function=None)
    _, want_grad = _ref_grad(batch, "forward_kl_topk")
    _check_grad(engine.seen, want_grad)
    assert "optimizer_step" not in vars(engine)


def _two_ranks(rank, world):
    batch = make_batch(6, plens=[3, 2, 4, 2, 3, 2, 2, 3], rlens=[5, 1, 6, 4, 2, 3, 5, 4])
    share = [[0, 3], [5, 6]] if rank == 0 else [[1, 2], [4, 7]]
    leaf = batch["logits"].clone().requires_grad_()
    tokens = sum(batch["rlens"])
    for idx in share:
        data = micro_batch(batch, idx, dp_size=world, num_tokens=tokens, num_seqs=8)
        rows = torch.cat(_rows(batch, idx))
        seqs = [batch["seqs"][i] for i in idx]
        loss, _ = verl_loss("renio_forward_kl_topk", data, leaf[rows], seqs)
        loss.backward()
    result = rv.finish_step(parameters=[leaf])
    torch.distributed.all_reduce(leaf.grad)
    leaf.grad /= world  # FSDP's average over the data-parallel group
    want, want_grad = _ref_grad(batch, "forward_kl_topk")
    _check_grad(leaf.grad, want_grad)
    assert abs(result.loss.item() - want.item()) <= 1e-6 * abs(want.item())


def test_global_scope_two_ranks_two_micro_batches():
    run_workers(_two_ranks, 2)


def test_forward_only_calls_leave_the_step_alone():
    batch = make_batch(7, **SHAPE)
    with torch.no_grad():
        _run("renio_forward_kl_topk", batch, [[0, 1, 2, 3]], leaf=batch["logits"])
    assert not rv.step_normalizer().pending


def test_global_scope_refuses_engines_without_grad():
    batch = make_batch(8, **SHAPE)
    leaf = batch["logits"].clone().requires_grad_()
    with pytest.raises(NotImplementedError, match="renio_mb_k3"):
        _run("renio_k3", batch, [[0, 1]], leaf=leaf, strategy="megatron")


def test_verl_clamp_binding_is_reported():
    batch = make_batch(9, **SHAPE)
    leaf = batch["logits"].clone().requires_grad_()
    # verl's default clamp, 10, binds here on a few weighted tokens
    with pytest.warns(UserWarning, match="loss_max_clamp=null"):
        [(_, metrics)] = _run(
            "test_none_micro_batch_forward_kl_topk", batch, [[0, 1, 2, 3]], leaf=leaf, clamp=0.5
        )
    assert metrics["renio/verl_clamp_frac"].aggregate() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run("renio_mb_forward_kl_topk", batch, [[0, 1, 2, 3]], leaf=leaf, clamp=None)


def test_registry_and_config():
    for base in rv.BASES:
        for name in (f"renio_{base}", f"renio_mb_{base}"):
            settings = L.get_distillation_loss_settings(name)
            assert settings.use_topk == (base == "forward_kl_topk")
            assert DistillationLossConfig(loss_mode=name, topk=K).loss_mode == name
    with pytest.raises(ValueError, match="verl defines the divergence"):
        rv.register_renio_loss("test_bad", "k3", token_clip=0.05)
    with pytest.raises(ValueError, match="threshold"):
        rv.register_renio_loss("test_bad", "k3", threshold=float("nan"))
    with pytest.raises(ValueError, match="unknown base"):
        rv.register_renio_loss("test_bad", "jsd")
    batch = make_batch(10, **SHAPE)
    leaf = batch["logits"].clone().requires_grad_()
    with pytest.raises(ValueError, match="use_policy_gradient=true"):
        _run("renio_mb_k1", batch, [[0, 1]], leaf=leaf)


def test_verl_loads_the_plugin_entry_point(tmp_path):
    """``import verl`` imports every ``verl.plugins`` entry point: with the one pyproject.toml
    declares (installed here as a bare dist-info), a fresh interpreter that only imports verl
    has the ReNIO losses registered."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    root = Path(__file__).parents[2]
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    target = meta["project"]["entry-points"]["verl.plugins"]["renio"]
    info = tmp_path / "renio_plugin_probe-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: renio-plugin-probe\nVersion: 0.0\n"
    )
    (info / "entry_points.txt").write_text(f"[verl.plugins]\nrenio = {target}\n")
    code = (
        "import verl\n"
        "from verl.trainer.distillation.losses import DISTILLATION_LOSS_REGISTRY as r\n"
        "print(sorted(n for n in r if n.startswith('renio_')))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root)])}
    env.pop("VERL_USE_EXTERNAL_MODULES", None)
    env["VERL_USE_EXTERNAL_PLUGINS"] = "renio"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    names = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert names == sorted(f"{p}{b}" for b in rv.BASES for p in ("renio_", "renio_mb_"))


def test_import_without_verl_names_the_extra(monkeypatch):
    monkeypatch.delitem(sys.modules, "renio_kernels.integrations.verl")
    for name in [m for m in sys.modules if m == "verl" or m.startswith("verl.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "verl", None)
    with pytest.raises(ImportError, match=r"pip install renio-kernels\[verl\]"):
        importlib.import_module("renio_kernels.integrations.verl")


def _sampled_log_probs(batch):
    ls = batch["logits"].log_softmax(-1)
    old, off = [], 0
    for s, p, r in zip(batch["seqs"], batch["plens"], batch["rlens"], strict=True):
        rows = torch.arange(off + p - 1, off + p + r - 1)
        old.append(ls[rows].gather(-1, s[p:, None]).squeeze(-1))
        off += len(s)
    return old


def test_policy_gradient_global_scope_two_micro_batches():
    """use_policy_gradient: -w_b d is verl's PPO advantage; the clipped PPO loss is positively
    homogeneous in it, so the step's rescale is exact there too (k1, on-policy ratio 1)."""
    batch = make_batch(11, **SHAPE)
    old = _sampled_log_probs(batch)
    leaf = batch["logits"].clone().requires_grad_()
    _run("renio_k1", batch, [[0, 3], [1, 2]], leaf=leaf, pg=True, old_log_probs=old)
    result = rv.finish_step(parameters=[leaf])
    assert abs(result.grad_scale.item() - 1) > 1e-3
    _, want_grad = _ref_grad(batch, "k1")
    _check_grad(leaf.grad, want_grad)


def test_verl_topk_is_the_sparse_teacher_truncated_loss():
    """verl's top-k divergence with the ReNIO weights (verl's formula on verl's tensors) equals
    this package's loss with a truncated SparseTeacher on the same top-k data, kernels included
    (verl's log_prob_min_clamp off, as SPEC's semantics have none)."""
    import renio_kernels as rk

    batch = make_batch(12, **SHAPE)
    leaf = batch["logits"].clone().requires_grad_()
    [(loss, _)] = _run("renio_mb_forward_kl_topk", batch, [[0, 1, 2, 3]], leaf=leaf, lp_clamp=None)

    width = max(batch["rlens"])
    n = len(batch["seqs"])
    student = torch.zeros(n, width, V)
    ids = torch.zeros(n, width, K, dtype=torch.long)
    lps = torch.zeros(n, width, K)
    sampled = torch.zeros(n, width)
    labels = torch.full((n, width), -100)
    mine = batch["logits"].clone().requires_grad_()
    off = 0
    for i, (s, p, r) in enumerate(zip(batch["seqs"], batch["plens"], batch["rlens"], strict=True)):
        rows = torch.arange(off + p - 1, off + p + r - 1)
        off += len(s)
        student[i, :r] = mine[rows]
        ids[i, :r], lps[i, :r] = batch["tid"][rows], batch["tlp"][rows]
        sampled[i, :r] = _teacher_at_sampled(batch, rows, s[p:]).float()
        if i not in batch["masked"]:
            labels[i, :r] = s[p:]
    teacher = rk.SparseTeacher(ids, lps, sampled, mode="truncated")
    ours = rk.renio_loss(student, teacher, labels, reduction="token_mean", **PAPER)
    ours.backward()
    assert abs(ours.item() - loss.item()) <= 2e-6 * abs(loss.item())
    _check_grad(mine.grad, leaf.grad.double())
