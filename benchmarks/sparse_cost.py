"""Forward+backward time of ``top_k`` and ``SparseTeacher`` against the dense loss, logits in
(backend ``auto``) and hidden states in, including ``"truncated"`` (not in ``make bench``).

``python benchmarks/sparse_cost.py [--tokens 1024] [--vocab 32000] [--hidden 256] [--k 64]``
prints a markdown table of medians [p20, p80] over interleaved repetitions. Check that the
machine is quiet first (``uptime``): the numbers are only comparable within one run.
"""

from __future__ import annotations

import argparse
import time

import torch

import renio_kernels as rk


def _cases(n: int, vocab: int, hidden: int, k: int):
    g = torch.Generator().manual_seed(0)
    b, t = 4, n // 4
    s = (torch.randn(b, t, vocab, generator=g) * 2).requires_grad_()
    tl = torch.randn(b, t, vocab, generator=g) * 2
    y = torch.randint(0, vocab, (b, t), generator=g)
    hs = torch.randn(b, t, hidden, generator=g).requires_grad_()
    ws = (torch.randn(vocab, hidden, generator=g) * 2 / hidden**0.5).requires_grad_()
    ht = torch.randn(b, t, hidden, generator=g)
    wt = torch.randn(vocab, hidden, generator=g) * 2 / hidden**0.5

    def sparse(logits, mode):
        lt = torch.log_softmax(logits, dim=-1)
        top = lt.topk(k, dim=-1)
        return rk.SparseTeacher(top.indices, top.values, lt.gather(-1, y.unsqueeze(-1))[..., 0],
                                mode)  # fmt: skip

    with torch.no_grad():
        t_fl = ht @ wt.T
    teachers = {m: sparse(tl, m) for m in ("renormalized", "truncated")}
    teachers_fl = {m: sparse(t_fl, m) for m in ("renormalized", "truncated")}
    del t_fl
    return {
        "logits, dense": ([s], lambda: rk.renio_loss(s, tl, y)),
        f"logits, top_k={k}": ([s], lambda: rk.renio_loss(s, tl, y, top_k=k)),
        "logits, sparse renormalized": ([s], lambda: rk.renio_loss(s, teachers["renormalized"], y)),
        "logits, sparse truncated": ([s], lambda: rk.renio_loss(s, teachers["truncated"], y)),
        "hidden, dense": ([hs, ws], lambda: rk.fused_linear_renio_loss(hs, ws, ht, wt, y)),
        f"hidden, top_k={k}": ([hs, ws],
                               lambda: rk.fused_linear_renio_loss(hs, ws, ht, wt, y, top_k=k)),
        "hidden, sparse renormalized": ([hs, ws], lambda: rk.fused_linear_renio_loss(
            hs, ws, teachers_fl["renormalized"], None, y)),
        "hidden, sparse truncated": ([hs, ws], lambda: rk.fused_linear_renio_loss(
            hs, ws, teachers_fl["truncated"], None, y)),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    cases = _cases(args.tokens, args.vocab, args.hidden, args.k)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for rep in range(args.reps + 2):
        for name, (leaves, fn) in cases.items():
            for x in leaves:
                x.grad = None
            t0 = time.perf_counter()
            fn().backward()
            if rep >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - t0)
    print(f"| case (B*T={args.tokens}, V={args.vocab}, H={args.hidden}) | ms, median [p20, p80] |")
    print("|---|---|")
    levels = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    for name, t in times.items():
        q = (torch.tensor(t, dtype=torch.float64).quantile(levels) * 1e3).tolist()
        print(f"| {name} | {q[1]:.1f} [{q[0]:.1f}, {q[2]:.1f}] |")


if __name__ == "__main__":
    main()
