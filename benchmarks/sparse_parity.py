"""Accuracy of ``top_k`` and ``SparseTeacher`` against the float64 reference.

``python benchmarks/sparse_parity.py`` prints a markdown table: per case, backend and dtype, the
largest absolute error of the loss and of the gradients over 3 seeds x 4 option sets (forward
KL, reverse KL at tau 0.8, JSD 0.5 with a 0.05 clip, TVD), k = 5. Logits: B=2, T=9, Vs=37,
Vt=41, ignored rows, grad_output -2.5; fused-linear: the same sizes with Hs=6, Ht=9, biases and
chunks of 5 rows (cpu kernel for fp16/bf16). Triton runs under the interpreter on CPU (no bf16
there).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

from renio_kernels import config, reference, renio_loss
from tests.helpers import make_inputs
from tests.test_sparse_linear import inputs, ref, run, teacher_logits
from tests.test_sparse_teacher import as64, sparse_from_logits

OPTIONS = (
    dict(beta=0.0),
    dict(beta=1.0, temperature=0.8),
    dict(beta=0.5, token_clip=0.05),
    dict(divergence="tvd"),
)
CASES = ("top_k=5", "renormalized", "truncated")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _logits_errors(case, backend, dtype):
    loss_err = grad_err = 0.0
    for seed in range(3):
        for kw in OPTIONS:
            kw = dict(kw, threshold=0.1)
            s, t, labels = make_inputs(dtype=dtype, seed=seed, teacher_vocab=41, seq=9)
            top = case.startswith("top")
            extra = dict(top_k=5) if top else {}
            tau = kw.get("temperature", 1.0)
            teacher = t if top else sparse_from_logits(t, labels, 5, case, tau, vocab=37)
            x = s.clone().requires_grad_()
            loss = renio_loss(x, teacher, labels, backend=backend, **kw, **extra)
            (loss * -2.5).backward()
            x64 = s.double().requires_grad_()
            teacher64 = t.double() if top else as64(teacher)
            want = reference.renio_loss(x64, teacher64, labels, **kw, **extra)
            (want * -2.5).backward()
            loss_err = max(loss_err, abs(float(loss.detach()) - float(want.detach())))
            grad_err = max(grad_err, float((x.grad.double() - x64.grad).abs().max()))
    return loss_err, grad_err


def _fused_errors(case, backend, dtype):
    loss_err = grad_err = 0.0
    for seed in range(3):
        for kw in OPTIONS:
            kw = dict(kw, threshold=0.1)
            h_s, w_s, b_s, h_t, w_t, b_t, labels = inputs(dtype=dtype, seed=seed)
            logits = teacher_logits(h_t, w_t, b_t)
            if case.startswith("top"):
                got = run(backend, h_s, w_s, b_s, h_t, w_t, b_t, labels, top_k=5, chunk_size=5,
                          **kw)  # fmt: skip
                want = ref(h_s, w_s, b_s, logits.double(), labels, top_k=5, **kw)
            else:
                tau = kw.get("temperature", 1.0)
                teacher = sparse_from_logits(logits, labels, 5, case, tau, vocab=37)
                got = run(backend, h_s, w_s, b_s, teacher, None, None, labels, chunk_size=5, **kw)
                want = ref(h_s, w_s, b_s, as64(teacher), labels, **kw)
            loss_err = max(loss_err, abs(float(got[0].detach()) - float(want[0].detach())))
            for g, w in zip(got[1], want[1], strict=True):
                grad_err = max(grad_err, float((g.double() - w).abs().max()))
    return loss_err, grad_err


def main() -> None:
    config.TRITON = config.TritonConfig(block_v=16, interpret_block_v=16)
    print("| input | case | backend | dtype | max abs err. loss | max abs err. gradients |")
    print("|---|---|---|---|---|---|")
    for kind, errors in (("logits", _logits_errors), ("hidden", _fused_errors)):
        for dtype in DTYPES:
            backends = ("torch", "cpu", "triton")
            if dtype == torch.bfloat16:
                backends = ("torch", "cpu")
            if kind == "hidden" and dtype != torch.float32:
                backends = ("cpu",)
            for backend in backends:
                for case in CASES:
                    le, ge = errors(case, backend, dtype)
                    name = str(dtype).removeprefix("torch.")
                    print(f"| {kind} | {case} | {backend} | {name} | {le:.1e} | {ge:.1e} |")


if __name__ == "__main__":
    main()
