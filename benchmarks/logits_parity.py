"""Parity of every logits-input backend with the float64 reference, per dtype.

For each backend available here and each dtype, the worst relative error over a set of option
combinations (each beta, clip on/off, temperature != 1, several vocabulary tiles, ignored rows,
Vt > Vs) of the loss and of the student gradient (relative norm), against
``reference.renio_loss`` in float64 on the same low-precision inputs. Next to it the error of the
reference itself run eagerly in the input dtype (what the paper's trainer gets). Writes a
markdown table.

    python benchmarks/logits_parity.py [--out benchmarks/results/logits_parity.md]

The Triton backend runs under the interpreter on CPU (fp32/fp16; bf16 is unreliable there) and
natively on CUDA.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
from pathlib import Path

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import renio_kernels as rk
from renio_kernels import reference
from tests.helpers import GRAD_RTOL, LOSS_RTOL, make_inputs, rel_err

CONFIGS = [
    {"beta": b, "token_clip": c, "temperature": tau}
    for b, c, tau in itertools.product((0.0, 0.5, 1.0), (None, 0.05), (1.0, 1.7))
]


def _available(device: str) -> list[str]:
    names = ["torch", "triton"]
    if device == "cpu":
        from renio_kernels.ops.cpu import native as cpu

        if cpu.load_extension() is not None:
            names.append("cpu")
    return names


def _errors(fn, s, t, labels, kw, ref, ref_grad) -> tuple[float, float]:
    x = s.clone().requires_grad_()
    loss = fn(x, t, labels, **kw)
    (loss * 1.7).backward()
    return rel_err(loss, ref), rel_err(x.grad, ref_grad)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="benchmarks/results/logits_parity.md")
    args = p.parse_args()
    device = (
        "cuda" if torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] != "1" else "cpu"
    )
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    rows = []
    for dtype in dtypes:
        worst: dict[str, list[float]] = {}
        for i, kw in enumerate(CONFIGS):
            kw = {**kw, "threshold": 0.1}
            s, t, labels = make_inputs(
                batch=3, seq=7, vocab=1031, teacher_vocab=1040, dtype=dtype, device=device, seed=i
            )
            s64 = s.detach().double().cpu().requires_grad_()
            ref = reference.renio_loss(s64, t.double().cpu(), labels.cpu(), **kw)
            (ref * 1.7).backward()
            providers = {
                b: (lambda x, t, l, b=b, **k: rk.renio_loss(x, t, l, backend=b, **k))
                for b in _available(device)
                if not (b == "triton" and device == "cpu" and dtype == torch.bfloat16)
            }
            providers[f"eager reference in {str(dtype)[6:]}"] = reference.renio_loss
            # No kernel returning a gradient in this dtype can beat rounding the exact one to it.
            w = worst.setdefault(f"(floor: exact gradient rounded to {str(dtype)[6:]})", [0.0, 0.0])
            w[1] = max(w[1], rel_err(s64.grad.to(dtype), s64.grad))
            for name, fn in providers.items():
                le, ge = _errors(fn, s, t, labels, kw, ref, s64.grad)
                w = worst.setdefault(name, [0.0, 0.0])
                w[0], w[1] = max(w[0], le), max(w[1], ge)
        for name, (le, ge) in worst.items():
            rows.append((str(dtype)[6:], name, le, ge, LOSS_RTOL[dtype], GRAD_RTOL[dtype]))
    cpu_name = platform.processor() or platform.machine()
    lines = [
        "# Logits-input parity against the float64 reference",
        "",
        f"Device: {torch.cuda.get_device_name() if device == 'cuda' else 'CPU ' + cpu_name}; "
        f"torch {torch.__version__}; B=3, T=7, Vs=1031, Vt=1040, ignored rows, grad_output 1.7; "
        f"worst over {len(CONFIGS)} option sets (beta 0/0.5/1 x clip off/0.05 x tau 1/1.7). "
        "Triton on CPU runs under the interpreter.",
        "",
        "| dtype | backend | max rel. err. loss | max rel. err. grad | tolerance (loss / grad) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {d} | {n} | {le:.2e} | {ge:.2e} | {lt:g} / {gt:g} |" for d, n, le, ge, lt, gt in rows
    ]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
