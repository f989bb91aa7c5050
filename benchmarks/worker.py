"""One child process: times one provider on a list of points and prints a JSON line per mode.

Run by ``runner`` as ``python -m benchmarks.worker '<json>'``. A fresh process per provider (on
the CPU, per point) keeps one provider's caches, compiled graphs and allocator state out of
another's numbers, and lets a crash, a timeout or an out-of-memory fail one point only.

Memory: the peak above the level with only the inputs allocated (plus, for "backward", the
forward's saved tensors: its window is the backward call alone). On CUDA that is
``max_memory_allocated`` after ``reset_peak_memory_stats``. On the CPU it is the kernel's own
high-water mark of resident memory (``VmHWM``, reset through ``/proc/self/clear_refs``), which
sees every spike, unlike sampling. Before the baseline is read, ``malloc_trim(0)`` hands the heap
memory that glibc kept from the warm-up back to the OS; otherwise the measured call would reuse
it unseen. The memory call is not one of the timed calls: those run with glibc's normal reuse,
as a training loop does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import re
import sys
import time
import traceback

import torch

from .problems import Problem
from .providers import Unavailable, build_case

RESULT_PREFIX = "RESULT "


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) * 1024


def _malloc_trim() -> None:
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline may include retained heap
        pass


class MemoryProbe:
    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            _malloc_trim()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.base = _status_kib("VmRSS")

    def peak_extra(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return max(0, _status_kib("VmHWM") - self.base)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _clear(leaves: list[torch.Tensor]) -> None:
    for leaf in leaves:
        leaf.grad = None


def run_mode(case, mode: str, device: str, probe: MemoryProbe | None) -> float:
    """One call of ``mode``; returns its seconds, and fills the probe's window if given."""
    _clear(case.leaves)
    _sync(device)
    if mode == "backward":
        loss = case.run()
        _sync(device)
    if probe:
        probe.start()
    t0 = time.perf_counter()
    if mode == "forward":
        loss = case.run()
    elif mode == "forward+backward":
        case.run().backward()
    else:
        loss.backward()
    _sync(device)
    elapsed = time.perf_counter() - t0
    if mode == "forward":
        del loss
    return elapsed


def measure(case, mode: str, device: str, cfg: dict) -> dict:
    first = run_mode(case, mode, device, None)  # warm-up: compilation, autotuning, allocator
    for _ in range(cfg["warmup"] - 1):
        run_mode(case, mode, device, None)
    probe = MemoryProbe(device)
    run_mode(case, mode, device, probe)
    peak = probe.peak_extra()
    _clear(case.leaves)
    times: list[float] = []
    spent = 0.0
    more = lambda: spent < cfg["budget_s"] and len(times) < cfg["max_reps"]
    while len(times) < cfg["min_reps"] or more():
        times.append(run_mode(case, mode, device, None))
        spent += times[-1]
    levels = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    q = torch.tensor(times, dtype=torch.float64).quantile(levels)
    return {
        "status": "ok",
        "p20_ms": q[0].item() * 1e3,
        "median_ms": q[1].item() * 1e3,
        "p80_ms": q[2].item() * 1e3,
        "reps": len(times),
        "first_call_ms": first * 1e3,
        "peak_extra_bytes": peak,
    }


def _failure(err: BaseException) -> str:
    if isinstance(err, Unavailable):
        return f"unavailable: {err}"
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "failed: CUDA out of memory"
    last = str(err).strip().splitlines()
    return f"failed: {type(err).__name__}: {last[0][:200] if last else ''}"


def main(spec: dict) -> None:
    device = spec["device"]
    torch.set_grad_enabled(True)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    for pd in spec["problems"]:
        p = Problem(**pd)
        if time.time() > spec["deadline"]:
            for mode in spec["modes"]:
                _emit(pd, mode, {"status": "skipped: time budget of the run spent"}, "")
            continue
        try:
            case = build_case(spec["provider"], p, device)
        except Exception as err:  # noqa: BLE001 - every failure becomes a row, never a crash
            for mode in spec["modes"]:
                _emit(pd, mode, {"status": _failure(err)}, "")
            continue
        for mode in spec["modes"]:
            try:
                row = measure(case, mode, device, spec["reps"])
            except Exception as err:  # noqa: BLE001
                traceback.print_exc(file=sys.stderr)
                row = {"status": _failure(err)}
            _emit(pd, mode, row, case.note)
            _clear(case.leaves)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        del case
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def _emit(pd: dict, mode: str, row: dict, note: str) -> None:
    line = json.dumps({"problem": pd, "mode": mode, "note": note, **row})
    print(RESULT_PREFIX + line, flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
