"""Parity of the fused-linear loss with the float64 reference on materialized logits.

For each dtype and option set: relative error of the loss and of the student hidden-state,
weight and bias gradients against ``reference.renio_loss`` run in float64 on logits materialized
from the same (low-precision) inputs. Next to it, the error of the unfused path a model in that
dtype takes: logits from ``F.linear`` in the input dtype (rounded to it), then ``renio_loss``.
Writes a markdown table.

    python benchmarks/fused_linear_parity.py
"""

from __future__ import annotations

import argparse
import itertools
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.runner import write_lines
from renio_kernels import fused_linear_renio_loss, reference, renio_loss
from tests.helpers import LINEAR_GRAD_RTOL, LOSS_RTOL, rel_err
from tests.test_fused_linear import make_linear

CONFIGS = [
    {"beta": 0.0},
    {"beta": 0.5, "token_clip": 0.05},
    {"beta": 1.0, "temperature": 1.5},
    {"beta": 0.5, "token_clip": 0.05, "use_renio": False},
]


def fused_step(h, w, b, teacher, chunk_size, backend, kw):
    h_t, w_t, b_t, labels = teacher
    return fused_linear_renio_loss(
        h, w, h_t, w_t, labels, student_bias=b, teacher_bias=b_t, backend=backend,
        chunk_size=chunk_size, **kw,
    )  # fmt: skip


def unfused_step(h, w, b, teacher, backend, kw):
    h_t, w_t, b_t, labels = teacher
    logits_s = torch.nn.functional.linear(h, w, b)
    logits_t = torch.nn.functional.linear(h_t, w_t, b_t)
    return renio_loss(logits_s, logits_t, labels, backend=backend, **kw)


def reference_step(h, w, b, teacher, kw):
    h_t, w_t, b_t, labels = teacher
    logits_t = torch.nn.functional.linear(h_t.double(), w_t.double(), b_t.double())
    return reference.renio_loss(h @ w.T + b, logits_t, labels, **kw)


def grads_of(fn, h_s, w_s, b_s):
    leaves = [x.detach().clone().requires_grad_() for x in (h_s, w_s, b_s)]
    loss = fn(*leaves)
    (1.7 * loss).backward()
    return loss.detach(), [x.grad for x in leaves]


def errors(loss, grads, ref_loss, ref_grads):
    loss_err = abs(float(loss) - float(ref_loss)) / abs(float(ref_loss))
    return [loss_err] + [rel_err(g, r) for g, r in zip(grads, ref_grads, strict=True)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--vocab", type=int, default=1031)
    p.add_argument("--teacher-vocab", type=int, default=1040)
    p.add_argument("--hs", type=int, default=64)
    p.add_argument("--ht", type=int, default=96)
    p.add_argument("--chunk-size", type=int, default=48, help="splits sequences across chunks")
    p.add_argument(
        "--backends", default="cpu,torch", help="row kernels, comma-separated (auto picks cpu)"
    )
    p.add_argument("--out", default="benchmarks/results/fused_linear_parity.md")
    args = p.parse_args(argv)
    shape = dict(
        batch=args.batch, seq=args.seq, hs=args.hs, ht=args.ht, vocab=args.vocab,
        teacher_vocab=args.teacher_vocab,
    )  # fmt: skip
    lines = [
        "# Fused-linear ReNIO loss: parity with the float64 reference",
        "",
        f"B = {args.batch}, T = {args.seq}, Hs = {args.hs}, Ht = {args.ht}, Vs = {args.vocab}, "
        f"Vt = {args.teacher_vocab}, both lm_heads with a bias, some ignored positions, "
        f"chunk_size = {args.chunk_size} (sequences split across chunks), CPU row kernels as "
        "listed (cpu: the native kernel, which forms the chunk's gradient in its forward), "
        "grad_output 1.7. Relative errors: |loss - ref| / |ref|, and ||g - ref|| / ||ref|| for "
        "the student's hidden-state (h), weight (W) and bias (b) gradients. 'unfused' = logits "
        "from F.linear in the input dtype, then renio_loss. Tolerances: tests/helpers.py. Produced "
        f"by `python benchmarks/fused_linear_parity.py` (torch {torch.__version__}, CPU). "
        "Low-precision gradient errors of the fused path are mostly the final rounding of the "
        "returned gradients to the input dtype.",
        "",
        "| backend | dtype | options | loss | h | W | b | unfused loss | unfused h | unfused W | "
        "tolerance loss / grads |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cases = itertools.product(
        args.backends.split(","), (torch.float32, torch.bfloat16, torch.float16), CONFIGS
    )
    for backend, dtype, kw in cases:
        h_s, w_s, b_s, h_t, w_t, b_t, labels = make_linear(dtype=dtype, **shape)
        teacher = (h_t, w_t, b_t, labels)
        fused = partial(
            fused_step, teacher=teacher, chunk_size=args.chunk_size, backend=backend, kw=kw
        )
        unfused = partial(unfused_step, teacher=teacher, backend=backend, kw=kw)
        ref = partial(reference_step, teacher=teacher, kw=kw)
        r_loss, r_grads = grads_of(ref, h_s.double(), w_s.double(), b_s.double())
        f = errors(*grads_of(fused, h_s, w_s, b_s), r_loss, r_grads)
        u = errors(*grads_of(unfused, h_s, w_s, b_s), r_loss, r_grads)
        opts = ", ".join(f"{k}={v}" for k, v in kw.items())
        name = str(dtype).replace("torch.", "")
        lines.append(
            f"| {backend} | {name} | {opts} | {f[0]:.1e} | {f[1]:.1e} | {f[2]:.1e} | {f[3]:.1e} | "
            f"{u[0]:.1e} | {u[1]:.1e} | {u[2]:.1e} | "
            f"{LOSS_RTOL[dtype]:.0e} / {LINEAR_GRAD_RTOL[dtype]:.0e} |"
        )
        print(lines[-1], flush=True)
    write_lines(args.out, lines)


if __name__ == "__main__":
    main()
