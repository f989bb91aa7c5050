"""The ReNIO losses registered in verl (renio_kernels.integrations.verl), run through verl's code.

Every loss here goes through verl 0.9.1's ``distillation_ppo_loss``: first as verl's engines call it
as the logits processor (the top-k forward KL from the student's logits), then as the final loss
(the registered function, verl's clamp and ``agg_loss`` with the global batch information). The
inputs and the float64 reference are in ``verl_inputs``.
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
from verl.workers.config import DistillationLossConfig  # noqa: E402

import renio_kernels.integrations.verl as rv  # noqa: E402
from tests.distributed import run_workers  # noqa: E402
from tests.integrations.verl_inputs import (  # noqa: E402
    PAPER,
    SHAPE,
    K,
    V,
    check_grad,
    configs,
    make_batch,
    micro_batch,
    ref_grad,
    rows_of,
    run_steps,
    sampled_log_probs,
    teacher_at_sampled,
    verl_loss,
)


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
    [(loss, metrics)] = run_steps(mode, batch, [[0, 1, 2, 3]], leaf=leaf, agg=agg)
    want, want_grad = ref_grad(batch, "forward_kl_topk", agg=agg, weight_norm=weight_norm)
    assert abs(loss.item() - want.item()) <= 2e-6 * abs(want.item())
    check_grad(leaf.grad, want_grad)
    # the fixture exercises both teacher cases: sampled token inside and outside the top-k
    assert 0 < metrics["renio/lt_bounded_frac"].aggregate() < 1
    assert 0 < metrics["renio/selected_frac"].aggregate() < 1


def test_topk_distillation_only_uses_old_log_probs():
    """verl's distillation_only runs (top-k, no policy gradient, no task reward) hand the loss
    no student log-probs: the weights come from old_log_probs, here the same parameters'."""
    batch = make_batch(1, **SHAPE)
    old = sampled_log_probs(batch)
    leaf = batch["logits"].clone().requires_grad_()
    [(loss, _)] = run_steps(
        "renio_mb_forward_kl_topk", batch, [[0, 1, 2, 3]], leaf=leaf, old_log_probs=old,
        distillation_only=True,
    )  # fmt: skip
    want, want_grad = ref_grad(batch, "forward_kl_topk")
    assert abs(loss.item() - want.item()) <= 2e-6 * abs(want.item())
    check_grad(leaf.grad, want_grad)


@pytest.mark.parametrize("base", ["k3", "k2"])
def test_estimators_match_float64_reference(base):
    batch = make_batch(2, **SHAPE)
    leaf = batch["logits"].clone().requires_grad_()
    [(loss, _)] = run_steps(f"renio_mb_{base}", batch, [[0, 1, 2, 3]], leaf=leaf)
    want, want_grad = ref_grad(batch, base)
    assert abs(loss.item() - want.item()) <= 2e-6 * abs(want.item())
    check_grad(leaf.grad, want_grad)


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
        [(loss, metrics)] = run_steps(
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
    run_steps(mode, batch, [[0, 2], [1, 3]], leaf=leaf)
    result = rv.finish_step(parameters=[leaf])
    # ema's first step: the running mean is the step's mean, as batch_mean's
    ref_norm = "batch_mean" if weight_norm == "ema" else weight_norm
    want, want_grad = ref_grad(batch, "forward_kl_topk", weight_norm=ref_norm)
    err = check_grad(leaf.grad, want_grad)
    assert err < 1e-6 and abs(result.grad_scale.item() - 1) > 1e-3
    # the step's loss, as one batch holding both micro-batches gives it
    assert abs(result.loss.item() - want.item()) <= 1e-6 * abs(want.item())
    mb = batch["logits"].clone().requires_grad_()
    run_steps("renio_mb_forward_kl_topk", batch, [[0, 2], [1, 3]], leaf=mb)
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
            run_steps("renio_forward_kl_topk", batch, [[0, 1], [2, 3]], leaf=self.module.leaf)
            return {"metrics": {}}

        def optimizer_step(self):
            self.seen = self.module.leaf.grad.clone()
            return 0.0

        def is_mp_src_rank_with_outputs(self):
            return True

    engine = Engine()
    engine.train_batch(TensorDict({}, batch_size=[]), loss_function=None)
    _, want_grad = ref_grad(batch, "forward_kl_topk")
    check_grad(engine.seen, want_grad)
    assert "optimizer_step" not in vars(engine)


def _two_ranks(rank, world):
    batch = make_batch(6, plens=[3, 2, 4, 2, 3, 2, 2, 3], rlens=[5, 1, 6, 4, 2, 3, 5, 4])
    share = [[0, 3], [5, 6]] if rank == 0 else [[1, 2], [4, 7]]
    leaf = batch["logits"].clone().requires_grad_()
    tokens = sum(batch["rlens"])
    for idx in share:
        data = micro_batch(batch, idx, dp_size=world, num_tokens=tokens, num_seqs=8)
        rows = torch.cat(rows_of(batch, idx))
        seqs = [batch["seqs"][i] for i in idx]
        loss, _ = verl_loss("renio_forward_kl_topk", data, leaf[rows], seqs)
        loss.backward()
    result = rv.finish_step(parameters=[leaf])
    torch.distributed.all_reduce(leaf.grad)
    leaf.grad /= world  # FSDP's average over the data-parallel group
    want, want_grad = ref_grad(batch, "forward_kl_topk")
    check_grad(leaf.grad, want_grad)
    assert abs(result.loss.item() - want.item()) <= 1e-6 * abs(want.item())


def test_global_scope_two_ranks_two_micro_batches():
    run_workers(_two_ranks, 2)


def test_forward_only_calls_leave_the_step_alone():
    batch = make_batch(7, **SHAPE)
    with torch.no_grad():
        run_steps("renio_forward_kl_topk", batch, [[0, 1, 2, 3]], leaf=batch["logits"])
    assert not rv.step_normalizer().pending


def test_global_scope_refuses_engines_without_grad():
    batch = make_batch(8, **SHAPE)
    leaf = batch["logits"].clone().requires_grad_()
    with pytest.raises(NotImplementedError, match="renio_mb_k3"):
        run_steps("renio_k3", batch, [[0, 1]], leaf=leaf, strategy="megatron")


def test_verl_clamp_binding_is_reported():
    batch = make_batch(9, **SHAPE)
    leaf = batch["logits"].clone().requires_grad_()
    # verl's default clamp, 10, binds here on a few weighted tokens
    with pytest.warns(UserWarning, match="loss_max_clamp=null"):
        [(_, metrics)] = run_steps(
            "test_none_micro_batch_forward_kl_topk", batch, [[0, 1, 2, 3]], leaf=leaf, clamp=0.5
        )
    assert metrics["renio/verl_clamp_frac"].aggregate() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_steps("renio_mb_forward_kl_topk", batch, [[0, 1, 2, 3]], leaf=leaf, clamp=None)


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
        run_steps("renio_mb_k1", batch, [[0, 1]], leaf=leaf)


def test_verl_loads_the_plugin_entry_point(tmp_path):
    """``import verl`` imports every ``verl.plugins`` entry point: with the one pyproject.toml
    declares (installed here as a bare dist-info), a fresh interpreter that only imports verl
    has the ReNIO losses registered and verl's train_batch wrapped."""
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
        "from verl.workers.engine.base import BaseEngine\n"
        "assert BaseEngine.train_batch._renio_step_hook\n"
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


def test_policy_gradient_global_scope_two_micro_batches():
    """use_policy_gradient: -w_b d is verl's PPO advantage; the clipped PPO loss is positively
    homogeneous in it, so the step's rescale is exact there too (k1, on-policy ratio 1)."""
    batch = make_batch(11, **SHAPE)
    old = sampled_log_probs(batch)
    leaf = batch["logits"].clone().requires_grad_()
    run_steps("renio_k1", batch, [[0, 3], [1, 2]], leaf=leaf, pg=True, old_log_probs=old)
    result = rv.finish_step(parameters=[leaf])
    assert abs(result.grad_scale.item() - 1) > 1e-3
    _, want_grad = ref_grad(batch, "k1")
    check_grad(leaf.grad, want_grad)


def test_verl_topk_is_the_sparse_teacher_truncated_loss():
    """verl's top-k divergence with the ReNIO weights (verl's formula on verl's tensors) equals
    this package's loss with a truncated SparseTeacher on the same top-k data, kernels included
    (verl's log_prob_min_clamp off, as SPEC's semantics have none)."""
    import renio_kernels as rk

    batch = make_batch(12, **SHAPE)
    leaf = batch["logits"].clone().requires_grad_()
    [(loss, _)] = run_steps(
        "renio_mb_forward_kl_topk", batch, [[0, 1, 2, 3]], leaf=leaf, lp_clamp=None
    )

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
        sampled[i, :r] = teacher_at_sampled(batch, rows, s[p:]).float()
        if i not in batch["masked"]:
            labels[i, :r] = s[p:]
    teacher = rk.SparseTeacher(ids, lps, sampled, mode="truncated")
    ours = rk.renio_loss(student, teacher, labels, reduction="token_mean", **PAPER)
    ours.backward()
    assert abs(ours.item() - loss.item()) <= 2e-6 * abs(loss.item())
    check_grad(mine.grad, leaf.grad.double())


@pytest.mark.parametrize("mode", ["renio_k3", "renio_mb_k3"])
def test_fully_masked_micro_batch(mode):
    """A micro-batch whose response tokens are all masked (others in the step have tokens): the
    registered loss gives finite values, weights 1, and after verl's agg_loss a loss of 0 with
    gradients exactly 0 (the step's rescale included).
    verl's own distillation_loss cannot be the caller here: its loss-range metric takes the min
    of an empty tensor and raises, for verl's losses too."""
    from verl.trainer.ppo.core_algos import agg_loss
    from verl.utils.torch_functional import logprobs_from_logits

    batch = make_batch(13, **{**SHAPE, "masked": (0, 1, 2, 3)})
    leaf = batch["logits"].clone().requires_grad_()
    idx = [0, 1, 2, 3]
    data = micro_batch(batch, idx, dp_size=1, num_tokens=10, num_seqs=8)
    data["teacher_logprobs"] = data["teacher_sampled"]
    seqs = batch["seqs"]
    cu = torch.tensor([0] + [len(q) for q in seqs]).cumsum(0)
    lp = logprobs_from_logits(leaf, torch.roll(torch.cat(seqs), -1))
    model_output = {"log_probs": torch.nested.nested_tensor_from_jagged(lp, cu)}
    actor, dist = configs(mode)
    matrix, metrics = L.get_distillation_loss_fn(mode)(
        config=actor, distillation_config=dist, model_output=model_output, data=data
    )
    assert torch.isfinite(matrix).all()
    assert metrics["renio/weight_mean"].aggregate() == 1.0
    mask = data["response_mask"].to_padded_tensor(False)
    loss = agg_loss(matrix, mask, "token-mean", dp_size=1, batch_num_tokens=10, global_batch_size=8)
    loss.backward()
    rv.finish_step(parameters=[leaf])
    assert loss.item() == 0 and torch.equal(leaf.grad, torch.zeros_like(leaf.grad))
    with pytest.raises(RuntimeError, match="numel"):
        run_steps("k3", batch, [idx], leaf=leaf)


def test_teacher_top_k_holding_all_mass_keeps_weights_finite():
    """Top-k log-probs whose mass rounds to >= 1 and sampled tokens outside them, without a
    ratio_clip: the bound on lt[x] stays finite, and so do the weights and the gradient."""
    if "test_noclip_forward_kl_topk" not in L.DISTILLATION_LOSS_REGISTRY:
        rv.register_renio_loss(
            "test_noclip_forward_kl_topk", "forward_kl_topk", ratio_clip=None,
            weight_temperature=0.5, weight_scope="micro_batch",
        )  # fmt: skip
    batch = make_batch(14, **SHAPE)
    batch["tlp"] = torch.full_like(batch["tlp"], math.log(1.01 / K))  # mass 1.01: rounding
    leaf = batch["logits"].clone().requires_grad_()
    [(loss, metrics)] = run_steps("test_noclip_forward_kl_topk", batch, [[0, 1, 2, 3]], leaf=leaf)
    assert math.isfinite(loss.item()) and torch.isfinite(leaf.grad).all()
    assert math.isfinite(metrics["renio/weight_max"].aggregate())
    assert metrics["renio/lt_bounded_frac"].aggregate() > 0


def test_global_scope_refuses_to_run_without_the_step_hook(monkeypatch):
    monkeypatch.setattr(rv, "_HOOKED", False)
    batch = make_batch(15, **SHAPE)
    leaf = batch["logits"].clone().requires_grad_()
    with pytest.raises(RuntimeError, match="renio_mb_k3"):
        run_steps("renio_k3", batch, [[0, 1]], leaf=leaf)
