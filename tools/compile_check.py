"""Compile the Triton kernels for a CUDA target without a GPU (ahead-of-time, to PTX and cubin).

The interpreter runs the kernels' Python semantics but never compiles them; this catches what
only the compiler sees (type mismatches across branches and loops, unsupported ops) on a machine
with no GPU. It does not run anything: numerics still need the GPU run (benchmarks/gpu.sh).

    python tools/compile_check.py [--arch 90]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from renio_kernels.ops.divergences import DIVERGENCES
from renio_kernels.ops.triton.bwd import _renio_bwd_kernel
from renio_kernels.ops.triton.fwd import _renio_fwd_kernel
from renio_kernels.ops.triton.topk import _top_k_kernel

# Argument types by name; the argument list itself is read from each kernel.
_INT32 = ("T", "V", "k", "ignore_index")


def _signature(kernel, dtype: str, consts: dict) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("s_ptr", "t_ptr", "grad_ptr", "x_ptr"):
            sig[name] = f"*{dtype}"
        elif name in ("labels_ptr", "out_ptr"):
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif "stride" in name:
            sig[name] = "i64"
        else:
            sig[name] = "i32" if name in _INT32 else "fp32"
    return sig


def _source(kernel, dtype: str, consts: dict):
    sig = _signature(kernel, dtype, consts)
    return ASTSource(kernel, sig, {(list(sig).index(k),): v for k, v in consts.items()})


def _fwd(dtype: str, mode: int, clip: bool, with_div: bool, store_c: bool):
    consts = {"DIVERGENCE": mode, "CLIP": clip, "WITH_DIVERGENCE": with_div,
              "STORE_C": store_c, "BLOCK_V": 4096}  # fmt: skip
    if not with_div:
        consts["d_ptr"] = None
    if not store_c:
        consts["c_ptr"] = None
    return _source(_renio_fwd_kernel, dtype, consts)


def _bwd(dtype: str, mode: int, clip: bool, div: bool, sampled: bool):
    consts = {"DIVERGENCE": mode, "CLIP": clip, "HAS_DIV_GRAD": div,
              "HAS_SAMPLED_GRAD": sampled, "BLOCK_V": 4096}  # fmt: skip
    for k, on in (("c_ptr", div), ("gd_ptr", div), ("gx_ptr", sampled)):
        if not on:
            consts[k] = None
    return _source(_renio_bwd_kernel, dtype, consts)


def _top_k(dtype: str, k_pad: int):
    return _source(_top_k_kernel, dtype, {"K_PAD": k_pad, "BLOCK": max(1024, k_pad)})


# The streaming top-k's kept-key widths: small k, and the paper's top_k_loss range.
TOP_K_PADS = (8, 64, 256)
FWD_FLAGS = ((True, True), (True, False), (False, False))  # (with_divergence, store_c)
BWD_FLAGS = ((True, False), (False, True), (True, True))  # (divergence grad, sampled grad)


def variant_count(n_dtypes: int) -> int:
    return n_dtypes * len(DIVERGENCES) * 2 * (len(FWD_FLAGS) + len(BWD_FLAGS))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--quick", action="store_true", help="bf16 only (every flag combination)")
    args = p.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    dtypes = ("bf16",) if args.quick else ("fp32", "bf16", "fp16")
    n = 0
    modes = [d.mode for d in DIVERGENCES.values()]
    for dtype, mode, clip in itertools.product(dtypes, modes, (False, True)):
        for with_div, store_c in FWD_FLAGS:
            triton.compile(_fwd(dtype, mode, clip, with_div, store_c), target=target)
            n += 1
        for div, sampled in BWD_FLAGS:
            k = triton.compile(_bwd(dtype, mode, clip, div, sampled), target=target)
            n += 1
    assert n == variant_count(len(dtypes))
    print(
        f"compiled {n} kernel variants for sm_{args.arch}; last: {k.metadata.num_warps} warps, "
        f"{k.metadata.shared} bytes shared"
    )
    for dtype, k_pad in itertools.product(dtypes, TOP_K_PADS):
        k = triton.compile(_top_k(dtype, k_pad), target=target)
    print(
        f"compiled {len(dtypes) * len(TOP_K_PADS)} top-k variants for sm_{args.arch}; last: "
        f"{k.metadata.num_warps} warps, {k.metadata.shared} bytes shared"
    )


if __name__ == "__main__":
    main()
