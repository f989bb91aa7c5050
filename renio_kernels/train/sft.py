"""``renio-train sft``: supervised training on written-out solutions (makes the shipped models).

The embedded teacher and student are made by::

    renio-train sft --preset teacher --out renio_kernels/train/assets/teacher
    renio-train sft --preset student --out renio_kernels/train/assets/student

Both train from scratch on the synthetic task with the loss on the solution tokens only; the
teacher is wider, deeper and trained longer, so it solves most held-out problems and the student
clearly fewer. ``--init DIR`` fine-tunes an existing model on ``--data FILE.jsonl`` instead.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from .evaluate import evaluate
from .models import build_char_tokenizer, load_model, load_tokenizer, tiny_llama
from .tasks import DEFAULT_PROMPT, TrainStream, eval_pool, format_prompt, load_jsonl

__all__ = ["PRESETS", "main", "sft_batch"]

# hidden, layers, heads, steps, learning rate
PRESETS = {
    "teacher": {"hidden": 128, "layers": 3, "heads": 4, "steps": 2500, "lr": 3e-3},
    "student": {"hidden": 64, "layers": 2, "heads": 4, "steps": 1000, "lr": 3e-3},
}


def sft_batch(tokenizer, problems, template: str):
    """Right-padded ``prompt + solution + eos`` with labels on the solution and eos only."""
    rows, labels = [], []
    for p in problems:
        prompt = tokenizer(format_prompt(template, p), add_special_tokens=False)["input_ids"]
        answer = tokenizer(p["solution"], add_special_tokens=False)["input_ids"]
        ids = prompt + answer + [tokenizer.eos_token_id]
        rows.append(ids)
        labels.append([-100] * len(prompt) + answer + [tokenizer.eos_token_id])
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    label_t = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    return input_ids, mask, label_t


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="renio-train sft",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="directory to save the model and tokenizer in")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="student",
        help="size and schedule of a from-scratch tiny model",
    )
    p.add_argument("--init", default=None, help="fine-tune this model directory instead")
    p.add_argument("--data", default="synthetic", help="'synthetic' or a JSONL file")
    p.add_argument("--steps", type=int, default=None, help="default: the preset's")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="default: the preset's")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-template", default=DEFAULT_PROMPT)
    p.add_argument("--eval-problems", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _quiet_transformers()
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    steps = args.steps if args.steps is not None else preset["steps"]
    lr = args.lr if args.lr is not None else preset["lr"]
    torch.manual_seed(args.seed)
    records = None if args.data == "synthetic" else load_jsonl(args.data)
    if args.init:
        tokenizer = load_tokenizer(args.init, "init")
        model = load_model(args.init, "init", "sdpa")
    else:
        tokenizer = build_char_tokenizer()
        model = tiny_llama(len(tokenizer), preset["hidden"], preset["layers"], preset["heads"])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"sft {args.preset}: {n_params / 1e6:.2f}M parameters, {steps} steps")
    stream = TrainStream(args.seed, records)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        progress = (step - args.warmup_steps) / max(1, steps - args.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        batch = [stream[step * args.batch_size + i] for i in range(args.batch_size)]
        input_ids, mask, labels = sft_batch(tokenizer, batch, args.prompt_template)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(
                f"step {step:5d} loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
    model.eval()
    problems = (
        eval_pool()[: args.eval_problems] if records is None else records[: args.eval_problems]
    )
    result = evaluate(model, tokenizer, problems, args.prompt_template, max_new_tokens=64)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {
        "preset": args.preset,
        "steps": steps,
        "lr": lr,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "parameters": n_params,
        "heldout_accuracy": result["accuracy"],
        "heldout_problems": len(problems),
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "sft_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"held-out accuracy {result['accuracy']:.3f} on {len(problems)} problems; saved to {out}")


def _quiet_transformers() -> None:
    """Per-file weight-loading progress bars would drown the run's own progress line."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
