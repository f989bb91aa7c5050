"""One child process: measures providers on a list of points and prints a JSON line per
(point, provider, mode).

Run by ``runner`` as ``python -m benchmarks.worker '<json>'``. Two jobs:

* ``time``: all the given providers on each point, their calls interleaved round-robin (A, B, C,
  A, B, C, ...), so a load change on a shared machine hits every provider alike and the ratios
  between them stay fair. On CUDA it also measures memory (the allocator's counters are exact in
  any process).
* ``memory`` (CPU): one provider on one point in a fresh process, so its peak RSS is its own.

Memory is the peak above the level with only the inputs allocated (for "backward": with the
forward's saved tensors too; its window is the backward call alone). On CUDA that is
``max_memory_allocated`` after ``reset_peak_memory_stats``. On the CPU it is the kernel's own
high-water mark of resident memory (``VmHWM``, reset through ``/proc/self/clear_refs``), which
sees every spike, unlike sampling. Before the baseline is read, ``malloc_trim(0)`` hands the heap
memory that glibc kept from the warm-up back to the OS, and the native CPU kernel's gradient cache
is emptied (``renio_kernels.empty_cpu_grad_cache``); otherwise the measured call would reuse that
memory unseen. Timed calls run with glibc's normal reuse and the cache on, as a training loop
does.
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
from .providers import Unavailable, build_case, clear_input_cache

RESULT_PREFIX = "RESULT "


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) * 1024


def _malloc_trim() -> None:
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline may include retained heap
        pass


def _empty_renio_cache() -> None:
    try:
        import renio_kernels
    except ImportError:
        return
    renio_kernels.empty_cpu_grad_cache()


class MemoryProbe:
    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            _empty_renio_cache()
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


def measure_memory(case, mode: str, device: str, warmup: int) -> dict:
    for _ in range(warmup):  # compilation, autotuning, lazy initialization
        run_mode(case, mode, device, None)
    probe = MemoryProbe(device)
    run_mode(case, mode, device, probe)
    peak = probe.peak_extra()
    _clear(case.leaves)
    return {"status": "ok", "peak_extra_bytes": peak}


def time_interleaved(cases: dict, mode: str, device: str, cfg: dict, memory: bool) -> dict:
    """Round-robin timing of every case in ``mode``; returns provider -> row."""
    rows: dict[str, dict] = {}
    times: dict[str, list[float]] = {}
    for name, case in cases.items():
        try:
            first = run_mode(case, mode, device, None)
            for _ in range(cfg["warmup"] - 1):
                run_mode(case, mode, device, None)
            row = measure_memory(case, mode, device, 0) if memory else {}
            rows[name] = {"status": "ok", "first_call_ms": first * 1e3, **row}
            times[name] = []
        except Exception as err:
            traceback.print_exc(file=sys.stderr)
            rows[name] = {"status": _failure(err)}
        _clear(case.leaves)

    def wants_more(name: str) -> bool:
        t = times[name]
        return len(t) < cfg["min_reps"] or (sum(t) < cfg["budget_s"] and len(t) < cfg["max_reps"])

    while active := [n for n in times if wants_more(n)]:
        for name in active:
            try:
                times[name].append(run_mode(cases[name], mode, device, None))
            except Exception as err:
                traceback.print_exc(file=sys.stderr)
                rows[name] = {"status": _failure(err)}
                del times[name]
            _clear(cases[name].leaves)
    levels = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    for name, t in times.items():
        q = torch.tensor(t, dtype=torch.float64).quantile(levels).tolist()
        rows[name].update(p20_ms=q[0] * 1e3, median_ms=q[1] * 1e3, p80_ms=q[2] * 1e3, reps=len(t))
    return rows


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
            for name in spec["providers"]:
                for mode in spec["modes"]:
                    _emit(pd, name, mode, {"status": "skipped: time budget of the run spent"})
            continue
        cases = {}
        for name in spec["providers"]:
            try:
                cases[name] = build_case(name, p, device)
            except Exception as err:
                for mode in spec["modes"]:
                    _emit(pd, name, mode, {"status": _failure(err)})
        for mode in spec["modes"]:
            if spec["job"] == "memory":
                rows = {}
                for name, case in cases.items():
                    try:
                        rows[name] = measure_memory(case, mode, device, spec["reps"]["warmup"])
                    except Exception as err:
                        rows[name] = {"status": _failure(err)}
            else:
                memory = device.startswith("cuda")
                rows = time_interleaved(cases, mode, device, spec["reps"], memory)
            for name, row in rows.items():
                _emit(pd, name, mode, {**row, "note": cases[name].note})
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        del cases
        clear_input_cache()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def _emit(pd: dict, provider: str, mode: str, row: dict) -> None:
    line = json.dumps({"problem": pd, "provider": provider, "mode": mode, **row})
    print(RESULT_PREFIX + line, flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
