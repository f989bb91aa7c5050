"""``renio-train``: the on-policy distillation loop.

Per optimizer step and micro-batch: take prompts -> the student samples completions -> the
answers are checked -> (optionally) only correct or incorrect ones are kept -> student and
teacher run over prompt + completion -> the ReNIO loss on the completion positions -> backward.
Then the gradients are all-reduced across ranks, rescaled to the step's normalization
(``--weight-scope global``, ``DistillLoss.finish_step``), clipped, and AdamW steps under warmup +
cosine.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import random
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from ..ops.backends import resolve_backend
from .checkpoint import (
    clean_partial_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from .config import TrainConfig, given_values, loss_options, read_config_file
from .dist import DistInfo, all_gather_objects, allreduce_grads, init_distributed, shutdown
from .distill import DistillLoss
from .ema import TeacherEMA
from .evaluate import evaluate
from .generation import encode_prompts, sample
from .metrics import MetricsWriter, auroc, peak_memory_mb, read_metrics, records_to_resume
from .models import (
    check_vocab_compatible,
    load_model,
    load_tokenizer,
    resolve_attn_implementation,
)
from .tasks import TrainStream, eval_pool, format_prompt, is_correct, load_jsonl

__all__ = ["main", "run"]


def _log(info: DistInfo, *msg) -> None:
    if info.main:
        print(*msg, flush=True)


def _load_data(cfg: TrainConfig):
    """Training stream and held-out problems; every data error surfaces before the run dir."""
    if cfg.data == "synthetic":
        train_records = None
        held_out = load_jsonl(cfg.eval_data) if cfg.eval_data else eval_pool()
    else:
        records = load_jsonl(cfg.data)
        if cfg.eval_data:
            train_records, held_out = records, load_jsonl(cfg.eval_data)
        else:
            if len(records) <= cfg.eval_problems:
                raise ValueError(
                    f"{cfg.data} has {len(records)} records, not more than --eval-problems "
                    f"{cfg.eval_problems} held out for evaluation: pass --eval-data FILE, or a "
                    "smaller --eval-problems"
                )
            cut = len(records) - cfg.eval_problems
            train_records, held_out = records[:cut], records[cut:]
    return TrainStream(cfg.seed, train_records), held_out[: cfg.eval_problems]


def _lora(model, cfg: TrainConfig):
    try:
        import peft
    except ImportError:
        raise ValueError(
            "--lora-r needs the peft package (pip install peft), or use "
            "--lora-r 0 for full fine-tuning"
        ) from None
    config = peft.LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, config)


def _load_models(cfg: TrainConfig, device: torch.device):
    attn = resolve_attn_implementation(cfg.attn_implementation, device)
    tokenizer = load_tokenizer(cfg.student, "student")
    student = load_model(cfg.student, "student", attn).to(device)
    if cfg.mode == "opd":
        teacher_tok = load_tokenizer(cfg.teacher, "teacher")
        teacher = load_model(cfg.teacher, "teacher", attn).to(device)
        check_vocab_compatible(
            tokenizer,
            teacher_tok,
            student.get_output_embeddings().weight.shape[0],
            teacher.get_output_embeddings().weight.shape[0],
        )
    elif cfg.teacher_ema is None:
        teacher = copy.deepcopy(student)  # the frozen initial student (no LoRA adapters)
    if cfg.lora_r > 0:
        student = _lora(student, cfg)
    if cfg.teacher_ema is not None:
        teacher = copy.deepcopy(student)  # after LoRA, so that the average covers the adapters
    teacher.eval().requires_grad_(False)
    student.train()
    return tokenizer, student, teacher


def _check_out(out: Path, resuming: bool) -> None:
    """``--out`` can be (or become) a run directory: not a file, nor under one, and empty unless
    the run is resumed there."""
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            what = "--out" if path == out else f"--out {str(out)!r}: its parent"
            raise ValueError(
                f"{what} {str(path)!r} is an existing file, not a directory: choose another "
                "--out (a new or empty directory)"
            )
    if not resuming and out.is_dir() and any(out.iterdir()):
        raise FileExistsError(
            f"run directory {str(out)!r} exists and is not empty: choose another --out, "
            f"or continue it with --resume {out}"
        )


def _make_run_dir(cfg: TrainConfig, info: DistInfo, resuming: bool) -> Path:
    """Create (or, resuming, take over) the run directory: the first write of a run, after every
    check has passed."""
    run_dir = Path(cfg.out)
    _check_out(run_dir, resuming)
    info.barrier()  # every rank has checked before rank 0 creates it
    if info.main:
        import yaml

        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "COMPLETE").unlink(missing_ok=True)
        for stale in clean_partial_checkpoints(run_dir):
            print(f"removed {stale}: a checkpoint a stopped run had not finished", flush=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    info.barrier()
    return run_dir


def _importable(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _preflight(cfg: TrainConfig, device: torch.device) -> None:
    """Checks that need the device or the installed packages, before anything is loaded."""
    if not _importable("yaml"):
        raise ValueError("renio-train needs the pyyaml package (pip install pyyaml)")
    if cfg.backend != "auto":
        divergence = loss_options(cfg).divergence or "forward_kl"
        try:
            resolve_backend(cfg.backend, device, divergence)
        except ValueError as err:
            raise ValueError(f"--backend {cfg.backend}: {err}") from None
    for flag, module, package in (
        ("plots", "matplotlib", "matplotlib"),
        ("progress", "tqdm", "tqdm"),
    ):
        if getattr(cfg, flag) and not _importable(module):
            warnings.warn(
                f"--{flag} needs the {package} package, which is not installed: running without "
                f"(pip install {package}, or pass --{flag} false to silence this)",
                RuntimeWarning,
                stacklevel=3,
            )
            setattr(cfg, flag, False)


def _check_ignore_index(cfg: TrainConfig, student) -> None:
    vocab = student.get_output_embeddings().weight.shape[0]
    if 0 <= cfg.ignore_index < vocab:
        raise ValueError(
            f"--ignore-index {cfg.ignore_index} is a token id of the student's vocabulary "
            f"(0..{vocab - 1}): every sampled occurrence of that token would be left out of the "
            "loss. Use a negative value (the default is -100)"
        )


def _lr_lambda(cfg: TrainConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _keep_index(correct: list[bool], sgo_filter: str) -> list[int]:
    if sgo_filter == "correct":
        return [i for i, c in enumerate(correct) if c]
    if sgo_filter == "incorrect":
        return [i for i, c in enumerate(correct) if not c]
    return list(range(len(correct)))


def _weight_scores(stats: dict, cfg: TrainConfig) -> list[float]:
    """The ReNIO weights, or with ReNIO off the weights it would have given (for the AUROC)."""
    if cfg.objective == "renio":
        return stats["weights"].double().tolist()
    sel = stats["selected"]
    rbar = (stats["log_ratio"].double() * sel).sum(-1) / sel.sum(-1).clamp(min=1)
    return torch.exp(rbar / cfg.weight_temperature).tolist()


def _run_eval(student, tokenizer, problems, cfg, info: DistInfo) -> dict:
    """Greedy held-out accuracy (each rank scores a slice) and, in the held-out problems' order,
    each problem's correctness as a string of 0/1 (what a paired bootstrap over problems needs)."""
    part = problems[info.rank :: info.world]
    result = evaluate(
        student,
        tokenizer,
        part,
        cfg.prompt_template,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.eval_batch_size,
    )
    slices = all_gather_objects(result["correct"], info)
    correct = [False] * len(problems)
    for rank, got in enumerate(slices):
        correct[rank :: info.world] = got
    acc = sum(correct) / max(1, len(correct))
    return {"eval_accuracy": acc, "correct": "".join("1" if c else "0" for c in correct)}


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def run(cfg: TrainConfig) -> dict:
    """One training run; returns its summary (also written to RUN/summary.json)."""
    info, device = init_distributed(cfg.device)
    try:
        return _run(cfg, info, device)
    finally:
        shutdown(info)


def _run(cfg: TrainConfig, info: DistInfo, device: torch.device) -> dict:
    t_start = time.perf_counter()
    _quiet_transformers()
    if cfg.threads or device.type == "cpu":
        torch.set_num_threads(cfg.threads or 1)
    # Everything that can fail on bad input runs before the run directory is created or, on
    # --resume, touched (config.yaml, COMPLETE, metrics.jsonl).
    _preflight(cfg, device)
    resume_ckpt = latest_checkpoint(Path(cfg.resume)) if cfg.resume else None
    if cfg.out is None:
        cfg.out = (
            str(resume_ckpt.parent.parent)
            if resume_ckpt
            else f"runs/{datetime.now().strftime('%Y%m%d-%H%M%S')}-{cfg.objective}"
        )
    _check_out(Path(cfg.out), resuming=resume_ckpt is not None)
    seed = cfg.seed + 1000 * info.rank
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (what libraries draw from)
    torch.manual_seed(seed)
    stream, held_out = _load_data(cfg)
    tokenizer, student, teacher = _load_models(cfg, device)
    _check_ignore_index(cfg, student)
    if cfg.objective == "sampled-reverse-kl" and cfg.loss_impl == "fused-linear":
        _log(info, "note: the sampled reverse KL has no fused-linear form; using the logits path")
        cfg.loss_impl = "logits"
    loss_fn = DistillLoss(cfg, loss_options(cfg))
    loss_fn.check_models(student, teacher)
    teacher_ema = None
    if cfg.teacher_ema is not None:
        teacher_ema = TeacherEMA(student, teacher, cfg.teacher_ema)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))

    start_step, kept_records = 0, None
    if resume_ckpt is not None:
        start_step, rng = load_checkpoint(
            resume_ckpt,
            rank=info.rank,
            world=info.world,
            model=student,
            optimizer=optimizer,
            scheduler=scheduler,
            ema_state=loss_fn.ema_state,
            teacher_ema=teacher_ema,
        )
        if start_step > cfg.steps:
            raise ValueError(
                f"--resume {cfg.resume}: the checkpoint {str(resume_ckpt)!r} is at step "
                f"{start_step}, past --steps {cfg.steps}; pass --steps {start_step} or more"
            )
        if info.main:
            kept_records = records_to_resume(Path(cfg.out) / "metrics.jsonl", start_step)

    run_dir = _make_run_dir(cfg, info, resuming=resume_ckpt is not None)
    writer = MetricsWriter(run_dir, cfg.tensorboard) if info.main else None
    if writer and kept_records is not None:
        writer.replace(kept_records)
    if resume_ckpt is not None:
        _log(info, f"resumed from {resume_ckpt} at step {start_step}")
    if start_step == 0 and cfg.eval_problems > 0:
        ev = _run_eval(student, tokenizer, held_out, cfg, info)
        _log(
            info,
            f"held-out accuracy before: {ev['eval_accuracy']:.3f} ({len(held_out)} problems, "
            "greedy)",
        )
        if writer:
            writer.write({"kind": "eval", "step": 0, **ev})
    if resume_ckpt is not None:
        set_rng_state(rng)  # last, so nothing above shifts the random stream

    progress = None
    if info.main and cfg.progress:
        from tqdm.auto import tqdm

        progress = tqdm(
            total=cfg.steps, initial=start_step, desc="distill", file=sys.stderr, dynamic_ncols=True
        )
    for step in range(start_step + 1, cfg.steps + 1):
        record = _train_step(
            cfg,
            step,
            stream,
            tokenizer,
            student,
            teacher,
            loss_fn,
            params,
            optimizer,
            scheduler,
            info,
            device,
            teacher_ema,
        )
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            ev = _run_eval(student, tokenizer, held_out, cfg, info)
            if writer:
                writer.write({"kind": "eval", "step": step, **ev})
        if writer:
            writer.write(record)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(
                loss=f"{record['loss']:.4f}",
                acc=f"{record['correct_share']:.2f}",
                tok_s=f"{record['train_tokens_per_s']:.0f}",
            )
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
            save_checkpoint(
                run_dir,
                step,
                rank=info.rank,
                world=info.world,
                barrier=info.barrier,
                model=student,
                optimizer=optimizer,
                scheduler=scheduler,
                ema_state=loss_fn.ema_state,
                teacher_ema=teacher_ema,
                keep=cfg.keep_checkpoints,
            )
    if progress is not None:
        progress.close()

    if cfg.eval_problems > 0:
        ev = _run_eval(student, tokenizer, held_out, cfg, info)
        if writer:
            writer.write({"kind": "eval", "step": cfg.steps, **ev})
    summary = {}
    if info.main:
        final = run_dir / "final"
        shutil.rmtree(final, ignore_errors=True)
        student.save_pretrained(final)
        tokenizer.save_pretrained(final)
        writer.close()
        records = read_metrics(writer.path)
        summary = _summary(cfg, records, run_dir, time.perf_counter() - t_start)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if cfg.plots:
            from .plots import make_plots

            try:
                make_plots(run_dir, records)
            except Exception as err:  # the run itself is done: a plot must not undo it
                warnings.warn(
                    f"the plots could not be made ({type(err).__name__}: {err}); the run is "
                    "complete without them",
                    RuntimeWarning,
                    stacklevel=2,
                )
        (run_dir / "COMPLETE").write_text(datetime.now().isoformat() + "\n")
    info.barrier()
    return summary


def _summary(cfg, records: list[dict], run_dir: Path, seconds: float) -> dict:
    evals = [r for r in records if r["kind"] == "eval"]
    train = [r for r in records if r["kind"] == "train"]
    aucs = [r["weight_auroc"] for r in train if r.get("weight_auroc") is not None]
    return {
        "run_dir": str(run_dir),
        "objective": cfg.objective,
        "mode": cfg.mode,
        "teacher_ema": cfg.teacher_ema,
        "steps": cfg.steps,
        "accuracy_before": evals[0]["eval_accuracy"] if evals and evals[0]["step"] == 0 else None,
        "accuracy_after": evals[-1]["eval_accuracy"] if evals else None,
        "eval_problems": cfg.eval_problems,
        # per held-out problem, in order, 1 = solved (greedy): paired comparisons resample these
        "eval_correct_before": evals[0].get("correct") if evals and evals[0]["step"] == 0 else None,
        "eval_correct_after": evals[-1].get("correct") if evals else None,
        "weight_auroc_mean": sum(aucs) / len(aucs) if aucs else None,
        "weight_auroc_batches": len(aucs),
        "train_correct_share_first10": _mean([r["correct_share"] for r in train[:10]]),
        "train_correct_share_last10": _mean([r["correct_share"] for r in train[-10:]]),
        "seconds": round(seconds, 1),
    }


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def _skip_for_global_scope(loss_fn, keep: list[int], cfg, info: DistInfo, device) -> bool:
    """Whether a global-scope micro-batch with nothing kept here (``--sgo-filter``) is done: if
    another rank kept some, this one joins the step's normalization with zero sequences; if
    none did, no rank calls the loss (an all-empty first call would leave nothing to normalize
    by)."""
    if loss_fn.normalizer is None or cfg.sgo_filter == "all":
        return False
    kept_anywhere = sum(all_gather_objects(len(keep), info)) > 0
    if keep:
        return False
    if kept_anywhere:
        loss_fn.contribute_nothing(device)
    return True


def _final_weights(sums: dict, scores: list[float], factor: float, cfg) -> list[float]:
    """The logged ReNIO weights times ``factor``: from the normalization the global scope's
    calls returned (the step's first micro-batch's) to the step's own."""
    if cfg.objective != "renio" or factor == 1.0:
        return scores
    for key in ("w_sum", "w_min", "w_max"):
        sums[key] *= factor
    return [s * factor for s in scores]


def _train_step(
    cfg,
    step,
    stream,
    tokenizer,
    student,
    teacher,
    loss_fn,
    params,
    optimizer,
    scheduler,
    info: DistInfo,
    device,
    teacher_ema: TeacherEMA | None = None,
) -> dict:
    gen_time = train_time = 0.0
    gen_tokens = train_tokens = 0
    losses, correct_all, scores, score_correct = [], [], [], []
    n_trained = 0
    sums = {
        "divergence": 0.0,
        "w_min": math.inf,
        "w_max": -math.inf,
        "w_sum": 0.0,
        "n_seq": 0,
        "selected": 0.0,
        "valid": 0.0,
        "log_ratio": 0.0,
    }
    for micro in range(cfg.grad_accum):
        base = (((step - 1) * cfg.grad_accum + micro) * info.world + info.rank) * cfg.batch_size
        problems = [stream[base + i] for i in range(cfg.batch_size)]
        t0 = time.perf_counter()
        rollout = sample(
            student,
            tokenizer,
            [format_prompt(cfg.prompt_template, p) for p in problems],
            max_new_tokens=cfg.max_new_tokens,
            do_sample=True,
            temperature=cfg.sample_temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
        )
        gen_time += time.perf_counter() - t0
        gen_tokens += int(rollout.completion_mask.sum())
        correct = [is_correct(t, p["answer"]) for t, p in zip(rollout.texts, problems, strict=True)]
        correct_all += correct
        keep = _keep_index(correct, cfg.sgo_filter)
        if _skip_for_global_scope(loss_fn, keep, cfg, info, device):
            continue
        teacher_prompt = None
        if cfg.mode == "opsd":
            teacher_prompt = encode_prompts(
                tokenizer, [format_prompt(cfg.teacher_prompt_template, p) for p in problems], device
            )
        # An empty selection still runs forward/backward (times 0) so the ranks stay in step.
        sel = keep if keep else list(range(len(correct)))
        if len(sel) < len(correct):
            rollout = rollout.select(sel)
            if teacher_prompt is not None:
                idx = torch.tensor(sel, device=device)
                teacher_prompt = (teacher_prompt[0][idx], teacher_prompt[1][idx])
        t0 = time.perf_counter()
        with _autocast(cfg, device):
            loss, stats = loss_fn(student, teacher, rollout, teacher_prompt)
        scale = (1.0 if keep else 0.0) * loss_fn.micro_batch_scale(cfg.grad_accum)
        (loss * scale).backward()
        train_time += time.perf_counter() - t0
        train_tokens += int(rollout.prompt_mask.sum() + rollout.completion_mask.sum())
        if not keep:
            continue
        n_trained += len(keep)
        losses.append(float(loss.detach()))
        if stats is not None:
            w = stats["weights"].float()
            mask = rollout.completion_mask.bool()
            sums["divergence"] += float(stats["divergence"].sum())
            sums["w_min"] = min(sums["w_min"], float(w.min()))
            sums["w_max"] = max(sums["w_max"], float(w.max()))
            sums["w_sum"] += float(w.sum())
            sums["n_seq"] += len(sel)
            sums["selected"] += float((stats["selected"] & mask).sum())
            sums["valid"] += float(mask.sum())
            sums["log_ratio"] += float((stats["log_ratio"] * mask).sum())
            scores += _weight_scores(stats, cfg)
            score_correct += [correct[i] for i in sel]
    t0 = time.perf_counter()
    allreduce_grads(params, info)
    step_loss, weight_factor = loss_fn.finish_step(params)  # before clipping
    scores = _final_weights(sums, scores, weight_factor, cfg)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    if teacher_ema is not None:
        teacher_ema.update()  # after the step: every rank averages the same parameters
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    train_time += time.perf_counter() - t0

    gathered = all_gather_objects(
        (
            losses,
            correct_all,
            scores,
            score_correct,
            sums,
            gen_tokens,
            gen_time,
            train_tokens,
            train_time,
            n_trained,
        ),
        info,
    )
    losses = [x for g in gathered for x in g[0]]
    correct_all = [x for g in gathered for x in g[1]]
    scores = [x for g in gathered for x in g[2]]
    score_correct = [x for g in gathered for x in g[3]]
    tot = {
        k: sum(g[4][k] for g in gathered)
        for k in ("divergence", "w_sum", "n_seq", "selected", "valid", "log_ratio")
    }
    w_min = min(g[4]["w_min"] for g in gathered)
    w_max = max(g[4]["w_max"] for g in gathered)
    n_seq = max(1, tot["n_seq"])
    incorrect = [not c for c in score_correct]
    w_c = [s for s, c in zip(scores, score_correct, strict=True) if c]
    w_i = [s for s, c in zip(scores, score_correct, strict=True) if not c]
    record = {
        "kind": "train",
        "step": step,
        "loss": step_loss if step_loss is not None else (_mean(losses) if losses else 0.0),
        "lr": scheduler.get_last_lr()[0],
        "grad_norm": float(grad_norm),
        "divergence_mean": tot["divergence"] / n_seq if tot["n_seq"] else None,
        "weight_mean": tot["w_sum"] / n_seq if tot["n_seq"] else None,
        "weight_min": w_min if math.isfinite(w_min) else None,
        "weight_max": w_max if math.isfinite(w_max) else None,
        "selected_fraction": tot["selected"] / tot["valid"] if tot["valid"] else None,
        "log_ratio_mean": tot["log_ratio"] / tot["valid"] if tot["valid"] else None,
        "correct_share": sum(correct_all) / max(1, len(correct_all)),
        "sgos_trained": sum(g[9] for g in gathered),
        "weight_auroc": auroc(scores, incorrect),
        "weight_mean_correct": _mean(w_c),
        "weight_mean_incorrect": _mean(w_i),
        "gen_tokens_per_s": sum(g[5] for g in gathered) / max(1e-9, max(g[6] for g in gathered)),
        "train_tokens_per_s": sum(g[7] for g in gathered) / max(1e-9, max(g[8] for g in gathered)),
        "peak_memory_mb": peak_memory_mb(device),
    }
    return record


def _compare(cfg: TrainConfig) -> dict:
    """Run each objective from the same start (same seed, data, models); print side by side."""
    base_out = Path(cfg.out or f"runs/{datetime.now().strftime('%Y%m%d-%H%M%S')}-compare")
    results = {}
    for objective in cfg.compare_objectives():
        sub = copy.deepcopy(cfg)
        sub.compare, sub.objective, sub.out = None, objective, str(base_out / objective)
        sub.use_renio = None
        results[objective] = run(sub)
    if results and all(results.values()):
        rows = [("objective", "acc before", "acc after", "weight AUROC", "seconds")]
        for name, s in results.items():
            rows.append(
                (
                    name,
                    _fmt(s["accuracy_before"]),
                    _fmt(s["accuracy_after"]),
                    _fmt(s["weight_auroc_mean"]),
                    f"{s['seconds']:.0f}",
                )
            )
        print("\n".join("  ".join(f"{c:>13}" for c in row) for row in rows))
        (base_out / "compare.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def resolve_config(argv: list[str] | None) -> TrainConfig:
    """The run's config: defaults < ``--config`` file < flags; with ``--resume``, the run's saved
    ``config.yaml`` under the values given now (every given flag wins, even one equal to its
    default). Reads only: nothing is written before the run starts."""
    given = given_values(argv)
    values = dict(given)
    if given.get("resume"):
        saved = Path(given["resume"])
        run_dir = saved if (saved / "config.yaml").is_file() else saved.parent.parent
        if (run_dir / "config.yaml").is_file():
            # A run saved before the weight scope existed normalized per micro-batch: resume it
            # so, not under the script's newer default.
            saved_values = {
                "weight_scope": "micro_batch",
                **read_config_file(run_dir / "config.yaml"),
            }
            values = {**saved_values, **given}
            values["out"] = given.get("out", str(run_dir))  # continue in place by default
    cfg = TrainConfig(**values)
    cfg.validate()
    if cfg.resume and cfg.compare:
        raise ValueError(
            "--resume continues one run; resume each of a --compare's runs "
            "separately (RUN/<objective>)"
        )
    return cfg


def main(argv: list[str] | None = None) -> dict:
    """Run ``renio-train`` with ``argv``; returns the summary (``summary.json``)."""
    cfg = resolve_config(argv)
    if cfg.compare:
        return _compare(cfg)
    summary = run(cfg)
    if summary:
        print(
            f"accuracy before: {_fmt(summary['accuracy_before'])}  after: "
            f"{_fmt(summary['accuracy_after'])}  ({summary['eval_problems']} held-out problems, "
            f"greedy)"
        )
        print(
            f"mean weight AUROC (incorrect vs correct SGOs): {_fmt(summary['weight_auroc_mean'])}"
            f" over {summary['weight_auroc_batches']} batches; {summary['seconds']:.0f}s"
        )
        print(f"run directory: {summary['run_dir']}")
    return summary


def _quiet_transformers() -> None:
    """Per-file weight-loading progress bars would drown the run's own progress line."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
