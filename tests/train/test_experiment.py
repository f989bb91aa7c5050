"""The experiment runner (grid of arms x seeds, resumable, paired report) and its statistics."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from renio_kernels.train.__main__ import main as cli
from renio_kernels.train.config import TrainConfig, typed_value
from renio_kernels.train.experiment import (
    STAT_BLOCKS,
    _block_means,
    _incorrect_weight_share,
    load_grid,
    main,
    plan,
    report,
    run_grid,
)
from renio_kernels.train.loop import main as train_main
from renio_kernels.train.metrics import read_metrics
from renio_kernels.train.stats import bootstrap_mean, paired_difference, unpaired_difference
from tests.train.conftest import base_args

# --- statistics on synthetic data -------------------------------------------------------------


def _correlated_arms(rng, seeds=4, problems=400, gap=0.05):
    """Two arms on the same problems: a problem's difficulty drives both (strong correlation),
    and the arm adds ``gap`` to the chance of solving it; each seed shifts both a little."""
    difficulty = rng.uniform(0.05, 0.95, size=problems)
    seed_shift = rng.normal(0, 0.02, size=(seeds, 1))
    u = rng.uniform(size=(seeds, problems))  # common random numbers: the pairing
    ref = (u < difficulty + seed_shift).astype(float)
    arm = (u < difficulty + seed_shift + gap).astype(float)
    return arm, ref


def test_a_known_difference_is_recovered():
    rng = np.random.default_rng(1)
    arm, ref = _correlated_arms(rng, seeds=5, problems=2000, gap=0.05)
    d = paired_difference(arm, ref, n_boot=2000)
    assert d.low < 0.05 < d.high
    assert d.low > 0.0  # the difference is resolved
    assert d.estimate == pytest.approx(arm.mean() - ref.mean())
    assert d.half_width < 0.02


def test_no_difference_gives_an_interval_around_zero():
    rng = np.random.default_rng(2)
    arm, ref = _correlated_arms(rng, gap=0.0)
    d = paired_difference(arm, ref, n_boot=2000)
    assert d.low <= 0.0 <= d.high


def test_coverage_of_the_mean_is_near_nominal():
    """Over many synthetic experiments with known mean accuracy, the 95% interval holds it in
    roughly 95% of them (the two-way bootstrap errs on the wide side: at least 88%)."""
    rng = np.random.default_rng(3)
    hits, trials = 0, 150
    for i in range(trials):
        p = rng.uniform(0.1, 0.9, size=200)  # a fresh draw of problems each time
        seed_effect = rng.normal(0, 0.03, size=(3, 1))
        outcomes = (rng.uniform(size=(3, 200)) < np.clip(p + seed_effect, 0, 1)).astype(float)
        ci = bootstrap_mean(outcomes, n_boot=500, seed=i)
        hits += ci.low <= 0.5 <= ci.high  # E[p] = 0.5, E[seed_effect] = 0
    assert 0.88 <= hits / trials <= 1.0


def test_pairing_narrows_the_interval_on_correlated_arms():
    rng = np.random.default_rng(4)
    arm, ref = _correlated_arms(rng)
    paired = paired_difference(arm, ref, n_boot=2000)
    unpaired = unpaired_difference(arm, ref, n_boot=2000)
    assert paired.estimate == pytest.approx(unpaired.estimate)
    assert paired.half_width < 0.5 * unpaired.half_width


def test_bad_statistics_input():
    with pytest.raises(ValueError, match="same seeds and problems"):
        paired_difference(np.ones((2, 5)), np.ones((3, 5)))
    with pytest.raises(ValueError, match="seeds, problems"):
        bootstrap_mean(np.ones((0, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        bootstrap_mean([[1.0, float("nan")]])
    with pytest.raises(ValueError, match="level must be in"):
        bootstrap_mean([[1.0, 0.0]], level=95)


# --- per-problem held-out correctness in a run ------------------------------------------------


def test_a_run_records_each_held_out_problem(tiny_models, tmp_path):
    out = tmp_path / "run"
    summary = train_main(base_args(tiny_models, out, **{"eval-problems": 6, "steps": 1}))
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 1]
    for r in evals:
        assert len(r["correct"]) == 6 and set(r["correct"]) <= {"0", "1"}
        assert r["eval_accuracy"] == pytest.approx(r["correct"].count("1") / 6)
    assert summary["eval_correct_before"] == evals[0]["correct"]
    assert summary["eval_correct_after"] == evals[-1]["correct"]


# --- the runner ---------------------------------------------------------------------------------


def _grid(tiny_models, path, **common_overrides):
    common = {
        "student": str(tiny_models["student"]),
        "teacher": str(tiny_models["teacher"]),
        "steps": 2,
        "batch_size": 4,
        "max_new_tokens": 12,
        "eval_problems": 5,
        "eval_batch_size": 5,
        "warmup_steps": 1,
        "save_every": 1,
        "threads": 1,
        "lr": 1e-2,
        **common_overrides,
    }
    grid = {
        "common": common,
        "seeds": [0, 1],
        "reference": "opd",
        "arms": {
            "renio": {"flags": {"objective": "renio"}},
            "opd": {"flags": {"objective": "opd"}},
            "sft": {"kind": "sft", "seeds": [0], "flags": {"steps": 2, "batch_size": 4}},
        },
    }
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def test_grid_runs_resumes_and_reports(tiny_models, tmp_path):
    grid = _grid(tiny_models, tmp_path / "grid.yaml")
    out = tmp_path / "exp"
    done = run_grid(grid, out, in_process=True)
    assert [(d["arm"], d["seed"], d["status"]) for d in done] == [
        ("renio", 0, "ran"),
        ("opd", 0, "ran"),
        ("sft", 0, "ran"),
        ("renio", 1, "ran"),
        ("opd", 1, "ran"),
    ]
    for arm, seed in (("renio", 0), ("opd", 1), ("sft", 0)):
        rec = json.loads((out / "summaries" / arm / f"seed-{seed}.json").read_text())
        assert rec["arm"] == arm and rec["seed"] == seed
        assert len(rec["eval_correct_after"]) == 5
    renio0 = json.loads((out / "summaries" / "renio" / "seed-0.json").read_text())
    assert renio0["weight_auroc_mean"] is None or 0 <= renio0["weight_auroc_mean"] <= 1
    assert 0 <= renio0["selected_fraction_mean"] <= 1 and renio0["weight_spread_mean"] >= 0
    assert (out / ".gitignore").read_text() == "runs/\n"

    # Every summary kept: the same command runs nothing.
    assert {d["status"] for d in run_grid(grid, out, in_process=True)} == {"skipped"}

    # A run stopped after its first checkpoint: resumed, not restarted (the step-1 record is
    # the one the interrupted run wrote).
    run_dir = out / "runs" / "opd" / "seed-1"
    first = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"][0]
    (out / "summaries" / "opd" / "seed-1.json").unlink()
    (run_dir / "COMPLETE").unlink()
    (run_dir / "summary.json").unlink()
    shutil.rmtree(run_dir / "checkpoints" / "step-000002")
    done = run_grid(grid, out, in_process=True)
    assert [d for d in done if d["status"] == "ran"] == [{"arm": "opd", "seed": 1, "status": "ran"}]
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r for r in records if r["kind"] == "train"][0] == first
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]

    text = report(out, n_boot=200)
    assert (out / "report.md").read_text() == text
    table = text.split("| arm |")[1]  # the first table only
    rows = {
        cells[0]: cells
        for line in table.split("\n\n")[0].splitlines()
        if line.startswith("|")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert rows["renio"][1] == "2" and rows["renio"][4] == "opd"
    assert rows["renio"][5].startswith(("+", "-")) and "[" in rows["renio"][5]
    assert rows["opd"][4] == "-" and rows["sft"][1] == "1"
    # the weight statistics with their intervals over seeds x blocks of steps (2 steps: 2 blocks)
    assert len(renio0["selected_fraction_blocks"]) == 2
    low, high = map(float, rows["renio"][7].split("[")[1].rstrip("]").split(","))
    assert low <= float(rows["renio"][7].split()[0]) <= high
    assert rows["sft"][7] == "-"  # no weights in supervised training
    # the second table: where the weights put the gradient (no row for sft)
    share = [line for line in text.splitlines() if line.startswith("| renio |")][1]
    cells = [c.strip() for c in share.strip("|").split("|")[1:]]
    assert 0 <= float(cells[0]) <= 1  # the tiny models solve nothing: no correct-SGO weights
    assert cells[3] == "-" or 0 <= float(cells[3]) <= 1
    assert sum(line.startswith("| sft |") for line in text.splitlines()) == 1
    assert "WARNING" not in text  # every run started from the same student
    assert (out / "report.png").stat().st_size > 0 and "report.png" in text

    # The console entry point's subcommand, report only.
    assert cli(["experiment", "--out", str(out), "--report-only", "--bootstrap", "100"]) == 0


def test_parallel_jobs_give_the_sequential_runs(tiny_models, tmp_path):
    """jobs=2 runs subprocesses side by side; each run is the same as one run alone."""
    grid = _grid(tiny_models, tmp_path / "grid.yaml", steps=1, save_every=0)
    g = yaml.safe_load(grid.read_text())
    g["arms"] = {"renio": {"flags": {"objective": "renio"}}, "opd": {"flags": {"objective": "opd"}}}
    g["seeds"] = [0]
    grid.write_text(yaml.safe_dump(g, sort_keys=False))
    done = run_grid(grid, tmp_path / "parallel", jobs=2)
    assert [(d["arm"], d["status"]) for d in done] == [("renio", "ran"), ("opd", "ran")]
    run_grid(grid, tmp_path / "sequential", in_process=True)
    for arm in ("renio", "opd"):
        a, b = (
            json.loads((tmp_path / d / "summaries" / arm / "seed-0.json").read_text())
            for d in ("parallel", "sequential")
        )
        assert a["eval_correct_after"] == b["eval_correct_after"]
        assert a["selected_fraction_blocks"] == pytest.approx(b["selected_fraction_blocks"])
    with pytest.raises(ValueError, match="jobs must be at least 1"):
        run_grid(grid, tmp_path / "x", jobs=0)
    with pytest.raises(ValueError, match="cannot run in parallel"):
        run_grid(grid, tmp_path / "x", in_process=True, jobs=2)


def test_block_means():
    assert _block_means([1.0, 3.0, None, 5.0], blocks=2) == [2.0, 5.0]
    assert _block_means([None, None, 1.0], blocks=3) == [None, None, 1.0]
    assert _block_means([0.5, 1.5, 2.5]) == [0.5, 1.5, 2.5]  # fewer steps than blocks
    assert len(_block_means(list(range(1000)))) == STAT_BLOCKS


def test_incorrect_weight_share():
    r = {"correct_share": 0.25, "weight_mean_correct": 0.5, "weight_mean_incorrect": 1.1}
    assert _incorrect_weight_share(r) == pytest.approx(0.75 * 1.1 / (0.75 * 1.1 + 0.25 * 0.5))
    flat = {"correct_share": 0.25, "weight_mean_correct": 1.0, "weight_mean_incorrect": 1.0}
    assert _incorrect_weight_share(flat) == pytest.approx(0.75)  # plain OPD: the SGO share
    no_correct = {"correct_share": 0.0, "weight_mean_correct": None, "weight_mean_incorrect": 1.0}
    assert _incorrect_weight_share(no_correct) == 1.0
    assert _incorrect_weight_share({**r, "weight_mean_correct": None}) is None  # inconsistent
    assert _incorrect_weight_share({"correct_share": None}) is None


def test_a_changed_grid_is_not_mixed_with_old_runs(tiny_models, tmp_path):
    out = tmp_path / "exp"
    grid = _grid(tiny_models, tmp_path / "grid.yaml", steps=1, save_every=0)
    g = yaml.safe_load(grid.read_text())
    g["arms"] = {"opd": {"flags": {"objective": "opd"}}}
    g["seeds"] = [0]
    grid.write_text(yaml.safe_dump(g))
    run_grid(grid, out, in_process=True)
    g["common"]["lr"] = 5e-3
    grid.write_text(yaml.safe_dump(g))
    with pytest.raises(ValueError, match="another config"):
        run_grid(grid, out, in_process=True)


def test_bad_grids(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"arms": {"a": {"reference": "b"}}}))
    with pytest.raises(ValueError, match="reference 'b' is not an arm"):
        load_grid(bad)
    bad.write_text(yaml.safe_dump({"arms": {"a": {"kind": "sft", "flags": {"beta": 1}}}}))
    with pytest.raises(ValueError, match="may only be"):
        load_grid(bad)
    bad.write_text(yaml.safe_dump({"arms": {"a": {"flags": {"stepz": 3}}}}))
    with pytest.raises(ValueError, match=r"unknown renio-train config key\(s\) \['stepz'\]"):
        load_grid(bad)
    bad.write_text(yaml.safe_dump({"arms": {"a": {"seeds": [1, 1]}}}))
    with pytest.raises(ValueError, match="distinct"):
        load_grid(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["--grid", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("name", ["default", "pilot"])
def test_shipped_grids_parse(name):
    grid = load_grid(Path(__file__).parents[2] / "experiments" / f"{name}.yaml")
    runs = plan(grid)
    assert {"renio", "opd"} <= set(grid["arms"])
    for arm, _, config in runs:  # every run's config is one renio-train accepts
        if grid["arms"][arm]["kind"] == "distill":
            TrainConfig(**{k: typed_value(k, v, arm) for k, v in config.items()}).validate()
    if name == "default":
        seeds = {a: len(v["seeds"]) for a, v in grid["arms"].items()}
        assert min(seeds["renio"], seeds["opd"], seeds["renio-opsd"], seeds["opd-opsd"]) >= 5
        assert min(seeds.values()) >= 3
        assert grid["arms"]["renio-opsd"]["reference"] == "opd-opsd"
        assert len(runs) == sum(seeds.values())
