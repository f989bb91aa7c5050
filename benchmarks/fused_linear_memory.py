"""Peak extra memory of one forward+backward of the fused-linear ReNIO loss (CPU, fp32).

Measures ``benchmarks.memory.peak_extra_bytes`` (sampled RSS on CPU) of

* the fused-linear loss at several token counts (the target shape: B*T = 4096, V = 151936,
  H = 256; at most 0.25 x one (B*T, V) fp32 tensor, weight gradient included, and flat in B*T),
  and one sequence of ``--long`` tokens (B = 1: the sequence spans many chunks);
* materialize-then-reference: ``logits = hidden @ W.T`` for both models, then
  ``reference.renio_loss`` (the paper trainer's eager path) in fp32, at a smaller B*T: at 4096
  tokens it needs tens of GB, more than this shared machine may use;
* materialize-then-``renio_loss`` (the fused logits loss, torch backend) at the same small B*T.

Inputs (hidden states, weights, labels) exist before each measurement and are not counted; the
gradients of the student's hidden states and weight are. Writes a markdown table.

    python benchmarks/fused_linear_memory.py                       # the target configuration
    python benchmarks/fused_linear_memory.py --tokens 512 --scaling 256 --ref-tokens 128   # quick
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from pathlib import Path

import torch

# The checkout's package, not whichever renio_kernels is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.memory import peak_extra_bytes
from benchmarks.runner import cpu_model, write_lines
from renio_kernels import fused_linear_renio_loss, reference, renio_loss
from renio_kernels.ops.linear import chunk_bounds, chunk_cap

MIB = 1 << 20


def make_inputs(tokens: int, vocab: int, hidden: int, seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    seq = min(seq, tokens)
    batch = tokens // seq
    h_s = torch.randn(batch, seq, hidden, generator=g)
    w_s = torch.randn(vocab, hidden, generator=g) * (2.0 / hidden**0.5)
    h_t = torch.randn(batch, seq, hidden, generator=g)
    w_t = torch.randn(vocab, hidden, generator=g) * (1.0 / hidden**0.5)
    w_t += 0.7 * w_s
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[:, : seq // 8] = -100  # prompt positions
    return h_s.requires_grad_(), w_s.requires_grad_(), h_t, w_t, labels


def fused_step(h_s, w_s, h_t, w_t, labels, **kw):
    loss = fused_linear_renio_loss(h_s, w_s, h_t, w_t, labels, token_clip=0.05, **kw)
    loss.backward()
    return loss.detach()


def materialized_step(h_s, w_s, h_t, w_t, labels, loss_fn):
    logits_s = h_s @ w_s.T
    with torch.no_grad():
        logits_t = h_t @ w_t.T
    loss = loss_fn(logits_s, logits_t, labels, token_clip=0.05)
    loss.backward()
    return loss.detach()


def measure(name: str, tokens: int, step, args, seq: int | None = None) -> dict:
    # One untimed call at a small size first: one-time costs (thread pools, oneDNN/MKL
    # workspaces, lazy imports) are not what the row measures.
    seq = seq or args.seq
    step(*make_inputs(min(tokens, 64), args.vocab, args.hidden, seq))
    inputs = make_inputs(tokens, args.vocab, args.hidden, seq)
    gc.collect()
    start = time.perf_counter()
    peak = peak_extra_bytes(lambda: step(*inputs))
    wall = time.perf_counter() - start
    logits_bytes = tokens * args.vocab * 4
    row = {
        "name": name,
        "tokens": tokens,
        "peak_mib": peak / MIB,
        "ratio": peak / logits_bytes,
        "logits_mib": logits_bytes / MIB,
        "wall_s": wall,
    }
    print(
        f"{name:38s} N={tokens:5d}  peak {row['peak_mib']:8.1f} MiB  = {row['ratio']:.3f} x "
        f"(N, V) fp32 ({row['logits_mib']:.0f} MiB)  [{wall:.1f} s]",
        flush=True,
    )
    return row


def machine() -> str:
    return (
        f"{cpu_model()}, {torch.get_num_threads()} torch threads, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}"
    )


def _exec_with_fixed_mmap_threshold() -> None:
    """Re-run this script with glibc's mmap threshold pinned at 128 KiB.

    glibc raises the threshold (up to 32 MiB) after freeing an mmapped block, after which
    freed tensors stay in the heap and RSS no longer tracks live memory: the first measurement
    of a process would count memory that later ones reuse unseen. Pinning it keeps every
    tensor above 128 KiB in its own mapping, returned to the OS when freed.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main(argv: list[str] | None = None) -> None:
    _exec_with_fixed_mmap_threshold()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=256, help="T; B = tokens / T")
    p.add_argument("--tokens", type=int, default=4096, help="B*T of the target measurement")
    p.add_argument("--scaling", default="1024,2048", help="further B*T for the fused loss")
    p.add_argument("--ref-tokens", type=int, default=512, help="B*T of the materialized runs")
    p.add_argument("--long", type=int, default=8192, help="T of the one-sequence run (0: none)")
    p.add_argument("--out", default="benchmarks/results/fused_linear_memory.md")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = []  # each measure() frees its inputs on return
    for n in [int(x) for x in args.scaling.split(",") if x] + [args.tokens]:
        rows.append(measure("fused_linear_renio_loss", n, fused_step, args))
    if args.long:
        rows.append(
            measure(f"fused_linear_renio_loss, one sequence (B = 1, T = {args.long})", args.long,
                    fused_step, args, seq=args.long)
        )  # fmt: skip
    mid = [int(x) for x in args.scaling.split(",") if x][-1:] or [args.tokens]
    rows.append(
        measure(
            "fused_linear_renio_loss use_renio=False",
            mid[0],
            lambda *a: fused_step(*a, use_renio=False),
            args,
        )
    )
    rows.append(
        measure(
            "materialize + reference.renio_loss",
            args.ref_tokens,
            lambda *a: materialized_step(*a, reference.renio_loss),
            args,
        )
    )
    rows.append(
        measure(
            "materialize + renio_loss (torch)",
            args.ref_tokens,
            lambda *a: materialized_step(*a, lambda s, t, y, **k: renio_loss(s, t, y, **k)),
            args,
        )
    )
    cap = chunk_cap(args.vocab, args.hidden, args.hidden, torch.device("cpu"))
    chunk = max(r1 - r0 for r0, r1 in chunk_bounds(args.tokens, cap, args.seq))
    weight_mib = args.vocab * args.hidden * 4 / MIB
    from renio_kernels.ops.backends import resolve_backend

    row_kernels = resolve_backend("auto", torch.device("cpu")).name
    lines = [
        "# Fused-linear ReNIO loss: peak extra memory of one forward+backward",
        "",
        f"Machine: {machine()}.",
        "",
        f"fp32, V = {args.vocab}, Hs = Ht = {args.hidden}, T = {args.seq}, token_clip = 0.05, "
        f"beta = 0 (defaults otherwise), backend auto ({row_kernels} row kernels on CPU); "
        f"automatic chunk = {chunk} "
        f"tokens at B*T = {args.tokens}. Measured with `benchmarks.memory.peak_extra_bytes` "
        "(resident set size sampled every 1 ms: a lower bound within one sampling interval; "
        "glibc's mmap threshold pinned at 128 KiB so freed tensors leave the RSS, and one "
        "untimed small call of each path first). "
        "Inputs are allocated before each measurement; the student hidden-state and weight "
        f"gradients are counted (the weight gradient alone is {weight_mib:.0f} MiB). "
        "One run per row; wall times are from that run (informative only: they include the "
        "pinned threshold's page faults). Produced by `python benchmarks/fused_linear_memory.py`.",
        "",
        "| path | B*T | peak extra (MiB) | x one (B*T, V) fp32 tensor | that tensor (MiB) | "
        "wall (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['tokens']} | {r['peak_mib']:.1f} | {r['ratio']:.3f} | "
            f"{r['logits_mib']:.0f} | {r['wall_s']:.1f} |"
        )
    target = next(r for r in rows if r["tokens"] == args.tokens and r["name"].endswith("loss"))
    ref = next(r for r in rows if r["name"].endswith("reference.renio_loss"))
    lines += [
        "",
        f"Target (B*T = {args.tokens}): peak {target['peak_mib']:.1f} MiB = "
        f"{target['ratio']:.3f} x one (B*T, V) fp32 tensor; the target is at most 0.25 x.",
        "",
        f"The materialized paths are measured at B*T = {args.ref_tokens}: at B*T = "
        f"{args.tokens} materialize + reference would need about {ref['ratio']:.1f} x "
        f"{target['logits_mib']:.0f} MiB = {ref['ratio'] * target['logits_mib'] / 1024:.1f} GiB "
        "(extrapolated from its measured ratio, which does not depend on B*T), more than this "
        "shared machine may use.",
        "",
        "Wall times include the page faults of the pinned mmap threshold (every chunk "
        "temporary is a fresh mapping), so they overstate the loss's normal run time.",
    ]
    write_lines(args.out, lines)


if __name__ == "__main__":
    main()
