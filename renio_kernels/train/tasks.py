"""Problems with checkable answers: the built-in synthetic arithmetic task and JSONL files.

A problem is a dict with ``problem``, ``solution`` (the written-out reference) and ``answer``.
Solutions end with ``#### <answer>`` so the answer checker finds the final answer the same way in
the references, in the student's samples and in GSM8K-style user data.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

__all__ = [
    "DEFAULT_PROMPT",
    "DEFAULT_TEACHER_PROMPT",
    "EVAL_POOL",
    "EVAL_SEED",
    "Problem",
    "TrainStream",
    "eval_pool",
    "format_prompt",
    "extract_answer",
    "is_correct",
    "load_jsonl",
    "synthetic_problem",
    "synthetic_problems",
]

Problem = dict  # {"problem": str, "solution": str, "answer": str}

_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_BOXED = re.compile(r"\\boxed\{\s*(-?[\d,]*\.?\d+)\s*\}")
_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*|-?\.\d+")


def synthetic_problem(rng: random.Random, min_ops: int = 3, max_ops: int = 4) -> Problem:
    """A chain of 2-digit additions/subtractions, solved one step per line.

    ``58+27-31+64`` -> ``58+27=85`` / ``85-31=54`` / ``54+64=118`` / ``#### 118``. The running
    value never goes negative, so every step is a plain 2- or 3-digit carry/borrow problem: easy
    to check, and a small character-level model still gets some carries wrong.
    """
    value = rng.randint(10, 99)
    text, steps = str(value), []
    for _ in range(rng.randint(min_ops, max_ops)):
        b = rng.randint(10, 99)
        op = "-" if (value - b >= 0 and rng.random() < 0.5) else "+"
        new = value + b if op == "+" else value - b
        steps.append(f"{value}{op}{b}={new}")
        text += f"{op}{b}"
        value = new
    solution = "\n".join(steps) + f"\n#### {value}"
    return {"problem": text, "solution": solution, "answer": str(value)}


def synthetic_problems(seed: int, n: int, exclude: set[str] | None = None) -> list[Problem]:
    """``n`` problems drawn from ``seed``, skipping any whose text is in ``exclude``."""
    rng = random.Random(seed)
    out: list[Problem] = []
    while len(out) < n:
        p = synthetic_problem(rng)
        if exclude is None or p["problem"] not in exclude:
            out.append(p)
    return out


def _normalize(number: str) -> str:
    number = number.replace(",", "").strip()
    try:
        value = float(number)
    except ValueError:
        return number
    return str(int(value)) if value.is_integer() else repr(value)


def extract_answer(text: str) -> str | None:
    """The final answer of a written solution: after ``####``, else in ``\\boxed{}``, else the
    last number; None when the text has no number at all."""
    for pattern in (_FINAL, _BOXED):
        found = pattern.findall(text)
        if found:
            return _normalize(found[-1])
    numbers = _NUMBER.findall(text)
    return _normalize(numbers[-1]) if numbers else None


def is_correct(completion: str, answer: str) -> bool:
    """True when the completion's final answer equals the reference answer numerically."""
    got = extract_answer(completion)
    return got is not None and got == _normalize(str(answer))


def load_jsonl(path: str | Path) -> list[Problem]:
    """Read ``problem``/``solution``/``answer`` records; errors name the file, line and fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"data file {str(path)!r} does not exist: pass --data PATH.jsonl with one JSON object "
            "per line holding 'problem', 'solution' and 'answer', or --data synthetic"
        )
    records: list[Problem] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON "
                    "object with 'problem', 'solution' and 'answer'"
                ) from None
            if not isinstance(rec, dict):
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}"
                )
            missing = [k for k in ("problem", "solution", "answer") if k not in rec]
            if missing:
                raise ValueError(
                    f"{path}:{lineno}: missing key(s) {missing}; each record needs 'problem', "
                    "'solution' and 'answer'"
                )
            if not isinstance(rec["problem"], str) or not rec["problem"].strip():
                raise ValueError(f"{path}:{lineno}: 'problem' must be a non-empty string")
            records.append(
                {
                    "problem": rec["problem"],
                    "solution": str(rec["solution"]),
                    "answer": str(rec["answer"]),
                }
            )
    if not records:
        raise ValueError(f"data file {str(path)!r} holds no records")
    return records


# The held-out problems are the first EVAL_POOL draws of EVAL_SEED; training never sees them.
EVAL_SEED = 1_000_003
EVAL_POOL = 2000
DEFAULT_PROMPT = "Q: {problem}\nA: "
DEFAULT_TEACHER_PROMPT = "Q: {problem}\nReference:\n{solution}\nA: "


def eval_pool() -> list[Problem]:
    return synthetic_problems(EVAL_SEED, EVAL_POOL)


def format_prompt(template: str, problem: Problem) -> str:
    try:
        return template.format(**problem)
    except KeyError as e:
        raise ValueError(
            f"prompt template {template!r} uses {{{e.args[0]}}}; available fields: "
            "{problem}, {solution}, {answer}"
        ) from None


class TrainStream:
    """Training problems as a pure function of (seed, index): resuming at a step re-reads
    exactly the problems an uninterrupted run would have seen, with no iterator state to save.

    Synthetic: problem ``i`` is drawn from ``Random((seed, i))`` and redrawn if held out.
    Records: epoch ``e`` is a permutation seeded by ``(seed, e)``.
    """

    def __init__(self, seed: int, records: list[Problem] | None = None):
        self.seed = seed
        self.records = records
        self._held_out = {p["problem"] for p in eval_pool()} if records is None else set()
        self._perms: dict[int, list[int]] = {}

    def __getitem__(self, i: int) -> Problem:
        if self.records is None:
            rng = random.Random(f"{self.seed}:{i}")
            while True:
                p = synthetic_problem(rng)
                if p["problem"] not in self._held_out:
                    return p
        n = len(self.records)
        epoch, j = divmod(i, n)
        if epoch not in self._perms:
            perm = list(range(n))
            random.Random(f"{self.seed}:epoch{epoch}").shuffle(perm)
            self._perms = {epoch: perm}
        return self.records[self._perms[epoch][j]]
