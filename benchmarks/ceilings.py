"""The machine's ceilings, measured in the same run as the benchmark they normalize.

* copy bandwidth: ``dst.copy_(src)`` on buffers far larger than any cache; bytes read + written.
* exp throughput: exponentials per second where memory is not the limit. CPU: the faster of
  ``torch.exp`` on a cache-resident buffer and, when a compiler is present, the native kernel's
  vector exp over an L1-resident buffer (``exp_probe.exp_throughput``, a benchmark-only
  extension): the floor must use the best exp the machine runs, or a kernel with a cheaper exp
  would beat its "floor". GPU: a Triton kernel that applies many exps to values held in
  registers (a torch ``exp`` there measures memory).
* matmul rate: one square matmul in the benchmark's dtype, 2*n^3 FLOPs.
Each is the best of several runs after a warm-up: a ceiling is what the machine can do, and on a
shared machine the median would fold the neighbours' load into it.
"""

from __future__ import annotations

import time

import torch

__all__ = ["measure_ceilings"]


def _best_s(fn, device: str, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def copy_bandwidth(device: str) -> float:
    n = (1 << 28 if device.startswith("cuda") else 1 << 26) // 4  # 256 MiB / 64 MiB of fp32
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / _best_s(lambda: dst.copy_(src), device, 10)


def exp_rate(device: str) -> float:
    if device.startswith("cuda"):
        return _exp_rate_triton(device)
    x = torch.rand(1 << 16)  # 256 KiB: stays in L2; ~50 us a call, short enough that the
    y = torch.empty_like(x)  # best of many calls is one the neighbours did not interrupt
    return max(x.numel() / _best_s(lambda: torch.exp(x, out=y), device, 200), _native_exp_rate())


def _native_exp_rate() -> float:
    try:
        from .exp_probe import exp_throughput

        exp_throughput(1)  # builds the probe (benchmarks/exp_probe.cpp) on first use
    except (ImportError, RuntimeError, OSError):  # no compiler or no ninja here
        return 0.0
    return max(exp_throughput(64) for _ in range(30))  # ~64K exps a call: the best call is unloaded


def _exp_rate_triton(device: str) -> float:
    import triton
    import triton.language as tl

    @triton.jit
    def _exp_chain_kernel(x_ptr, n, ITERS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        for _ in range(ITERS):
            # exp(x) * -0.5 stays in (-0.5, 0]: the chain never overflows or goes subnormal.
            x = tl.exp(x) * -0.5
        tl.store(x_ptr + offs, x, mask=offs < n)

    n, iters, block = 1 << 24, 256, 1024
    x = torch.rand(n, device=device) - 0.5
    launch = lambda: _exp_chain_kernel[(triton.cdiv(n, block),)](x, n, ITERS=iters, BLOCK=block)
    return n * iters / _best_s(launch, device, 10)


def matmul_rate(device: str, dtype: torch.dtype) -> float:
    # CPU: n=512 reaches the FMA peak (the operands sit in cache) in a few ms a call, so the best
    # of many calls is one the neighbours did not interrupt; larger calls measured 3x less here.
    n, reps = (8192, 5) if device.startswith("cuda") else (512, 40)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _best_s(lambda: a @ b, device, reps)


def measure_ceilings(device: str, dtypes: tuple[str, ...]) -> dict[str, float]:
    out = {"copy_GBps": copy_bandwidth(device) / 1e9, "exp_Gps": exp_rate(device) / 1e9}
    for name in dtypes:
        out[f"matmul_TFLOPs_{name}"] = matmul_rate(device, getattr(torch, name)) / 1e12
    return out
