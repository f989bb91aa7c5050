"""``python -m benchmarks.demo``: the bare loss on random large-vocabulary logits.

Prints the loss, the ReNIO weights, the time and the peak extra memory of one forward+backward,
next to the same numbers for the reference (the paper trainer's eager code path).
"""

from __future__ import annotations

import argparse
import time

import torch

from renio_kernels import reference, renio_loss

from .memory import peak_extra_bytes


def _step(fn, s, t, labels, kw):
    s = s.detach().requires_grad_()
    start = time.perf_counter()
    loss, stats = fn(s, t, labels, return_stats=True, **kw)
    loss.backward()
    return loss.detach(), stats["weights"], time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--token-clip", type=float, default=0.05)
    p.add_argument("--backend", default="auto")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    shape = (args.batch, args.seq, args.vocab)
    s = torch.randn(shape) * 2
    t = 0.7 * s + 0.5 * torch.randn(shape) * 2
    labels = torch.distributions.Categorical(logits=s).sample()
    labels[:, : args.seq // 8] = -100
    kw = {"token_clip": args.token_clip}
    logits_bytes = s.numel() * s.element_size()
    print(
        f"B={args.batch} T={args.seq} V={args.vocab} fp32; one logits tensor = "
        f"{logits_bytes / 2**20:.0f} MiB; token_clip={args.token_clip}"
    )
    providers = (
        ("renio_kernels", renio_loss, {"backend": args.backend}),
        ("reference", reference.renio_loss, {}),
    )
    # Every timing first: measuring memory pins glibc's mmap threshold for the whole process,
    # which slows later large allocations (benchmarks.memory.pin_mmap_threshold).
    timed = [_step(fn, s, t, labels, {**kw, **extra}) for _, fn, extra in providers]
    rows = []
    for (name, fn, extra), (loss, w, secs) in zip(providers, timed, strict=True):
        peak = peak_extra_bytes(lambda fn=fn, extra=extra: _step(fn, s, t, labels, {**kw, **extra}))
        rows.append((name, float(loss), w, secs, peak / logits_bytes))
    for name, loss, w, secs, mem in rows:
        print(
            f"{name:>14}: loss {loss:.6f}  time {secs:.3f} s  peak extra {mem:.2f}x logits  "
            f"weights {[round(x, 3) for x in w.tolist()]}"
        )
    print(f"speed-up {rows[1][3] / rows[0][3]:.1f}x, memory {rows[1][4] / rows[0][4]:.1f}x less")


if __name__ == "__main__":
    main()
