"""Fused-linear loss against Liger-Kernel's chunked fused-linear JSD and the 4-matmul floor.

One process, CPU, fp32, forward+backward. Per shape (V, tokens) it times, interleaved round by
round (the order rotating, so a load change on a shared machine hits every provider alike):

* ``ours``: ``fused_linear_renio_loss`` with its defaults (ReNIO weights, ``batch_mean``,
  ``beta=0``: forward KL), backend auto (the native CPU row kernels when built);
* ``liger (compiled)`` / ``liger (eager)``: ``LigerFusedLinearJSDLoss(weight_hard_loss=0,
  weight_soft_loss=1, beta=0)`` with ``compiled=True`` / ``False`` (plain forward KL, no ReNIO
  weights; its default 1024-token chunks), called as ``benchmarks/providers.py`` does;
* the floor: the matmuls of our own plan (the same chunks) timed alone. ``logits (torch.mm)`` is
  one pass of ``torch.mm(hidden[chunk], W.T)`` into a reused buffer over all tokens: ``4 x`` it is
  the target's floor. The same through the loss's GEMM entry (``ops.gemm.Gemm``: oneDNN's linear
  on CPU, ``config.FUSED_LINEAR_CPU_ONEDNN``), ``logits``, gives a second floor, ``4 x logits``,
  and ``sum of 4 = 2 x logits + grad_hidden + grad_weight`` (``u @ W``, and ``G.addmm_(u.T,
  hidden[chunk])`` on MKL) is what our schedule's matmuls take on their own.

Reports medians with [p20, p80] and the ratios the targets are stated in (at least 1.2x the faster
Liger mode's speed; at most 1.15x the floor), with the load before and after. Writes markdown.

    python benchmarks/fused_linear_floor.py
    python benchmarks/fused_linear_floor.py --shapes 32000:1024 --rounds 3   # quick
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.fused_linear_gemm import load
from benchmarks.fused_linear_memory import make_inputs
from benchmarks.runner import cpu_model, write_lines
from renio_kernels import fused_linear_renio_loss
from renio_kernels.core.autograd import linear_weights
from renio_kernels.core.options import ReNIOOptions
from renio_kernels.ops.gemm import Gemm
from renio_kernels.ops.linear import SweepPlan


def our_bounds(h_s, w_s, h_t, labels) -> list[tuple[int, int]]:
    """The chunks the loss itself uses for these inputs (the automatic plan)."""
    opts = ReNIOOptions()
    want = (True, True, False)
    plan = SweepPlan.build(
        opts.kernel_params(), "auto", h_s, w_s, h_t, labels, None, want,
        linear_weights(opts, labels, want),
    )  # fmt: skip
    return plan.bounds(labels.numel())


def providers(inputs, bounds):
    h_s, w_s, h_t, w_t, labels = inputs
    hidden = h_s.shape[-1]
    vocab = w_s.shape[0]

    def ours():
        h_s.grad = w_s.grad = None
        fused_linear_renio_loss(h_s, w_s, h_t, w_t, labels).backward()

    out = {"ours": ours}
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        LigerFusedLinearJSDLoss = None
    if LigerFusedLinearJSDLoss is not None:
        h2, t2, y1 = h_s.view(-1, hidden), h_t.view(-1, hidden), labels.view(-1)
        for name, compiled in (("liger (compiled)", True), ("liger (eager)", False)):
            loss = LigerFusedLinearJSDLoss(
                weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, compiled=compiled
            )

            def liger(loss=loss):
                h_s.grad = w_s.grad = None
                loss(h2, w_s, t2, w_t, y1).backward()

            out[name] = liger
    flat = h_s.detach().view(-1, hidden)
    w = w_s.detach()
    gemm = Gemm.for_operands(flat, w)
    longest = max(r1 - r0 for r0, r1 in bounds)
    buf = torch.empty(longest, vocab)
    u = torch.randn(longest, vocab) * 1e-3
    grad_h = torch.empty(flat.shape)
    acc = torch.zeros(vocab, hidden)

    def logits_mm():
        for r0, r1 in bounds:
            torch.mm(flat[r0:r1], w.T, out=buf[: r1 - r0])

    def logits_ours():
        for r0, r1 in bounds:
            gemm.mm(flat[r0:r1], w.T)

    def grad_hidden_ours():
        for r0, r1 in bounds:
            gemm.mm(u[: r1 - r0], w, out=grad_h[r0:r1])

    def grad_weight_ours():
        for r0, r1 in bounds:
            gemm.addmm_(acc, u[: r1 - r0].T, flat[r0:r1])

    out.update({"logits (torch.mm)": logits_mm, "logits": logits_ours,
                "grad_hidden": grad_hidden_ours, "grad_weight": grad_weight_ours})  # fmt: skip
    return out


def measure(vocab: int, tokens: int, args) -> dict:
    inputs = make_inputs(tokens, vocab, args.hidden, args.seq)
    h_s, w_s, h_t, _, labels = inputs
    bounds = our_bounds(h_s, w_s, h_t, labels)
    runs = providers(inputs, bounds)
    names = list(runs)
    for name in names:  # warm-up (and Liger's compilation), twice each
        runs[name]()
        runs[name]()
    times = {n: [] for n in names}
    load_before = load()
    for rnd in range(args.rounds):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for name in order:
            gc.collect()
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    load_after = load()

    def stat(name):
        xs = sorted(times[name])
        q = statistics.quantiles(xs, n=5) if len(xs) > 1 else [xs[0]] * 4
        return statistics.median(xs) * 1e3, q[0] * 1e3, q[3] * 1e3

    res = {n: stat(n) for n in names}
    sizes = sorted({r1 - r0 for r0, r1 in bounds})
    res.update(vocab=vocab, tokens=tokens, chunks=len(bounds), sizes=sizes,
               load_before=load_before, load_after=load_after)  # fmt: skip
    del runs, inputs
    gc.collect()
    return res


def row(r: dict) -> list[str]:
    ours = r["ours"][0]
    floor_mm = 4 * r["logits (torch.mm)"][0]
    floor_ours = 4 * r["logits"][0]
    sum4 = 2 * r["logits"][0] + r["grad_hidden"][0] + r["grad_weight"][0]
    liger = [r[k][0] for k in ("liger (compiled)", "liger (eager)") if k in r]
    best = min(liger) if liger else float("nan")

    def cell(k):
        if k not in r:
            return "n/a"
        med, p20, p80 = r[k]
        return f"{med:.0f} [{p20:.0f}, {p80:.0f}]"

    return [
        f"| {r['vocab']} | {r['tokens']} | {r['chunks']} x {'/'.join(map(str, r['sizes']))} | "
        f"{cell('ours')} | {cell('liger (compiled)')} | {cell('liger (eager)')} | "
        f"{floor_mm:.0f} | {floor_ours:.0f} | {sum4:.0f} | {best / ours:.2f}x | "
        f"{ours / floor_mm:.3f} | {ours / floor_ours:.3f} | {ours / sum4:.3f} |"
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="32000:1024,32000:4096,151936:1024,151936:4096",
                   help="V:tokens,...")  # fmt: skip
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=256, help="T; B = tokens / T")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/fused_linear_floor.md")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    results = []
    for shape in args.shapes.split(","):
        vocab, tokens = (int(x) for x in shape.split(":"))
        r = measure(vocab, tokens, args)
        results.append(r)
        print(row(r)[0], f"  ({r['load_before']} -> {r['load_after']})", flush=True)
    lines = [
        "# Fused-linear loss: ours vs Liger's chunked fused-linear JSD vs the 4-matmul floor",
        "",
        f"Machine: {cpu_model()}, {torch.get_num_threads()} torch threads, {platform.system()} "
        f"{platform.release()}, torch {torch.__version__}. fp32, forward+backward, H = "
        f"{args.hidden}, T = {args.seq} (B = tokens / T), 1/8 of each sequence ignored (prompt). "
        f"Median [p20, p80] ms over {args.rounds} interleaved rounds. "
        "Produced by `python benchmarks/fused_linear_floor.py`; see its docstring for what each "
        "column times.",
        "",
        "| V | tokens | our chunks (count x rows) | ours ms | Liger compiled ms | Liger eager ms "
        "| floor: 4 x logits pass, torch.mm, ms | 4 x logits pass, our GEMM entry, ms | "
        "sum of our 4 matmul passes ms | faster Liger / ours (target >= 1.2) | "
        "ours / torch.mm floor (target <= 1.15) | ours / floor of our GEMMs | ours / sum of 4 |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines += row(r)
    lines += [
        "",
        "Load per shape (1-minute average, which includes this benchmark's own threads, and the "
        "busiest other processes by `top`); the machine is shared, so figures carry that noise:",
        "",
    ]
    for r in results:
        lines.append(
            f"- V = {r['vocab']}, {r['tokens']} tokens: before {r['load_before']}; "
            f"after {r['load_after']}"
        )
    write_lines(args.out, lines)


if __name__ == "__main__":
    main()
