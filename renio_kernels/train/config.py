"""Every option of a training run: defaults, command-line flags and YAML/JSON config files.

Precedence: defaults < ``--config FILE`` < flags given on the command line. The loss options
are derived from ``ReNIOOptions`` (``option_fields()``: the names, defaults, documentation and
allowed values of docs/SPEC.md), so a new option is a key and a ``--flag`` here without an edit;
the one exception is ``use_renio``, which ``--objective`` decides. The resolved config is written to
``RUN/config.yaml``, which ``--config`` reads back, so a run can be repeated from its own
directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..core.options import ReNIOOptions, option_fields
from ..ops.backends import BACKENDS
from .models import ASSETS
from .tasks import DEFAULT_PROMPT, DEFAULT_TEACHER_PROMPT

__all__ = ["TrainConfig", "given_values", "loss_options", "parse_config", "typed_value"]

MODES = ("opd", "opsd")
OBJECTIVES = ("renio", "opd", "sampled-reverse-kl")
FILTERS = ("all", "correct", "incorrect")
LOSS_IMPLS = ("fused-linear", "logits")


@dataclass
class _RunSettings:
    """Every setting that is not a loss option (``TrainConfig`` adds those)."""

    # run
    out: str | None = field(default=None, metadata={"help": "run directory (default runs/<time>)"})
    resume: str | None = field(
        default=None,
        metadata={
            "help": "continue a run directory (its latest checkpoint) or a checkpoint directory"
        },
    )
    compare: str | None = field(
        default=None,
        metadata={"help": "comma-separated objectives run from the same start, e.g. renio,opd"},
    )
    mode: str = field(
        default="opd",
        metadata={
            "choices": MODES,
            "help": "opd: separate teacher; opsd: self-distillation, the teacher is "
            "the frozen initial student that also sees the reference solution",
        },
    )
    objective: str = field(
        default="renio",
        metadata={
            "choices": OBJECTIVES,
            "help": "renio; opd (= use_renio off); sampled-reverse-kl",
        },
    )
    sgo_filter: str = field(
        default="all",
        metadata={
            "choices": FILTERS,
            "help": "train only on completions whose answer is right/wrong",
        },
    )
    loss_impl: str = field(
        default="fused-linear",
        metadata={
            "choices": LOSS_IMPLS,
            "help": "fused-linear: hidden states + lm_head weights (never the "
            "full logits); logits: the model's logits",
        },
    )
    backend: str = field(
        default="auto", metadata={"choices": BACKENDS, "help": "loss backend (row kernels)"}
    )
    # models and data
    student: str = str(ASSETS / "student")
    teacher: str = str(ASSETS / "teacher")
    data: str = field(
        default="synthetic",
        metadata={"help": "'synthetic' or a JSONL file with problem/solution/answer per line"},
    )
    eval_data: str | None = field(
        default=None,
        metadata={
            "help": "JSONL of held-out problems (default: the synthetic held-out pool, or the last "
            "--eval-problems records of --data, which are then not trained on)"
        },
    )
    prompt_template: str = DEFAULT_PROMPT
    teacher_prompt_template: str = field(
        default=DEFAULT_TEACHER_PROMPT,
        metadata={"help": "the teacher's prompt in --mode opsd ({problem}, {solution}, {answer})"},
    )
    attn_implementation: str = field(
        default="auto",
        metadata={
            "help": "auto (flash_attention_2 with flash-attn on a GPU, else sdpa), sdpa, eager, ..."
        },
    )
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0: full fine-tuning; needs peft)"})
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    # sampling
    sample_temperature: float = 1.0
    top_p: float = 1.0
    sample_top_k: int = field(default=0, metadata={"help": "0: off"})
    max_new_tokens: int = 64
    # optimization
    steps: int = 1000
    batch_size: int = field(default=32, metadata={"help": "prompts per micro-batch per rank"})
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 20
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine floor, times --lr"})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast (GPU only)"})
    seed: int = 0
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, ..."})
    threads: int | None = field(
        default=None,
        metadata={
            "help": "torch CPU threads; default 1 on CPU: the tiny models' ops are too small to "
            "split, and on a busy machine extra threads spin-wait (measured 50x slower sampling)"
        },
    )
    # evaluation, logging, checkpoints
    eval_problems: int = 512
    eval_every: int = field(default=250, metadata={"help": "also evaluate every N steps (0: off)"})
    eval_batch_size: int = 128
    save_every: int = field(default=250, metadata={"help": "checkpoint every N steps (0: end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "newest N kept (0: all)"})
    tensorboard: bool = field(
        default=True, metadata={"help": "also log to TensorBoard if installed"}
    )
    plots: bool = True
    progress: bool = True

    def validate(self) -> None:
        for name, allowed in (
            ("mode", MODES),
            ("objective", OBJECTIVES),
            ("sgo_filter", FILTERS),
            ("loss_impl", LOSS_IMPLS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be one of {allowed}, "
                    f"got {getattr(self, name)!r}"
                )
        for name in ("steps", "batch_size", "grad_accum", "max_new_tokens", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        for name in (
            "eval_problems",
            "eval_every",
            "save_every",
            "warmup_steps",
            "lora_r",
            "keep_checkpoints",
            "sample_top_k",
        ):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}"
                )
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1 (or none: the default), got {self.threads}")
        if self.lora_r > 0 and self.lora_alpha <= 0:
            raise ValueError(f"--lora-alpha must be > 0, got {self.lora_alpha}")
        for name, low, high in (
            ("lr", 0.0, math.inf),
            ("max_grad_norm", 0.0, math.inf),
        ):
            value = getattr(self, name)
            if not low < value < high:
                raise ValueError(f"--{name.replace('_', '-')} must be finite and > 0, got {value}")
        for name, low, high in (
            ("weight_decay", 0.0, math.inf),
            ("min_lr_ratio", 0.0, 1.0),
            ("lora_dropout", 0.0, 1.0),
        ):
            value = getattr(self, name)
            if not low <= value <= high or (name == "lora_dropout" and value == 1.0):
                raise ValueError(
                    f"--{name.replace('_', '-')} must be in [{low:g}, {high:g}"
                    f"{')' if name == 'lora_dropout' else ']'}, got {value}"
                )
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.objective == "renio" and self.use_renio is False:
            raise ValueError(
                "--objective renio with --use-renio false is plain OPD: use --objective opd"
            )
        if self.objective == "opd" and self.use_renio:
            raise ValueError("--objective opd turns ReNIO off; use --objective renio instead")
        loss_options(self)  # the loss's own checks, before any run directory exists
        if not (0 < self.top_p <= 1):
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 < self.sample_temperature < math.inf:
            raise ValueError(
                f"--sample-temperature must be finite and > 0, got {self.sample_temperature}"
            )
        if self.compare:
            names = self.compare_objectives()
            bad = [n for n in names if n not in OBJECTIVES]
            if bad or len(names) < 2:
                raise ValueError(
                    f"--compare takes two or more of {OBJECTIVES} separated by "
                    f"commas, got {self.compare!r}"
                )

    def compare_objectives(self) -> list[str]:
        return [n.strip() for n in (self.compare or "").split(",") if n.strip()]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Option fields whose config key is not the record's: ``use_renio`` follows ``--objective``.
DERIVED_FROM_OBJECTIVE = {
    "use_renio": field(
        default=None, metadata={"help": "default: from --objective (renio: on, opd: off)"}
    ),
}


def _option_field(f: dataclasses.Field) -> tuple:
    if f.name in DERIVED_FROM_OBJECTIVE:
        return f.name, f"{f.type} | None", DERIVED_FROM_OBJECTIVE[f.name]
    paper = f.metadata["paper_flag"]
    meta = {"help": f.metadata["doc"] + (f" (paper: {paper})" if paper else "")}
    if f.metadata["choices"]:
        meta["choices"] = f.metadata["choices"]
    return f.name, f.type, field(default=f.default, metadata=meta)


TrainConfig = dataclasses.make_dataclass(
    "TrainConfig",
    [_option_field(f) for f in option_fields()],
    bases=(_RunSettings,),
    namespace={"__doc__": "A training run: ``_RunSettings`` plus every loss option."},
)
TrainConfig.__module__ = __name__


def loss_options(cfg: TrainConfig) -> ReNIOOptions:
    """The validated loss options of the run; ``use_renio`` from ``--objective``."""
    values = {f.name: getattr(cfg, f.name) for f in option_fields()}
    values["use_renio"] = cfg.objective == "renio"
    return ReNIOOptions(**values)


def _bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _optional(kind):
    def parse(text: str):
        return None if str(text).lower() in ("none", "null", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


_FIELD_TYPES = {
    "str": str,
    "str | None": _optional(str),
    "int": int,
    "int | None": _optional(int),
    "float": float,
    "float | None": _optional(float),
    "bool": _bool,
    "bool | None": _optional(_bool),
}
_EXPECTED = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def typed_value(name: str, value, where: str):
    """``value`` of the key ``name`` read from a file (``where``), typed and checked as its flag.

    Strings go through the flag's own parser (so ``"2"``, ``"5e-4"`` (YAML 1.1 reads that as a
    string), ``"false"`` and ``"none"`` mean what they mean on the command line); YAML/JSON
    numbers and booleans must already have the flag's type (an integer for an int key, a number
    for a float key, true/false for a bool key). ValueError naming the key, the value and the
    expected type otherwise, or when the value is not one of the flag's choices.
    """
    f = _fields()[name]
    kind = str(f.type)
    base, optional = kind.split(" |")[0], kind.endswith("| None")
    expected = _EXPECTED[base] + (" or null" if optional else "")

    def bad():
        return ValueError(
            f"{where}: key {name!r}: expected {expected}, got {value!r} ({type(value).__name__})"
        )

    if value is None:
        if not optional:
            raise bad()
        out = None
    elif isinstance(value, str):
        try:
            out = _FIELD_TYPES[kind](value)
        except (ValueError, argparse.ArgumentTypeError):
            raise bad() from None
    elif isinstance(value, bool):
        if base != "bool":
            raise bad()
        out = value
    elif isinstance(value, int):
        if base == "float":
            out = float(value)
        elif base == "int":
            out = value
        elif base == "bool" and value in (0, 1):
            out = bool(value)
        elif base == "str":
            out = str(value)
        else:
            raise bad()
    elif isinstance(value, float):
        if base == "float":
            out = value
        elif base == "str":
            out = str(value)
        else:
            raise bad()
    else:
        raise bad()
    choices = f.metadata.get("choices")
    if choices and out is not None and out not in choices:
        raise ValueError(f"{where}: key {name!r}: expected one of {tuple(choices)}, got {value!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="renio-train",
        description="On-policy distillation with the ReNIO loss. `renio-train sft --help` for "
        "the supervised subcommand that makes the shipped models.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="YAML or JSON file with the same keys as the flags")
    for f in dataclasses.fields(TrainConfig):
        kind = _FIELD_TYPES[str(f.type)]
        help_text = f.metadata.get("help", "")
        default = f.default
        help_text = f"{help_text} (default: {default})" if help_text else f"default: {default}"
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=kind,
            dest=f.name,
            choices=f.metadata.get("choices"),
            help=help_text,
            metavar=None if "choices" in f.metadata else f.name.upper(),
        )
    return p


def read_config_file(path: str | Path) -> dict:
    """The typed values of a YAML or JSON config file (``typed_value`` for each key)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml and json raise different types; both mean a malformed file
        raise ValueError(f"config file {str(path)!r} is malformed: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of option: value")
    known = _fields()
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ValueError(
                f"config file {str(path)!r}: unknown key {key!r}; the keys are the "
                f"flag names, e.g. {sorted(known)[:6]}..."
            )
        out[name] = typed_value(name, value, f"config file {str(path)!r}")
    return out


def given_values(argv: list[str] | None) -> dict:
    """The values the user gave: the ``--config`` file's, then the flags on the command line
    (typed; no defaults). A ``--resume`` lays exactly these over the run's saved config, so a
    flag whose value equals its default still wins."""
    ns = vars(build_parser().parse_args(argv))  # argument_default=SUPPRESS: only given flags
    values: dict = {}
    config_path = ns.pop("config", None)
    if config_path:
        values.update(read_config_file(config_path))
    values.update(ns)
    return values


def parse_config(argv: list[str] | None) -> TrainConfig:
    """Defaults, then the config file, then the flags given on the command line."""
    cfg = TrainConfig(**given_values(argv))
    cfg.validate()
    return cfg
