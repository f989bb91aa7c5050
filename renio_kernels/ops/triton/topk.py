"""Streaming top-k Triton kernel: the teacher's ``k`` largest columns per row, one read.

Selection rule (``ops.sparse.select_top_k``, one rule for every backend): the ``k`` largest of
``logits[..., :V]``, largest first; among equal values the lower column id first; ``-0.0`` equals
``+0.0``. Each element becomes a distinct int64 key

    key = ordered_bits(x) * 2**32 + (V - 1 - col)

(``ordered_bits``: the float32 bit pattern with the 31 magnitude bits of negative values flipped,
so integer order is float order), and the top ``k`` keys are the answer: the column is
``V - 1 - (key & 0xFFFFFFFF)``.

One program per row keeps the best ``K_PAD`` keys seen so far (``K_PAD``: ``k`` rounded up to a
power of two, as ``tl.topk`` needs) and sweeps the vocabulary in tiles. A tile is merged only when
its largest key beats the smallest kept one: the tile's top ``K_PAD`` (a bitonic ``tl.topk``) and
the kept keys, concatenated, give the new kept keys. After the first tiles the threshold is
high and most tiles cost one max-reduction. Masked lanes load ``-inf`` and take the smallest key.
Rows are addressed as ``b * stride_b + t * stride_t`` in int64. Output: ``(B, T, k)`` int64 ids.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import config

__all__ = ["top_k_triton"]


@triton.jit
def _ordered_key(x, cols, V):
    # + 0.0 turns -0.0 into +0.0, so both are one value.
    bits = (x.to(tl.float32) + 0.0).to(tl.int32, bitcast=True).to(tl.int64)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return bits * 4294967296 + (V - 1 - cols).to(tl.int64)


@triton.jit
def _top_k_kernel(
    x_ptr,
    out_ptr,
    T,
    V,
    k,
    stride_b,
    stride_t,
    K_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    x_row = x_ptr + b * stride_b + t * stride_t
    key_min = tl.full((), -9223372036854775808, tl.int64)
    kept = tl.full((K_PAD,), -9223372036854775808, tl.int64)
    floor = key_min  # the smallest kept key
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=float("-inf"))
        key = tl.where(mask, _ordered_key(x, cols, V), key_min)
        if tl.max(key, axis=0) > floor:
            best = tl.topk(key, K_PAD)
            kept = tl.topk(tl.cat(kept, best), K_PAD)
            floor = tl.min(kept, axis=0)
    ids = (V - 1) - (kept & 0xFFFFFFFF)
    offs = tl.arange(0, K_PAD)
    tl.store(out_ptr + row * k + offs, ids, mask=offs < k)


def top_k_triton(logits: torch.Tensor, vocab: int, k: int) -> torch.Tensor:
    """``(B, T, k)`` int64 ids of the ``k`` largest of ``logits[..., :vocab]`` per row (the rule
    above); ``logits`` ``(B, T, >= vocab)``, last dimension contiguous, ``1 <= k <= vocab``."""
    batch, seq = logits.shape[:2]
    out = torch.empty((batch, seq, k), dtype=torch.int64, device=logits.device)
    if out.numel() == 0:
        return out
    k_pad = triton.next_power_of_2(k)
    tiles = config.TRITON
    block = max(tiles.interpret_top_k_block if config.interpreting() else tiles.top_k_block, k_pad)
    _top_k_kernel[(batch * seq,)](
        logits,
        out,
        seq,
        vocab,
        k,
        logits.stride(0),
        logits.stride(1),
        K_PAD=k_pad,
        BLOCK=block,
        num_warps=config.TRITON.num_warps,
    )
    return out
