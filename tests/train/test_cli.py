"""The CLI under careless input and accidents: the exit status, config values typed like their
flags, every check before the run directory is touched, --resume that honours every given flag,
and resumes after a torn metrics line, a finished run or a full disk."""

from __future__ import annotations

import errno
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from renio_kernels.train import loop
from renio_kernels.train.__main__ import main as entry_point
from renio_kernels.train.checkpoint import latest_checkpoint
from renio_kernels.train.config import TrainConfig
from renio_kernels.train.loop import main
from renio_kernels.train.metrics import read_metrics
from tests.train.conftest import base_args


def args_without(models, out, *drop, **overrides) -> list[str]:
    """``base_args`` minus the flags in ``drop`` (so a config file can set them)."""
    args = base_args(models, out, **overrides)
    pairs = [(args[i], args[i + 1]) for i in range(0, len(args), 2)]
    return [x for flag, value in pairs if flag.lstrip("-") not in drop for x in (flag, value)]


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def fails_untouched(exc, match, argv, out: Path):
    """``argv`` fails with ``exc`` and leaves ``out`` as it was (absent, or the same files)."""
    before = snapshot(out)
    with pytest.raises(exc, match=match):
        main(argv)
    assert snapshot(out) == before


def snapshot(path: Path) -> dict | None:
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


# --- the entry point ---------------------------------------------------------------------------


def test_console_script_exits_zero(tiny_models, tmp_path):
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert 'renio-train = "renio_kernels.train.__main__:main"' in pyproject
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as done:
        sys.exit(entry_point(base_args(tiny_models, out, steps=1)))  # what the script does
    assert done.value.code in (None, 0)
    assert (out / "COMPLETE").is_file()


# --- config values typed like their flags ------------------------------------------------------


def test_config_values_are_typed_like_flags(tiny_models, tmp_path):
    cfg_file = write_yaml(
        tmp_path / "run.yaml",
        'steps: "1"\nseed: "7"\nlr: 5e-4\nobjective: opd\nuse_renio: "false"\nplots: "false"\n'
        "token_clip: none\n",
    )
    assert yaml.safe_load(cfg_file.read_text())["lr"] == "5e-4"  # YAML 1.1: a string
    out = tmp_path / "run"
    main(["--config", str(cfg_file), *args_without(tiny_models, out, "steps", "lr", "plots")])
    seen = yaml.safe_load((out / "config.yaml").read_text())
    assert seen["steps"] == 1 and seen["seed"] == 7 and seen["lr"] == 5e-4
    assert seen["use_renio"] is False and seen["plots"] is False and seen["token_clip"] is None
    assert not (out / "plots").exists()
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("steps: 1.5", r"key 'steps': expected an integer, got 1\.5 \(float\)"),
        ("steps: true", r"key 'steps': expected an integer, got True \(bool\)"),
        ("lr: fast", r"key 'lr': expected a number, got 'fast' \(str\)"),
        ("plots: maybe", r"key 'plots': expected true or false, got 'maybe'"),
        ("token_clip: [1]", r"key 'token_clip': expected a number or null, got \[1\] \(list\)"),
        ("backend: bogus", r"key 'backend': expected one of \('auto', 'triton'"),
        ("weight_norm: mean", r"key 'weight_norm': expected one of"),
    ],
)
def test_config_value_of_the_wrong_type(tiny_models, tmp_path, text, match):
    cfg_file = write_yaml(tmp_path / "bad.yaml", text + "\n")
    out = tmp_path / "run"
    argv = ["--config", str(cfg_file), *args_without(tiny_models, out, "steps", "lr", "plots")]
    fails_untouched(ValueError, match, argv, out)


# --- every check before the run directory ------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "exc", "match"),
    [
        ({"backend": "bogus"}, SystemExit, None),  # argparse: invalid choice
        ({"sample-top-k": -5}, ValueError, r"--sample-top-k must be >= 0, got -5"),
        ({"lr": 0}, ValueError, r"--lr must be finite and > 0"),
        ({"backend": "triton", "device": "cpu"}, ValueError, r"--backend triton: .*CPU tensors"),
        (
            {"ignore-index": 5},
            ValueError,
            r"--ignore-index 5 is a token id of the student's vocabulary \(0\.\.98\)",
        ),
    ],
    ids=["backend-bogus", "sample-top-k", "lr", "triton-on-cpu", "ignore-index"],
)
def test_checks_before_the_run_directory(tiny_models, tmp_path, monkeypatch, flags, exc, match):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a plain CPU machine (tests set it to 1)
    out = tmp_path / "run"
    fails_untouched(exc, match, base_args(tiny_models, out, **flags), out)


@pytest.mark.parametrize("under", [False, True], ids=["file", "parent-file"])
def test_out_naming_an_existing_file(tiny_models, tmp_path, under):
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me\n")
    out = a_file / "run" if under else a_file
    what = "its parent " if under else "--out "
    fails_untouched(
        ValueError, what + r".*results\.txt' is an existing file", base_args(tiny_models, out),
        a_file,
    )  # fmt: skip


def test_plots_without_matplotlib(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="--plots needs the matplotlib package"):
        main(base_args(tiny_models, out, steps=1, plots="true"))
    assert (out / "COMPLETE").is_file()
    assert not (out / "plots").exists()


# --- --resume ----------------------------------------------------------------------------------


def saved_run(tmp_path, **values) -> Path:
    run_dir = tmp_path / "saved"
    run_dir.mkdir()
    cfg = TrainConfig(out=str(run_dir), **values)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return run_dir


def resumed_config(monkeypatch, argv) -> TrainConfig:
    """The config ``main(argv)`` would run, without running it."""
    seen = []
    monkeypatch.setattr(loop, "run", lambda cfg: seen.append(cfg) or {})
    main(argv)
    return seen[0]


def test_resume_given_flags_win_even_at_their_default(tmp_path, monkeypatch):
    run_dir = saved_run(tmp_path, steps=2, beta=0.5, seed=3)
    cfg = resumed_config(monkeypatch, ["--resume", str(run_dir), "--beta", "0.0"])
    assert cfg.beta == 0.0 and cfg.steps == 2 and cfg.seed == 3
    cfg = resumed_config(monkeypatch, ["--resume", str(run_dir), "--steps", "1000"])
    assert cfg.steps == 1000 and cfg.beta == 0.5 and cfg.out == str(run_dir)
    cfg = resumed_config(monkeypatch, ["--resume", str(run_dir)])
    assert cfg.steps == 2 and cfg.beta == 0.5


@pytest.fixture
def finished_run(tiny_models, tmp_path) -> Path:
    """A finished 2-step run with checkpoints at steps 1 and 2."""
    out = tmp_path / "done"
    main(base_args(tiny_models, out, **{"save-every": 1, "keep-checkpoints": 0}))
    return out


def evals_and_steps(run_dir: Path) -> tuple[list[int], list[int]]:
    records = read_metrics(run_dir / "metrics.jsonl")
    return (
        [r["step"] for r in records if r["kind"] == "eval"],
        [r["step"] for r in records if r["kind"] == "train"],
    )


def test_failed_resume_leaves_the_run_untouched(tiny_models, finished_run):
    argv = ["--resume", str(finished_run), "--student", str(tiny_models["teacher"])]
    fails_untouched(ValueError, r"does not match this model .*--student", argv, finished_run)
    main(["--resume", str(finished_run)])  # the plain resume still works
    assert (finished_run / "COMPLETE").is_file()


def test_resume_of_a_finished_run_adds_no_duplicate_eval(finished_run):
    assert evals_and_steps(finished_run) == ([0, 2], [1, 2])
    main(["--resume", str(finished_run)])
    assert evals_and_steps(finished_run) == ([0, 2], [1, 2])
    assert (finished_run / "COMPLETE").is_file()


def test_resume_drops_a_torn_metrics_line(finished_run):
    # A run killed while writing a metrics line, after its step-1 checkpoint.
    shutil.rmtree(finished_run / "checkpoints" / "step-000002")
    (finished_run / "COMPLETE").unlink()
    metrics = finished_run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"kind": "train", "step": 3, "lo')
    with pytest.warns(RuntimeWarning, match=r"metrics\.jsonl:\d+: dropping a torn last line"):
        main(["--resume", str(finished_run)])
    assert (finished_run / "COMPLETE").is_file()
    assert evals_and_steps(finished_run) == ([0, 2], [1, 2])
    # a broken line elsewhere is not a torn tail: an error naming the line, nothing touched
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    fails_untouched(
        ValueError, r"metrics\.jsonl:2 is not a JSON record", ["--resume", str(finished_run)],
        finished_run,
    )  # fmt: skip


def raising_save(failure: str):
    """``torch.save`` that fails like a full disk while writing the step-2 state."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        name = str(getattr(f, "name", f))
        if not name.endswith("step-000002/state.pt"):
            return real_save(obj, f, *args, **kwargs)
        if failure == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        if failure == "dev-full":  # the kernel's own ENOSPC, through torch's writer
            with open("/dev/full", "wb") as full:
                return real_save(obj, full if hasattr(f, "write") else "/dev/full")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    return save


@pytest.mark.parametrize("failure", ["enospc", "dev-full", "torch-text"])
def test_full_disk_while_saving_a_checkpoint(tiny_models, tmp_path, monkeypatch, failure):
    if failure == "dev-full" and not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    out = tmp_path / "run"
    monkeypatch.setattr(torch, "save", raising_save(failure))
    with pytest.raises(
        OSError, match=r"the disk is full: checkpoint step-000002 .*checkpoints"
    ) as e:
        main(base_args(tiny_models, out, **{"save-every": 1}))
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    ckpts = out / "checkpoints"
    assert not (ckpts / ".tmp-step-000002").exists()  # removed at once
    assert latest_checkpoint(out).name == "step-000001"
    # a save killed outright leaves its .tmp directory: never picked, removed on the next start
    (ckpts / ".tmp-step-000002").mkdir()
    (ckpts / ".tmp-step-000002" / "state.pt").write_bytes(b"half")
    assert latest_checkpoint(out).name == "step-000001"
    main(["--resume", str(out)])
    assert not (ckpts / ".tmp-step-000002").exists()
    assert (out / "COMPLETE").is_file()
    assert evals_and_steps(out) == ([0, 2], [1, 2])
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
