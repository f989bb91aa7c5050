"""What a benchmark point is, and the presets (the full shape grids, and a CPU quick mode)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["MODES", "Problem", "PRESETS", "Preset", "phases"]

MODES = ("forward", "backward", "forward+backward")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Problem:
    """One shape. ``kind`` is "logits" (inputs are logits) or "fused-linear" (hidden states and
    lm_head weights; ``hidden`` is H, the same for student and teacher)."""

    kind: str
    tokens: int
    vocab: int
    dtype: str
    hidden: int = 0
    beta: float = 0.0

    @property
    def batch(self) -> int:
        # ReNIO weights are per sequence: several sequences make the per-sequence reduction real.
        return 4 if self.tokens % 4 == 0 else 1

    @property
    def seq(self) -> int:
        return self.tokens // self.batch

    @property
    def elt_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def logits_bytes(self) -> int:
        """Bytes of one (B*T, V) logits tensor in the input dtype: the unit of our memory goal."""
        return self.tokens * self.vocab * self.elt_bytes

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Preset:
    logits_vocabs: tuple[int, ...]
    logits_tokens: tuple[int, ...]
    fl_vocabs: tuple[int, ...]
    fl_tokens: tuple[int, ...]
    hiddens: tuple[int, ...]
    dtypes: tuple[str, ...]
    # Extra (dtype, vocab) logits grids run after the main one, while the time budget lasts.
    extra_logits: tuple[tuple[str, int], ...] = field(default=())
    extra_logits_tokens: tuple[int, ...] = field(default=())  # empty: logits_tokens
    description: str = ""


PRESETS: dict[str, Preset] = {
    # The 2-core CPU quick mode (about 10 minutes): the eager reference costs ~70 ns per logit
    # for forward+backward on one contended core, so the larger vocabulary gets fewer tokens. A
    # small H for fused-linear: its matmuls (4 x 2*B*T*H*V FLOPs) would dominate otherwise.
    "cpu-quick": Preset(
        logits_vocabs=(32000,),
        logits_tokens=(256, 1024),
        fl_vocabs=(32000,),
        fl_tokens=(256, 1024),
        hiddens=(256,),
        dtypes=("float32",),
        extra_logits=(("float32", 151936),),
        extra_logits_tokens=(128, 256),
        description="CPU quick mode: fp32; V=32000 at B*T 256 and 1024, V=151936 at 128 and 256; "
        "fused-linear V=32000, H=256",
    ),
    # The full CPU grid (hours on 2 cores; the memory cap skips what does not fit).
    "cpu-full": Preset(
        logits_vocabs=(32000, 128256, 151936, 262144),
        logits_tokens=(1024, 2048, 4096, 8192),
        fl_vocabs=(32000, 128256, 151936, 262144),
        fl_tokens=(1024, 2048, 4096, 8192),
        hiddens=(512,),
        dtypes=("float32",),
        description="CPU full grid, fp32, H=512",
    ),
    # The GPU grid: bf16 first (the headline), then fp32 logits at two vocabularies.
    "gpu": Preset(
        logits_vocabs=(32000, 128256, 151936, 262144),
        logits_tokens=(1024, 2048, 4096, 8192, 16384),
        fl_vocabs=(32000, 151936),
        fl_tokens=(1024, 4096, 16384),
        hiddens=(2048, 4096),
        dtypes=("bfloat16",),
        extra_logits=(("float32", 32000), ("float32", 151936)),
        description="GPU grid: bf16 logits and fused-linear (H 2048, 4096), fp32 logits",
    ),
    # A few seconds: for trying the harness itself.
    "smoke": Preset(
        logits_vocabs=(1000,),
        logits_tokens=(64, 128),
        fl_vocabs=(1000,),
        fl_tokens=(64,),
        hiddens=(64,),
        dtypes=("float32",),
        description="harness smoke test",
    ),
}


def phases(preset: Preset, beta: float) -> list[tuple[str, list[Problem]]]:
    """``(kind, points)`` groups in the order they run: when the time budget ends a run early,
    the main logits grid (the headline) is done, then fused-linear, then the extra dtypes."""
    main = [
        Problem("logits", t, v, dtype, 0, beta)
        for dtype in preset.dtypes
        for v in preset.logits_vocabs
        for t in preset.logits_tokens
    ]
    fused = [
        Problem("fused-linear", t, v, dtype, h, beta)
        for dtype in preset.dtypes
        for h in preset.hiddens
        for v in preset.fl_vocabs
        for t in preset.fl_tokens
    ]
    tokens = preset.extra_logits_tokens or preset.logits_tokens
    extra = [
        Problem("logits", t, v, dtype, 0, beta) for dtype, v in preset.extra_logits for t in tokens
    ]
    groups = (("logits", main), ("fused-linear", fused), ("logits", extra))
    return [(k, ps) for k, ps in groups if ps]
