"""The teacher top-k selection on a GPU: the Triton backend's streaming kernel against
``torch.topk`` on the int64 key (the torch backend's CUDA path), same rule, same ids.

    python -m benchmarks.top_k_select            # needs a CUDA device; prints a markdown table

Medians of CUDA-event timings, interleaved. Not meaningful on CPU (the interpreter).
"""

from __future__ import annotations

import functools
import statistics
import sys

import torch

from renio_kernels.ops.sparse import select_top_k
from renio_kernels.ops.triton.topk import top_k_triton

SHAPES = ((4096, 151936, 64), (4096, 151936, 256), (16384, 32000, 64))


def _time(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def main() -> int:
    if not torch.cuda.is_available():
        print("top_k_select: needs a CUDA device", file=sys.stderr)
        return 2
    print("| rows | V | k | streaming Triton ms | torch.topk (keyed) ms | same ids |")
    print("|---|---|---|---|---|---|")
    for rows, vocab, k in SHAPES:
        x = torch.randn(1, rows, vocab, device="cuda", dtype=torch.bfloat16)
        ours = functools.partial(top_k_triton, x, vocab, k)
        theirs = functools.partial(select_top_k, x, vocab, k, exact_keys=True)
        same = torch.equal(ours(), theirs())
        a, b = [], []
        for _ in range(10):
            a.append(_time(ours))
            b.append(_time(theirs))
        print(f"| {rows} | {vocab} | {k} | {statistics.median(a):.2f} | "
              f"{statistics.median(b):.2f} | {same} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
