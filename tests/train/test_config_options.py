"""The training script's loss keys and flags come from ``ReNIOOptions`` (``option_fields()``):
every option is a ``TrainConfig`` field and a ``--flag`` with the record's default (except
``use_renio``, decided by ``--objective``), and a new field of the record becomes one with no
other edit."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys

import pytest

import renio_kernels.core.options as options_module
from renio_kernels import ReNIOOptions
from renio_kernels.core.options import option_fields
from renio_kernels.train import config

# The documented exceptions: config keys whose default is not the record's.
EXCEPTIONS = set(config.DERIVED_FROM_OBJECTIVE) | set(config.SCRIPT_DEFAULTS)


def test_every_option_is_a_key_and_a_flag():
    fields = {f.name: f for f in dataclasses.fields(config.TrainConfig)}
    flags = {a.dest: a for a in config.build_parser()._actions}
    for f in option_fields():
        assert f.name in fields, f.name
        assert f"--{f.name.replace('_', '-')}" in flags[f.name].option_strings
        if f.name not in EXCEPTIONS:
            assert fields[f.name].default == f.default, f.name
            assert flags[f.name].choices == f.metadata["choices"], f.name
    assert EXCEPTIONS == {"use_renio", "weight_scope"}
    assert fields["use_renio"].default is None
    # the script normalizes over its whole optimizer step; the bare loss over the call
    assert fields["weight_scope"].default == "global"
    assert ReNIOOptions().weight_scope == "micro_batch"
    assert flags["weight_scope"].choices == ("micro_batch", "global")


def test_flags_reach_the_loss_options():
    cfg = config.parse_config(["--beta", "0.5", "--divergence", "tvd", "--token-clip", "none"])
    expected = ReNIOOptions(beta=0.5, divergence="tvd", weight_scope="global")
    assert config.loss_options(cfg) == expected
    opd = config.loss_options(config.parse_config(["--objective", "opd"]))
    assert opd == ReNIOOptions(use_renio=False, weight_scope="global")
    paper = ["--weight-scope", "micro_batch", "--reduction", "token_mean"]
    assert config.loss_options(config.parse_config(paper)) == ReNIOOptions(reduction="token_mean")


def test_reduction_with_the_sampled_reverse_kl_is_an_error():
    for argv in (
        ["--objective", "sampled-reverse-kl", "--reduction", "sum"],
        ["--compare", "renio,sampled-reverse-kl", "--reduction", "token_mean"],
    ):
        with pytest.raises(ValueError, match="always a token mean per micro-batch: drop"):
            config.parse_config(argv)


def test_a_new_option_needs_no_other_edit(monkeypatch):
    """A field added to the record is a config key and a flag, and reaches the options."""
    knob = dataclasses.field(
        default=0.25, metadata={"kind": "real", "doc": "a new knob", "paper_flag": None,
                                "choices": None},
    )  # fmt: skip
    extended = dataclasses.make_dataclass(
        "Extended", [("new_knob", "float", knob)], bases=(ReNIOOptions,), frozen=True
    )
    monkeypatch.setattr(options_module, "ReNIOOptions", extended)
    monkeypatch.setattr(options_module, "option_fields", lambda: dataclasses.fields(extended))
    spec = importlib.util.spec_from_file_location("renio_kernels.train._config", config.__file__)
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, fresh)
    spec.loader.exec_module(fresh)
    assert fresh.TrainConfig().new_knob == 0.25
    cfg = fresh.parse_config(["--new-knob", "0.5"])
    assert fresh.loss_options(cfg).new_knob == 0.5


def test_resume_of_a_run_saved_before_the_weight_scope_keeps_micro_batch(tmp_path):
    """A run saved before the weight scope existed normalized per micro-batch; resuming it
    must not switch it to the script's newer ``global`` default."""
    from renio_kernels.train.loop import resolve_config

    (tmp_path / "config.yaml").write_text("beta: 0.5\n")
    assert resolve_config(["--resume", str(tmp_path)]).weight_scope == "micro_batch"
    (tmp_path / "config.yaml").write_text("beta: 0.5\nweight_scope: global\n")
    assert resolve_config(["--resume", str(tmp_path)]).weight_scope == "global"
    given = ["--resume", str(tmp_path), "--weight-scope", "micro_batch"]
    assert resolve_config(given).weight_scope == "micro_batch"
