"""``pytest benchmarks/ --benchmark-only``: the public functions at small shapes, forward+backward.

Small enough to run in seconds on a 2-core CPU; a regression shows as a jump in these medians
(compare runs with ``--benchmark-autosave`` / ``--benchmark-compare``). Without
``--benchmark-only`` the benchmark tests run once each and the harness checks below run too.
"""

from __future__ import annotations

import pytest
import torch

import renio_kernels
from benchmarks.floor import floor_metrics
from benchmarks.problems import Problem
from benchmarks.providers import PROVIDERS, build_case, make_inputs, unavailable_reason

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = Problem("logits", 256, 4096, "float32")
SMALL_FL = Problem("fused-linear", 256, 4096, "float32", hidden=128)


def _fwd_bwd(case):
    def step():
        for leaf in case.leaves:
            leaf.grad = None
        case.run().backward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    return step


@pytest.mark.parametrize("provider", [n for n, (k, _) in PROVIDERS.items() if k == "logits"])
def test_logits_forward_backward(benchmark, provider):
    reason = unavailable_reason(provider, DEVICE)
    if reason:
        pytest.skip(reason)
    if provider == "reference-compiled" and DEVICE == "cpu":
        pytest.skip("torch.compile of the reference takes tens of seconds on a CPU")
    benchmark(_fwd_bwd(build_case(provider, SMALL, DEVICE)))


@pytest.mark.parametrize("provider", [n for n, (k, _) in PROVIDERS.items() if k == "fused-linear"])
def test_fused_linear_forward_backward(benchmark, provider):
    reason = unavailable_reason(provider, DEVICE)
    if reason:
        pytest.skip(reason)
    benchmark(_fwd_bwd(build_case(provider, SMALL_FL, DEVICE)))


def test_sampled_reverse_kl_forward_backward(benchmark):
    s, t, y = make_inputs(SMALL, DEVICE)

    def step():
        s.grad = None
        renio_kernels.sampled_reverse_kl_loss(s, t, y).backward()

    benchmark(step)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_liger_beta_convention(beta):
    """Liger's chunked JSD equals our plain (unweighted) divergence at the same beta, so the
    benchmark compares like with like. One sequence: Liger averages over all valid tokens, we
    average per sequence first."""
    pytest.importorskip("liger_kernel")
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    torch.manual_seed(0)
    h, w = torch.randn(1, 64, 32, dtype=torch.float64), torch.randn(97, 32, dtype=torch.float64)
    ht, wt = torch.randn(1, 64, 32, dtype=torch.float64), torch.randn(97, 32, dtype=torch.float64)
    y = torch.randint(0, 97, (1, 64))
    y[0, ::5] = -100
    liger = LigerFusedLinearJSDLoss(0.0, 1.0, beta=beta, compiled=False)(h[0], w, ht[0], wt, y[0])
    ours = renio_kernels.reference.renio_loss(h @ w.T, ht @ wt.T, y, beta=beta, use_renio=False)
    torch.testing.assert_close(liger.double(), ours, rtol=1e-6, atol=1e-9)


def test_floor_is_a_lower_bound_shape():
    ceilings = {"copy_GBps": 10.0, "exp_Gps": 1.0, "matmul_TFLOPs_float32": 0.1}
    p = Problem("logits", 1024, 32000, "float32")
    m = floor_metrics(p, "forward+backward", 1000.0, ceilings)
    # 3 * 1024 * 32000 * 4 bytes at 10 GB/s = 39.3 ms; 2 * 32.8M exps at 1 G/s = 65.5 ms.
    assert m["floor_ms"] == pytest.approx(65.536)
    assert m["fraction_of_floor"] == pytest.approx(0.065536)
    assert m["achieved_GBps"] == pytest.approx(3 * 1024 * 32000 * 4 / 1e9)
