"""Checkpoints that resume bit-for-bit: model, optimizer, scheduler, loss state, the EMA teacher
(``--teacher-ema``) and every RNG.

Layout: ``RUN/checkpoints/step-000050/{state.pt, rng-rank0.pt, ...}``. Rank 0 writes the shared
state; each rank writes its own RNG (each rank samples different completions). A checkpoint is
written to a temporary directory and renamed into place, so a crash never leaves a half one.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "clean_partial_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 (libraries use the legacy global)
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trainable_state(model) -> dict:
    """Only what training changes (all weights, or the LoRA adapters), so checkpoints of a
    LoRA run stay small."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}


def _disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    # torch.save to a path reports a failed write as "[enforce fail at inline_container.cc...]
    # ... unexpected pos" or "file write failed", without the errno.
    return "No space left" in text or "inline_container" in text or "file write failed" in text


def _free_space(path: Path) -> str:
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "unknown"
    return f"{free / 2**20:.1f} MiB"


def _save(obj, path: Path) -> None:
    """``torch.save`` through a Python file (so a failed write is an OSError with its errno),
    flushed to disk before the checkpoint directory is renamed into place."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_failed(err: BaseException, tmp: Path, step: int) -> Exception:
    root = tmp.parent
    where = f"{root} ({_free_space(root)} free there)"
    kept = "the checkpoints already in that directory are intact; --resume RUN continues from "
    kept += "the newest"
    if _disk_full(err):
        message = (
            f"the disk is full: checkpoint step-{step:06d} could not be written to {where}. The "
            f"half-written checkpoint was removed and {kept}. Free some space (or lower "
            f"--keep-checkpoints), then resume. ({type(err).__name__}: {err})"
        )
        return OSError(errno.ENOSPC, message)
    return OSError(
        getattr(err, "errno", None) or errno.EIO,
        f"checkpoint step-{step:06d} could not be written to {where}: "
        f"{type(err).__name__}: {err}. The half-written checkpoint was removed and {kept}",
    )


def clean_partial_checkpoints(run_dir: Path) -> list[Path]:
    """Remove ``checkpoints/.tmp-step-*``: checkpoints a killed run was still writing (never
    picked by ``--resume``). Returns what was removed."""
    stale = sorted(Path(run_dir, "checkpoints").glob(".tmp-step-*"))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    rank: int,
    world: int,
    barrier,
    model,
    optimizer,
    scheduler,
    ema_state,
    keep: int,
    teacher_ema=None,
) -> Path:
    """Write ``RUN/checkpoints/step-N`` through ``.tmp-step-N`` renamed into place, so a crash
    or a full disk never leaves a half checkpoint under a name ``--resume`` picks. A failed
    write removes the temporary directory and raises an OSError that says where and why (the
    disk is full: ``errno.ENOSPC``)."""
    root = run_dir / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
        except OSError as err:
            raise _write_failed(err, tmp, step) from err
    barrier()
    try:
        _save(rng_state(), tmp / f"rng-rank{rank}.pt")
        if rank == 0:
            _save(
                {
                    "step": step,
                    "world_size": world,
                    "model": _trainable_state(model),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "ema_state": ema_state.clone(),
                    "teacher_ema": None if teacher_ema is None else teacher_ema.state_dict(),
                },
                tmp / "state.pt",
            )
    except (OSError, RuntimeError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(err, tmp, step) from err
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if keep > 0:
            for old in sorted(root.glob("step-*"))[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def latest_checkpoint(path: Path) -> Path:
    """``path`` itself when it is a checkpoint, else the newest one of the run directory."""
    path = Path(path)
    if (path / "state.pt").is_file():
        return path
    found = sorted((path / "checkpoints").glob("step-*"))
    found = [p for p in found if (p / "state.pt").is_file()]
    if not found:
        raise FileNotFoundError(
            f"--resume {str(path)!r}: no checkpoint there (expected RUN/checkpoints/step-N/"
            "state.pt); pass a run directory that saved one (--save-every) or a step-N directory"
        )
    return found[-1]


def load_checkpoint(
    ckpt: Path, *, rank: int, world: int, model, optimizer, scheduler, ema_state, teacher_ema=None
) -> tuple[int, dict]:
    """Restore in place; returns the step and this rank's RNG state, to set right before the
    loop (model loading and evaluation may draw random numbers in between). ``teacher_ema``
    (``--teacher-ema``) needs a checkpoint that saved one; a run resumed without it drops the
    checkpoint's average and goes back to the frozen initial teacher."""
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    if state["world_size"] != world:
        raise ValueError(
            f"checkpoint {str(ckpt)!r} was written by {state['world_size']} process(es); resume "
            f"it with the same number (got {world}), or continuing would not be bit-for-bit"
        )
    expected = _trainable_state(model)
    missing = set(expected) - set(state["model"])
    if missing:
        raise ValueError(
            f"checkpoint {str(ckpt)!r} does not match this model (e.g. missing "
            f"{sorted(missing)[:2]}); resume with the run's own config"
        )
    resized = [
        k for k, v in state["model"].items() if k in expected and v.shape != expected[k].shape
    ]
    if resized:
        k = resized[0]
        raise ValueError(
            f"checkpoint {str(ckpt)!r} does not match this model ({len(resized)} weight(s) of "
            f"another shape, e.g. {k}: {tuple(state['model'][k].shape)} in the checkpoint, "
            f"{tuple(expected[k].shape)} here); resume with the run's own --student"
        )
    saved_ema = state.get("teacher_ema")
    if teacher_ema is not None and saved_ema is None:
        raise ValueError(
            f"checkpoint {str(ckpt)!r} has no EMA teacher: its run had no --teacher-ema, so "
            "the average cannot be continued; resume without --teacher-ema (or --teacher-ema "
            "none), or start a new run"
        )
    if teacher_ema is not None:
        teacher_ema.load_state_dict(saved_ema, f"checkpoint {str(ckpt)!r}")
    model.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    ema_state.copy_(state["ema_state"])
    rng = torch.load(ckpt / f"rng-rank{rank}.pt", map_location="cpu", weights_only=False)
    return state["step"], rng
