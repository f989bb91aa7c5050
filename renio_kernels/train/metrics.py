"""Per-step metrics: the weight AUROC, metrics.jsonl, optional TensorBoard."""

from __future__ import annotations

import json
import math
import os
import resource
import warnings
from pathlib import Path

import torch

__all__ = ["MetricsWriter", "auroc", "peak_memory_mb", "read_metrics", "records_to_resume"]


def auroc(scores: list[float], positive: list[bool]) -> float | None:
    """Probability that a random positive scores above a random negative (ties count half).

    The Mann-Whitney statistic from average ranks, O(n log n). None when either class is empty:
    a batch of only correct (or only incorrect) samples says nothing about separation.
    """
    n_pos = sum(bool(p) for p in positive)
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        avg = (i + j) / 2 + 1  # ranks are 1-based; a tie group shares its mean rank
        for k in range(i, j + 1):
            ranks[order[k]] = avg
        i = j + 1
    rank_sum = sum(r for r, p in zip(ranks, positive, strict=True) if p)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Appends one JSON object per line; mirrors scalars to TensorBoard when it is installed."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def replace(self, records: list[dict]) -> None:
        """Rewrite the file with ``records`` (on resume: ``records_to_resume``), atomically: a
        crash while rewriting leaves the old file."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        record = {k: _clean(v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(k, v, record.get("step", 0))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path, *, torn_tail: str = "error") -> list[dict]:
    """The records of a metrics.jsonl.

    A line that is not a JSON object is a ValueError naming the file and line, except a torn
    last line (a crash or a full disk mid-write) when ``torn_tail="drop"``: it is dropped with a
    warning (on resume, where the records after the checkpoint are rewritten anyway).
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    records = []
    for k, (i, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if torn_tail == "drop" and k == len(numbered) - 1:
                warnings.warn(
                    f"{path}:{i}: dropping a torn last line ({e}): the run stopped while "
                    "writing it; the records after the checkpoint are written again",
                    RuntimeWarning,
                    stacklevel=2,
                )
                break
            raise ValueError(
                f"{path}:{i} is not a JSON record ({e}); fix or delete that line"
            ) from None
        records.append(record)
    return records


def records_to_resume(path: Path, step: int) -> list[dict]:
    """The records of a run resumed from its step-``step`` checkpoint: everything written
    before that checkpoint. Records of later steps go, and so does a final eval at ``step``
    (written after the checkpoint, once the loop had ended): the resumed run writes its own.
    A torn last line is dropped with a warning. Empty when there is no file yet."""
    path = Path(path)
    if not path.exists():
        return []
    kept = [r for r in read_metrics(path, torn_tail="drop") if r.get("step", 0) <= step]
    last_train = max(
        (i for i, r in enumerate(kept) if r.get("kind") == "train" and r.get("step") == step),
        default=None,
    )
    if last_train is None:
        return kept
    return kept[: last_train + 1] + [
        r for r in kept[last_train + 1 :] if not (r.get("kind") == "eval" and r["step"] == step)
    ]
