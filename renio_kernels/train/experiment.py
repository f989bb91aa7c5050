"""A grid of arms x seeds from one start, run sequentially and resumably, with a paired report.

    python -m renio_kernels.train.experiment --grid GRID.yaml --out experiments/NAME
    renio-train experiment --grid GRID.yaml --out experiments/NAME      # the same
    python -m renio_kernels.train.experiment --out experiments/NAME --report-only

The grid file (YAML): ``common`` (``renio-train`` config keys of every run, e.g. the student, the
teacher, ``steps``), ``seeds``, ``reference`` (the arm the others are compared with) and ``arms``:
each a name -> ``flags`` (config keys laid over ``common``), optionally its own ``seeds`` and
``reference``, and ``kind: sft`` for the supervised control (``renio-train sft --init <student>``
on the reference solutions; ``flags`` are then the sft subcommand's ``steps``, ``batch_size``,
``lr``, ``warmup_steps``). docs/experiments.md describes the grids shipped in experiments/.

Layout of ``--out``: ``grid.yaml`` (a copy), ``configs/ARM/seed-S.yaml`` (each run's config),
``runs/ARM/seed-S/`` (the run directories: checkpoints and models, not for version control),
``summaries/ARM/seed-S.json`` (small; per held-out problem correctness before/after and the
run's weight statistics) and ``report.md``. A run whose summary exists is skipped; a run
directory with a checkpoint but no ``COMPLETE`` is resumed (``--resume``); so is a stopped
grid, by running the same command again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from .metrics import read_metrics
from .stats import Interval, bootstrap_mean, paired_difference

__all__ = ["load_grid", "main", "plan", "report", "run_grid"]

# Quiet, small runs by default; a grid's ``common`` or an arm's ``flags`` can still turn these on.
RUN_DEFAULTS = {"progress": False, "plots": False, "tensorboard": False}
SFT_KEYS = ("steps", "batch_size", "lr", "warmup_steps")


def _keys(flags: dict | None, where: str) -> dict:
    if flags is None:
        return {}
    if not isinstance(flags, dict):
        raise ValueError(f"{where} must be a mapping of config key: value, got {flags!r}")
    return {str(k).replace("-", "_"): v for k, v in flags.items()}


def load_grid(path: str | Path) -> dict:
    """The grid file, checked: every arm has seeds and an existing reference arm."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid file {str(path)!r} does not exist")
    grid = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    arms = grid.get("arms")
    if not isinstance(arms, dict) or not arms:
        raise ValueError(f"grid file {str(path)!r}: 'arms' must map arm names to their flags")
    common = _keys(grid.get("common"), "common")
    from .config import TrainConfig

    known = set(TrainConfig.__dataclass_fields__)
    seeds = grid.get("seeds", [0])
    reference = grid.get("reference")
    out = {"common": common, "reference": reference, "arms": {}}
    for name, arm in arms.items():
        arm = arm or {}
        kind = arm.get("kind", "distill")
        if kind not in ("distill", "sft"):
            raise ValueError(f"arm {name!r}: kind must be 'distill' or 'sft', got {kind!r}")
        flags = _keys(arm.get("flags"), f"arm {name!r}: flags")
        if kind == "sft" and set(flags) - set(SFT_KEYS):
            raise ValueError(
                f"arm {name!r} (kind sft): flags may only be {SFT_KEYS}, got "
                f"{sorted(set(flags) - set(SFT_KEYS))}"
            )
        unknown = sorted(set(flags if kind == "distill" else {}) - known)
        if unknown or set(common) - known:
            raise ValueError(
                f"grid file {str(path)!r}: unknown renio-train config key(s) "
                f"{unknown or sorted(set(common) - known)} (arm {name!r} or common): the keys "
                "are renio-train's flag names, e.g. steps, objective, sgo_filter"
            )
        arm_seeds = [int(s) for s in arm.get("seeds", seeds)]
        if not arm_seeds or len(set(arm_seeds)) != len(arm_seeds):
            raise ValueError(f"arm {name!r}: seeds must be distinct integers, got {arm_seeds}")
        ref = arm.get("reference", reference)
        if ref is not None and ref not in arms:
            raise ValueError(f"arm {name!r}: reference {ref!r} is not an arm of the grid")
        out["arms"][str(name)] = {
            "kind": kind,
            "flags": flags,
            "seeds": arm_seeds,
            "reference": None if ref == name else ref,
        }
    return out


def plan(grid: dict) -> list[tuple[str, int, dict]]:
    """Every run of the grid as (arm, seed, config): seed-major, so that a stopped grid has
    every arm's first seeds before any arm's later ones."""
    runs = []
    seeds = sorted({s for arm in grid["arms"].values() for s in arm["seeds"]})
    for seed in seeds:
        for name, arm in grid["arms"].items():
            if seed not in arm["seeds"]:
                continue
            if arm["kind"] == "sft":
                config = {**arm["flags"], "seed": seed}
            else:
                config = {**RUN_DEFAULTS, **grid["common"], **arm["flags"], "seed": seed}
            runs.append((name, seed, config))
    return runs


def _execute(argv: list[str], in_process: bool) -> None:
    if in_process:
        if argv[0] == "sft":
            from .sft import main as sft_main

            sft_main(argv[1:])
        else:
            from .loop import main as train_main

            train_main(argv)
        return
    cmd = [sys.executable, "-m", "renio_kernels.train", *argv]
    subprocess.run(cmd, check=True)


def _distill_run(config_path: Path, run_dir: Path, in_process: bool) -> None:
    if (run_dir / "COMPLETE").is_file():
        return
    has_checkpoint = any((run_dir / "checkpoints").glob("step-*"))
    if has_checkpoint:
        argv = ["--config", str(config_path), "--resume", str(run_dir)]
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # stopped before its first checkpoint
        argv = ["--config", str(config_path), "--out", str(run_dir)]
    _execute(argv, in_process)


def _sft_run(config: dict, common: dict, run_dir: Path, in_process: bool) -> None:
    """The supervised control: fine-tune the start student on the reference solutions, then
    evaluate it on the distillation runs' held-out problems into a summary of the same form."""
    if (run_dir / "COMPLETE").is_file():
        return
    from .config import TrainConfig, typed_value

    base = TrainConfig(**{k: typed_value(k, v, "grid 'common'") for k, v in common.items()})
    shutil.rmtree(run_dir, ignore_errors=True)
    argv = ["sft", "--init", base.student, "--out", str(run_dir / "final"), "--eval-problems", "0"]
    for key, value in config.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    # one thread unless the grid says otherwise, as renio-train's CPU default (sft's is torch's)
    argv += ["--threads", str(base.threads or 1)]
    t0 = time.perf_counter()
    _execute(argv, in_process)
    before = _held_out_correct(base, base.student)
    after = _held_out_correct(base, str(run_dir / "final"))
    summary = {
        "objective": "sft",
        "mode": None,
        "steps": config.get("steps"),
        "accuracy_before": sum(before) / len(before),
        "accuracy_after": sum(after) / len(after),
        "eval_problems": len(after),
        "eval_correct_before": "".join("1" if c else "0" for c in before),
        "eval_correct_after": "".join("1" if c else "0" for c in after),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (run_dir / "COMPLETE").write_text("sft\n")


def _held_out_correct(cfg, model_dir: str) -> list[bool]:
    import torch

    from .evaluate import evaluate
    from .loop import _load_data
    from .models import load_model, load_tokenizer

    torch.set_num_threads(cfg.threads or 1)
    _, held_out = _load_data(cfg)
    model = load_model(model_dir, "model", "sdpa").eval()
    tokenizer = load_tokenizer(model_dir, "model")
    result = evaluate(
        model,
        tokenizer,
        held_out,
        cfg.prompt_template,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.eval_batch_size,
    )
    return result["correct"]


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


# per-step weight statistics are kept as means over this many consecutive blocks of steps:
# neighbouring steps are correlated, blocks much less, so the report resamples seeds x blocks
STAT_BLOCKS = 10
WEIGHT_STATS = ("weight_auroc", "selected_fraction", "weight_spread")


def _block_means(values: list, blocks: int = STAT_BLOCKS) -> list:
    """``values`` (one per step, None where undefined) as means over ``blocks`` runs of
    consecutive steps; None for a block without a value."""
    n = len(values)
    k = min(blocks, n)
    out = []
    for b in range(k):
        chunk = [v for v in values[b * n // k : (b + 1) * n // k] if v is not None]
        out.append(sum(chunk) / len(chunk) if chunk else None)
    return out


def _incorrect_weight_share(r: dict) -> float | None:
    """The incorrect SGOs' share of a step's summed ReNIO weights: how far the weights move the
    gradient toward incorrect SGOs, against their share of the SGOs (``1 - correct_share``).
    A step without correct (incorrect) SGOs has share 1 (0)."""
    c = r.get("correct_share")
    if c is None:
        return None
    parts = []
    for share, mean in ((c, r.get("weight_mean_correct")), (1 - c, r.get("weight_mean_incorrect"))):
        if share > 0 and mean is None:
            return None
        parts.append(share * mean if share > 0 else 0.0)
    total = parts[0] + parts[1]
    return parts[1] / total if total > 0 else None


def _record(arm: str, seed: int, config: dict, run_dir: Path) -> dict:
    """The small per-run record kept under ``summaries/``: the run's summary plus its per-step
    weight statistics as means over the run and over ``STAT_BLOCKS`` blocks of steps."""
    summary = json.loads((run_dir / "summary.json").read_text())
    train = []
    if (run_dir / "metrics.jsonl").is_file():
        train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    per_step = {
        "weight_auroc": [r.get("weight_auroc") for r in train],
        "selected_fraction": [r.get("selected_fraction") for r in train],
        "weight_spread": [
            r["weight_max"] - r["weight_min"]
            if r.get("weight_max") is not None and r.get("weight_min") is not None
            else None
            for r in train
        ],
    }
    return {
        "arm": arm,
        "seed": seed,
        "config": config,
        **{k: v for k, v in summary.items() if k != "run_dir"},
        "selected_fraction_mean": _mean(per_step["selected_fraction"]),
        "weight_spread_mean": _mean(per_step["weight_spread"]),
        "weight_mean_correct_mean": _mean([r.get("weight_mean_correct") for r in train]),
        "weight_mean_incorrect_mean": _mean([r.get("weight_mean_incorrect") for r in train]),
        "correct_share_mean": _mean([r.get("correct_share") for r in train]),
        # with ReNIO off the logged weights are the unnormalized ones it would have given
        "incorrect_weight_share_mean": _mean([_incorrect_weight_share(r) for r in train])
        if summary.get("objective") == "renio"
        else None,
        **{f"{k}_blocks": _block_means(v) for k, v in per_step.items() if train},
    }


def run_grid(
    grid_path: str | Path, out: str | Path, *, in_process: bool = False, jobs: int = 1
) -> list[dict]:
    """Run every run of the grid that has no summary yet, ``jobs`` at a time (each its own
    subprocess; renio-train runs one torch thread on a CPU, so ``jobs`` = the cores is the
    natural choice); returns the list of what happened, in the grid's order."""
    import yaml

    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    if in_process and jobs > 1:
        raise ValueError("in-process runs cannot run in parallel: use jobs=1")
    grid = load_grid(grid_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if Path(grid_path).resolve() != (out / "grid.yaml").resolve():
        shutil.copyfile(grid_path, out / "grid.yaml")  # the report reads the arms from here
    (out / ".gitignore").write_text("runs/\n")  # checkpoints and models: large, not the record
    runs = plan(grid)
    done: list[dict | None] = [None] * len(runs)
    pending = []
    for i, (arm, seed, config) in enumerate(runs):
        summary_path = out / "summaries" / arm / f"seed-{seed}.json"
        if summary_path.is_file():
            kept = json.loads(summary_path.read_text())
            if kept.get("config") != config:
                raise ValueError(
                    f"{summary_path} was run with another config than the grid's now "
                    f"({kept.get('config')} vs {config}): use a new --out for a changed grid, "
                    "or delete that summary to rerun it"
                )
            print(f"[{i + 1}/{len(runs)}] {arm} seed {seed}: done (summary kept)", flush=True)
            done[i] = {"arm": arm, "seed": seed, "status": "skipped"}
        else:
            pending.append(i)

    def one(i: int) -> None:
        arm, seed, config = runs[i]
        tag = f"[{i + 1}/{len(runs)}] {arm} seed {seed}"
        config_path = out / "configs" / arm / f"seed-{seed}.yaml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        run_dir = out / "runs" / arm / f"seed-{seed}"
        print(f"{tag}: running in {run_dir}", flush=True)
        t0 = time.perf_counter()
        if grid["arms"][arm]["kind"] == "sft":
            _sft_run(config, {**RUN_DEFAULTS, **grid["common"]}, run_dir, in_process)
        else:
            _distill_run(config_path, run_dir, in_process)
        record = _record(arm, seed, config, run_dir)
        summary_path = out / "summaries" / arm / f"seed-{seed}.json"
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"{tag}: finished in {time.perf_counter() - t0:.0f}s", flush=True)
        done[i] = {"arm": arm, "seed": seed, "status": "ran"}

    if jobs == 1:
        for i in pending:
            one(i)
    else:
        # a failed run stops new ones from starting; the ones running finish (and stay
        # resumable), then the first failure is raised
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(one, i) for i in pending]
            for future in as_completed(futures):
                if future.exception() is not None:
                    for f in futures:
                        f.cancel()
            errors = [f.exception() for f in futures if not f.cancelled() and f.exception()]
        if errors:
            raise errors[0]
    return [d for d in done if d is not None]


def _bits(text: str | None) -> list[int] | None:
    return None if text is None else [int(c) for c in text]


def _fmt(x, pct: bool = True) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def _weight_stat(runs: list[dict], key: str, n_boot: int):
    """An arm's mean of a weight statistic with a two-way (seeds x blocks of steps) bootstrap
    interval; the plain mean over seeds (a float) for summaries kept before blocks were
    recorded; None when no run has it."""
    blocks = [r.get(f"{key}_blocks") for r in runs]
    if all(blocks) and len({len(b) for b in blocks}) == 1:
        keep = [j for j in range(len(blocks[0])) if all(b[j] is not None for b in blocks)]
        if keep:
            return bootstrap_mean([[b[j] for j in keep] for b in blocks], n_boot=n_boot)
    return _mean([r.get(f"{key}_mean") for r in runs])


def _fmt_stat(x) -> str:
    if isinstance(x, Interval):
        return f"{x.estimate:.3f} [{x.low:.3f}, {x.high:.3f}]"
    return _fmt(x, False)


def _arm_rows(grid: dict, records: dict, n_boot: int) -> list[dict]:
    """Per arm of the grid: seeds run, accuracy before, accuracy after and the paired
    difference to its reference (Intervals), the weight statistics, the AUROC per block."""
    rows = []
    for name, arm in grid["arms"].items():
        runs = records.get(name, {})
        seeds = [s for s in arm["seeds"] if s in runs]
        row = {"arm": name, "seeds": seeds, "reference": arm["reference"], "difference": None}
        rows.append(row)
        if not seeds:
            continue
        row["before"] = _mean([runs[s]["accuracy_before"] for s in seeds])
        row["after"] = bootstrap_mean(
            [_bits(runs[s]["eval_correct_after"]) for s in seeds], n_boot=n_boot
        )
        ref = arm["reference"]
        common = [s for s in seeds if s in records.get(ref, {})] if ref else []
        if common:
            row["difference"] = paired_difference(
                [_bits(runs[s]["eval_correct_after"]) for s in common],
                [_bits(records[ref][s]["eval_correct_after"]) for s in common],
                n_boot=n_boot,
            )
            row["difference_seeds"] = common
        for key in WEIGHT_STATS:
            row[key] = _weight_stat([runs[s] for s in seeds], key, n_boot)
        row["auroc_blocks"] = [runs[s].get("weight_auroc_blocks") for s in seeds]
        row["befores"] = {runs[s]["eval_correct_before"] for s in seeds}
    return rows


def report(out: str | Path, *, n_boot: int = 4000, plot: bool = True) -> str:
    """``report.md`` (and ``report.png`` with ``plot``) from the summaries under ``out`` and the
    grid's arms and references."""
    out = Path(out)
    grid = load_grid(out / "grid.yaml")
    records: dict[str, dict[int, dict]] = {}
    for path in sorted((out / "summaries").glob("*/seed-*.json")):
        r = json.loads(path.read_text())
        records.setdefault(r["arm"], {})[r["seed"]] = r
    n_problems = {len(r["eval_correct_after"]) for arm in records.values() for r in arm.values()}
    if len(n_problems) > 1:
        raise ValueError(
            f"the summaries under {out} were evaluated on different numbers of held-out problems "
            f"{sorted(n_problems)}: they cannot be paired; rerun the odd ones with the grid's "
            "eval_problems"
        )
    rows = _arm_rows(grid, records, n_boot)
    lines = [
        "| arm | seeds | acc before | acc after [95% CI] | vs | difference [95% CI] | "
        "weight AUROC | selected | weight spread |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if not row["seeds"]:
            lines.append(f"| {row['arm']} | 0 | - | - | - | - | - | - | - |")
            continue
        acc, d, n = row["after"], row["difference"], len(row["seeds"])
        diff_text = "-"
        if d is not None:
            diff_text = f"{100 * d.estimate:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]"
            if len(row["difference_seeds"]) != n:
                diff_text += f" ({len(row['difference_seeds'])} seeds)"
        lines.append(
            f"| {row['arm']} | {n} | {_fmt(row['before'])} | {_fmt(acc.estimate)} "
            f"[{_fmt(acc.low)}, {_fmt(acc.high)}] | {row['reference'] or '-'} | {diff_text} | "
            + " | ".join(_fmt_stat(row[k]) for k in WEIGHT_STATS)
            + " |"
        )
    lines += [
        "",
        "Where the weights put the gradient (means over steps and seeds): the share of correct "
        "SGOs among the sampled ones, the mean ReNIO weight of correct and incorrect SGOs, and "
        "the incorrect SGOs' share of the summed weights; plain OPD weighs every SGO 1, so its "
        "incorrect share is 1 - the correct share.",
        "",
        "| arm | correct SGOs | weight, correct | weight, incorrect | incorrect share of weight |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        runs = [records[row["arm"]][s] for s in row["seeds"]]
        correct = _mean([r.get("correct_share_mean") for r in runs]) if runs else None
        if correct is None or runs[0].get("objective") not in ("renio", "opd"):
            continue
        if runs[0].get("objective") == "renio":
            keys = ("weight_mean_correct_mean", "weight_mean_incorrect_mean")
            cells = [_fmt(_mean([r.get(k) for r in runs]), False) for k in keys]
            share = _mean([r.get("incorrect_weight_share_mean") for r in runs])
        elif runs[0]["config"].get("sgo_filter", "all") == "all":
            cells, share = ["1", "1"], 1 - correct
        else:
            continue
        lines.append(
            f"| {row['arm']} | {_fmt(correct, False)} | {' | '.join(cells)} | "
            f"{_fmt(share, False)} |"
        )
    notes = []
    if len(set().union(*(row.get("befores", set()) for row in rows))) > 1:
        notes.append(
            "WARNING: the runs' held-out correctness before training differs: they did not all "
            "start from the same checkpoint, or not on the same held-out problems."
        )
    if plot and any(row["seeds"] for row in rows):
        from .plots import experiment_plot

        experiment_plot(out / "report.png", rows)
        notes.append("![accuracy, differences and weight AUROC per arm](report.png)")
    text = "\n".join(
        [
            f"# Experiment report: {out.name}",
            "",
            f"Held-out problems per run: {sorted(n_problems)}. Accuracies in percent (greedy); "
            "CIs: 95% percentile bootstrap over seeds and held-out problems (two-way, "
            f"{n_boot} resamples); differences are paired (same seeds, same problems) against "
            "the arm in `vs`. Weight AUROC (incorrect vs correct SGOs; with ReNIO off, of the "
            "weights ReNIO would have given), selected token fraction (r >= threshold) and "
            "weight spread (max - min of the weights applied in a step) are means over steps "
            "and seeds, with 95% bootstrap intervals over seeds and the run's "
            f"{STAT_BLOCKS} blocks of consecutive steps (none for summaries without blocks).",
            "",
            *lines,
            *([""] + notes if notes else []),
            "",
        ]
    )
    (out / "report.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(
        prog="renio-train experiment",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--grid", help="grid YAML (default: OUT/grid.yaml, to continue a grid)")
    p.add_argument("--out", required=True, help="experiment directory")
    p.add_argument(
        "--report-only", action="store_true", help="only rewrite OUT/report.md and report.png"
    )
    p.add_argument("--bootstrap", type=int, default=4000, help="bootstrap resamples")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at a time, each a subprocess on one torch thread (default 1; on a CPU "
        "machine the number of cores)",
    )
    args = p.parse_args(argv)
    if not args.report_only:
        grid = args.grid or str(Path(args.out) / "grid.yaml")
        run_grid(grid, args.out, jobs=args.jobs)
    text = report(args.out, n_boot=args.bootstrap)
    print(text)
    return text


if __name__ == "__main__":
    main()
