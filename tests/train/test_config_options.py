"""The training script's loss keys and flags come from ``ReNIOOptions`` (``option_fields()``):
every option is a ``TrainConfig`` field and a ``--flag`` with the record's default (except
``use_renio``, decided by ``--objective``), a new field of the record becomes one with no other
edit, and a field whose metadata has a ``script_flag`` is that flag (the way for a name the
script already uses, like the sampler's ``top_k``)."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys

import pytest

import renio_kernels.core.options as options_module
from renio_kernels import ReNIOOptions
from renio_kernels.core.options import option_fields
from renio_kernels.train import config, option_flags

# The documented exceptions: config keys whose default is not the record's.
EXCEPTIONS = set(option_flags.DERIVED_FROM_OBJECTIVE) | set(option_flags.SCRIPT_DEFAULTS)


def test_every_option_is_a_key_and_a_flag():
    fields = {f.name: f for f in dataclasses.fields(config.TrainConfig)}
    flags = {a.dest: a for a in config.build_parser()._actions}
    for f in option_fields():
        key = config.script_key(f)  # the name, unless the field's metadata has a script_flag
        assert key in fields, f.name
        assert flags[key].option_strings == list(config.script_flags(f)), f.name
        if f.name not in EXCEPTIONS:
            assert fields[key].default == f.default, f.name
            assert flags[key].choices == f.metadata["choices"], f.name
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


def _knob(default, kind: str, **meta) -> dataclasses.Field:
    meta = {"kind": kind, "doc": "a new knob", "paper_flag": None, "choices": None, **meta}
    return dataclasses.field(default=default, metadata=meta)


def _config_with(monkeypatch, *fields, check=None):
    """``train/config.py`` executed afresh over the record extended with ``fields`` (the record's
    own checks cover its fields only: ``check(record)`` stands in for the new fields' checks)."""

    def post_init(self):
        ReNIOOptions.__post_init__(self)
        if check:
            check(self)

    extended = dataclasses.make_dataclass(
        "Extended",
        list(fields),
        bases=(ReNIOOptions,),
        frozen=True,
        namespace={"__post_init__": post_init},
    )
    monkeypatch.setattr(options_module, "ReNIOOptions", extended)
    monkeypatch.setattr(options_module, "option_fields", lambda: dataclasses.fields(extended))
    spec = importlib.util.spec_from_file_location("renio_kernels.train._config", config.__file__)
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, fresh)
    spec.loader.exec_module(fresh)
    return fresh


def test_a_new_option_needs_no_other_edit(monkeypatch):
    """A field added to the record is a config key and a flag, and reaches the options."""
    fresh = _config_with(monkeypatch, ("new_knob", "float", _knob(0.25, "real")))
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


def test_script_flag_names_the_key_and_the_flag(monkeypatch, tmp_path):
    """A loss option named like a setting of the script (``top_k``, the sampler's ``--top-k``)
    is the flag its metadata gives, with aliases, and the key that flag spells."""
    flags = ("--top-k-loss", "--top_k_loss")
    fresh = _config_with(
        monkeypatch, ("top_k", "int", _knob(0, "int", script_flag=flags, paper_flag=flags[1]))
    )
    assert fresh.TrainConfig().top_k_loss == 0
    cfg = fresh.parse_config(["--top-k", "5", "--top-k-loss", "3"])
    assert cfg.top_k == 5 and fresh.loss_options(cfg).top_k == 3  # sampler and loss apart
    assert fresh.loss_options(fresh.parse_config(["--top_k_loss", "4"])).top_k == 4
    path = tmp_path / "run.yaml"
    path.write_text("top_k: 7\ntop-k-loss: 2\n")
    cfg = fresh.parse_config(["--config", str(path)])
    assert (cfg.top_k, fresh.loss_options(cfg).top_k) == (7, 2)
    assert cfg.to_dict()["top_k_loss"] == 2  # what RUN/config.yaml holds, read back by --config
    action = {a.dest: a for a in fresh.build_parser()._actions}["top_k_loss"]
    assert action.option_strings == list(flags) and "paper: --top_k_loss" in action.help


def test_a_renamed_option_s_errors_name_its_flag(monkeypatch):
    def check(opts):
        if not opts.top_p > 0:
            raise ValueError(f"top_p must be > 0, got {opts.top_p}")

    knob = _knob(1.0, "real", script_flag="--top-p-loss")
    fresh = _config_with(monkeypatch, ("top_p", "float", knob), check=check)
    with pytest.raises(ValueError, match=r"top_p must be > 0, got 0.0 \(top_p is --top-p-loss\)"):
        fresh.parse_config(["--top-p-loss", "0"])
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\].*got 2.0$"):  # unchanged
        fresh.parse_config(["--beta", "2"])


def test_an_option_named_like_a_script_setting_needs_a_script_flag(monkeypatch):
    with pytest.raises(ValueError, match="'top_k' would be the config key 'top_k' and flag "
                       "--top-k, which a setting of the script already is: give the field "
                       "metadata 'script_flag'"):  # fmt: skip
        _config_with(monkeypatch, ("top_k", "int", _knob(0, "int")))
    with pytest.raises(ValueError, match="metadata 'script_flag' must be a flag like"):
        _config_with(monkeypatch, ("top_k", "int", _knob(0, "int", script_flag="top-k-loss")))
