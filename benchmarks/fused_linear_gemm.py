"""GFLOP/s of the fused-linear loss's chunk matmuls against the rows per chunk (CPU, fp32).

The sweep's four matmuls per chunk of ``rows`` tokens, each timed through the loss's own GEMM
entry (``ops.gemm.Gemm``: oneDNN's linear for the first two where available, see
``config.FUSED_LINEAR_CPU_ONEDNN``) and through plain ``torch.mm`` (MKL's sgemm) into a reused
buffer:

* logits: ``hidden[rows] @ W.T`` (twice per chunk: student and teacher);
* grad_hidden: ``u @ W`` into the rows of the ``(N, H)`` result;
* grad_weight: ``G.addmm_(u.T, s * hidden[rows])`` into the ``(V, H)`` fp32 accumulator (MKL on
  both lines: it accumulates in place).

Each row count is timed in every round, the row counts interleaved within a round, and the
median over rounds reported, so a load change on a shared machine hits every row count alike.
Also reported: one pass over a weight-sized buffer (``G += c * O``, what closing a sequence that
spans chunks costs when ``G`` already holds others). Writes a markdown table; the chunk-size
policy in ``config`` (``FUSED_LINEAR_TOTAL_PER_VOCAB``, ``FUSED_LINEAR_MAX_ROWS``) cites it.

    python benchmarks/fused_linear_gemm.py
    python benchmarks/fused_linear_gemm.py --vocab 32000 --rows 64,128,256 --rounds 3   # quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.runner import cpu_model, write_lines
from renio_kernels.ops.gemm import Gemm


def load() -> str:
    """The 1-minute load average and the busiest other processes (``top``), for the record."""
    avg = os.getloadavg()[0]
    try:
        top = subprocess.run(["top", "-bn1", "-w", "200"], capture_output=True, text=True,
                             timeout=10).stdout.splitlines()  # fmt: skip
        head = next(i for i, line in enumerate(top) if line.lstrip().startswith("PID"))
        busy = [
            " ".join(line.split()[8:9] + line.split()[11:12])
            for line in top[head + 1 : head + 4]
            if float(line.split()[8]) > 5.0 and int(line.split()[0]) != os.getpid()
        ]
    except (OSError, StopIteration, ValueError, IndexError, subprocess.SubprocessError):
        busy = []
    return f"load {avg:.2f}" + (f"; busy: {', '.join(busy)}" if busy else "; no other busy process")


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def scan(vocab: int, hidden: int, rows_list: list[int], rounds: int) -> list[str]:
    """The table of one vocabulary size."""
    w = torch.randn(vocab, hidden) / hidden**0.5
    acc = torch.zeros(vocab, hidden)
    other = torch.zeros(vocab, hidden)
    longest = max(rows_list)
    h = torch.randn(longest, hidden)
    u = torch.randn(longest, vocab) * 1e-3
    logits = torch.empty(longest, vocab)
    grad_h = torch.empty(longest, hidden)
    s = torch.rand(longest)
    gemm = Gemm.for_operands(h, w)
    kinds = {
        "logits": lambda r: gemm.mm(h[:r], w.T),
        "logits mm": lambda r: torch.mm(h[:r], w.T, out=logits[:r]),
        "grad_hidden": lambda r: gemm.mm(u[:r], w, out=grad_h[:r]),
        "grad_hidden mm": lambda r: torch.mm(u[:r], w, out=grad_h[:r]),
        "grad_weight": lambda r: gemm.addmm_(acc, u[:r].T, h[:r] * s[:r, None]),
    }
    times = {(k, r): [] for k in kinds for r in rows_list}
    merge = []
    for fn in kinds.values():  # warm up every shape once
        for r in rows_list:
            fn(r)
    for rnd in range(rounds):
        order = rows_list if rnd % 2 == 0 else rows_list[::-1]
        for r in order:
            for k, fn in kinds.items():
                times[(k, r)].append(_time(lambda fn=fn, r=r: fn(r)))
        merge.append(_time(lambda: acc.add_(other, alpha=0.5)))
    path = "oneDNN" if gemm.onednn else "torch.mm"
    lines = [
        f"### V = {vocab}, H = {hidden}",
        "",
        f"GFLOP/s; the loss's GEMM entry ({path} for logits and grad_hidden, MKL addmm_ for "
        "grad_weight) and plain torch.mm (MKL) into a reused buffer.",
        "",
        "| rows per chunk | logits | logits (torch.mm) | grad_hidden | grad_hidden (torch.mm) | "
        "grad_weight | four per chunk (2 logits + 2 grads) | same, all torch.mm | "
        "ms per chunk (ours) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows_list:
        flops = 2.0 * r * vocab * hidden
        med = {k: statistics.median(times[(k, r)]) for k in kinds}
        ours = 2 * med["logits"] + med["grad_hidden"] + med["grad_weight"]
        plain = 2 * med["logits mm"] + med["grad_hidden mm"] + med["grad_weight"]
        cells = " | ".join(f"{flops / med[k] / 1e9:.0f}" for k in kinds)
        lines.append(
            f"| {r} | {cells} | {4 * flops / ours / 1e9:.0f} | {4 * flops / plain / 1e9:.0f} | "
            f"{ours * 1e3:.1f} |"
        )
    return lines + [
        "",
        f"One pass over a (V, H) fp32 buffer (`G += c * O`): "
        f"{statistics.median(merge) * 1e3:.1f} ms.",
        "",
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vocab", default="32000,151936")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--rows", default="16,32,64,96,128,192,256,384,512,1024")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/fused_linear_gemm.md")
    args = p.parse_args(argv)
    rows_list = [int(r) for r in args.rows.split(",")]
    before = load()
    lines = []
    torch.manual_seed(0)
    for vocab in (int(v) for v in args.vocab.split(",")):
        table = scan(vocab, args.hidden, rows_list, args.rounds)
        print("\n".join(table), flush=True)
        lines += table
    after = load()
    header = [
        "# Fused-linear chunk matmuls: GFLOP/s against rows per chunk",
        "",
        f"Machine: {cpu_model()}, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}. fp32. Median of {args.rounds} rounds, row counts interleaved. "
        f"Before: {before}. After: {after} (the load average includes this scan's own "
        "threads). The machine is shared; other processes' load shows as noise. Produced by "
        "`python benchmarks/fused_linear_gemm.py`.",
        "",
    ]
    write_lines(args.out, header + lines)


if __name__ == "__main__":
    main()
