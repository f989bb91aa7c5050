"""The floor: the least time a pass can take on this machine, from what it must do.

With ``N = B*T*V`` logits per side and ``s`` bytes per element:

* logits forward: read both logits tensors, ``2Ns`` bytes; one exp per element per side (the
  log-sum-exps and the probabilities share it), ``2N`` exps, plus ``2N`` more for the JSD's
  ``log m`` (a log and an exp) when ``0 < beta < 1``.
* logits backward: ``3Ns`` bytes (read two tensors, write the gradient) and no exps: a forward
  that saved ``c`` and ``p_s`` lets the backward form ``(c - p_s C) / tau`` from them alone.
* logits forward+backward: ``3Ns`` bytes and the exps once, as if a single fused pass wrote the
  gradient during the forward. That is the floor of a loss whose per-row gradient scale is known
  in the forward (plain KL/JSD, ``use_renio=False``, with ``grad_output`` 1). The ReNIO weights
  need every row's ``ls[x] - lt[x]`` before any row's scale, and ``grad_output`` arrives in the
  backward, so a ReNIO kernel must touch each logit's gradient (or logits) twice: ``5Ns`` (the
  native CPU kernel: read both logits and write the unit gradient in the forward, read and write
  it in the backward). The harness keeps the ``3Ns`` roofline for every provider, so the
  ``fraction_of_floor`` of a ReNIO provider is at most 3/5 of what its design allows;
  ``benchmarks/cpu_kernel.py`` reports both floors.
* fused-linear: the matmuls dominate: forward ``2 * 2THV`` FLOPs (student and teacher logits);
  backward ``2 * 2THV`` (gradients of hidden states and weight); forward+backward ``4 * 2THV``
  (no recomputation). Bytes: hidden states and weights; the exps as for logits.

``floor_s = max(bytes / copy bandwidth, exps / exp rate, FLOPs / matmul rate)``: the pass cannot
beat its slowest resource. ``fraction_of_floor = floor_s / median``; 1.0 is the roofline.
``achieved_GBps`` is the floor's bytes over the median time (the bandwidth the pass achieved if
it moved only what it must).
"""

from __future__ import annotations

from .problems import Problem

__all__ = ["floor_costs", "floor_metrics"]


def floor_costs(p: Problem, mode: str) -> dict[str, float]:
    n = p.tokens * p.vocab
    s = p.elt_bytes
    exps = 0.0 if mode == "backward" else 2.0 * n * (2 if 0.0 < p.beta < 1.0 else 1)
    if p.kind == "logits":
        nbytes = 2.0 * n * s if mode == "forward" else 3.0 * n * s
        return {"bytes": nbytes, "exps": exps, "flops": 0.0}
    one_matmul = 2.0 * p.tokens * p.hidden * p.vocab
    matmuls = 4 if mode == "forward+backward" else 2
    hidden_bytes = 2.0 * p.tokens * p.hidden * s
    weight_bytes = 2.0 * p.vocab * p.hidden * s
    grads = 0.0 if mode == "forward" else (p.tokens + p.vocab) * p.hidden * s
    nbytes = hidden_bytes + weight_bytes + grads
    return {"bytes": nbytes, "exps": exps, "flops": matmuls * one_matmul}


def floor_metrics(p: Problem, mode: str, median_ms: float, ceilings: dict[str, float]) -> dict:
    c = floor_costs(p, mode)
    matmul = ceilings.get(f"matmul_TFLOPs_{p.dtype}", 0.0) * 1e12
    floor_s = max(
        c["bytes"] / (ceilings["copy_GBps"] * 1e9),
        c["exps"] / (ceilings["exp_Gps"] * 1e9),
        c["flops"] / matmul if matmul else 0.0,
    )
    t = median_ms / 1e3
    return {
        "floor_ms": floor_s * 1e3,
        "fraction_of_floor": floor_s / t,
        "achieved_GBps": c["bytes"] / t / 1e9,
    }
