"""Types shared by the row kernels of every backend."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = ["DivergenceParams", "RowStats"]


@dataclass(frozen=True)
class DivergenceParams:
    """What a row kernel needs to know (validated upstream by ``ReNIOOptions``)."""

    beta: float = 0.0
    temperature: float = 1.0
    token_clip: float | None = None
    ignore_index: int = -100

    @property
    def beta_mode(self) -> int:
        """0: forward KL, 1: reverse KL, 2: generalized JSD (a compile-time switch)."""
        if self.beta == 0.0:
            return 0
        if self.beta == 1.0:
            return 1
        return 2

    @property
    def clip_on(self) -> bool:
        return self.token_clip is not None and self.token_clip > 0

    @property
    def clip_value(self) -> float:
        return float(self.token_clip) if self.clip_on else 0.0

    @property
    def inv_tau(self) -> float:
        return 1.0 / float(self.temperature)

    @property
    def log_beta(self) -> float:
        return math.log(self.beta) if 0.0 < self.beta < 1.0 else 0.0

    @property
    def log_1m_beta(self) -> float:
        return math.log1p(-self.beta) if 0.0 < self.beta < 1.0 else 0.0


class RowStats(NamedTuple):
    """Per-row forward results, each ``(B, T)`` float32, 0 at ignored positions.

    ``lse_s``/``lse_t``: log-sum-exp of ``logits / tau`` (student; teacher's first Vs columns).
    ``ls_x``/``lt_x``: log-probabilities of the sampled token. ``d``: divergence
    ``sum_v clamp(e_v)``. ``c``: ``C = sum_v c_v`` for the backward pass (None when not needed).
    """

    lse_s: torch.Tensor
    lse_t: torch.Tensor
    ls_x: torch.Tensor
    lt_x: torch.Tensor
    d: torch.Tensor
    c: torch.Tensor | None
