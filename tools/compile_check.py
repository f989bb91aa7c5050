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

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from renio_kernels.ops.triton_bwd import _renio_bwd_kernel  # noqa: E402
from renio_kernels.ops.triton_fwd import _renio_fwd_kernel  # noqa: E402

SCALARS_FWD = {"T": "i32", "V": "i32", **{k: "i64" for k in (
    "s_stride_b", "s_stride_t", "t_stride_b", "t_stride_t", "l_stride_b", "l_stride_t")},
    "inv_tau": "fp32", "beta": "fp32", "log_beta": "fp32", "log_1m_beta": "fp32",
    "token_clip": "fp32", "ignore_index": "i32"}  # fmt: skip


def _fwd(dtype: str, beta_mode: int, clip: bool, with_div: bool, store_c: bool):
    sig = {"s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "labels_ptr": "*i64"}
    sig |= {k: "*fp32" for k in ("lse_s_ptr", "lse_t_ptr", "ls_x_ptr", "lt_x_ptr")}
    sig |= {
        "d_ptr": "*fp32" if with_div else "constexpr",
        "c_ptr": "*fp32" if store_c else "constexpr",
    }
    sig |= SCALARS_FWD
    sig |= {k: "constexpr" for k in ("BETA_MODE", "CLIP", "WITH_DIVERGENCE", "STORE_C", "BLOCK_V")}
    consts = {"BETA_MODE": beta_mode, "CLIP": clip, "WITH_DIVERGENCE": with_div,
              "STORE_C": store_c, "BLOCK_V": 4096}  # fmt: skip
    if not with_div:
        consts["d_ptr"] = None
    if not store_c:
        consts["c_ptr"] = None
    return ASTSource(_renio_fwd_kernel, sig, {(list(sig).index(k),): v for k, v in consts.items()})


def _bwd(dtype: str, beta_mode: int, clip: bool, div: bool, sampled: bool):
    sig = {"s_ptr": f"*{dtype}", "t_ptr": f"*{dtype}", "labels_ptr": "*i64"}
    sig |= {"lse_s_ptr": "*fp32", "lse_t_ptr": "*fp32"}
    sig |= {"c_ptr": "*fp32" if div else "constexpr", "gd_ptr": "*fp32" if div else "constexpr"}
    sig |= {"gx_ptr": "*fp32" if sampled else "constexpr", "grad_ptr": f"*{dtype}"}
    sig |= SCALARS_FWD | {"g_stride_b": "i64", "g_stride_t": "i64"}
    sig = {k: sig[k] for k in _renio_bwd_kernel.arg_names if k in sig}
    sig |= {
        k: "constexpr" for k in ("BETA_MODE", "CLIP", "HAS_DIV_GRAD", "HAS_SAMPLED_GRAD", "BLOCK_V")
    }
    consts = {"BETA_MODE": beta_mode, "CLIP": clip, "HAS_DIV_GRAD": div,
              "HAS_SAMPLED_GRAD": sampled, "BLOCK_V": 4096}  # fmt: skip
    for k, on in (("c_ptr", div), ("gd_ptr", div), ("gx_ptr", sampled)):
        if not on:
            consts[k] = None
    return ASTSource(_renio_bwd_kernel, sig, {(list(sig).index(k),): v for k, v in consts.items()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--quick", action="store_true", help="bf16 only (every flag combination)")
    args = p.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    dtypes = ("bf16",) if args.quick else ("fp32", "bf16", "fp16")
    n = 0
    for dtype, mode, clip in itertools.product(dtypes, (0, 1, 2), (False, True)):
        for with_div, store_c in ((True, True), (True, False), (False, False)):
            triton.compile(_fwd(dtype, mode, clip, with_div, store_c), target=target)
            n += 1
        for div, sampled in ((True, False), (False, True), (True, True)):
            k = triton.compile(_bwd(dtype, mode, clip, div, sampled), target=target)
            n += 1
    print(
        f"compiled {n} kernel variants for sm_{args.arch}; last: {k.metadata.num_warps} warps, "
        f"{k.metadata.shared} bytes shared"
    )


if __name__ == "__main__":
    main()
