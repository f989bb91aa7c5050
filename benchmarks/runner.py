"""Run a preset: measure the ceilings, spawn one worker per provider (per point on the CPU),
append every row (failures included) to ``<out>/<device>.csv``."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from .ceilings import measure_ceilings
from .floor import floor_metrics
from .problems import MODES, Preset, Problem, phases
from .providers import PROVIDERS, unavailable_reason
from .worker import RESULT_PREFIX

__all__ = ["FIELDS", "device_name", "run_preset"]

FIELDS = [
    "run_id", "device", "commit", "date", "python", "torch", "triton", "liger_kernel",
    "kind", "batch", "seq", "tokens", "vocab", "hidden", "dtype", "beta",
    "provider", "note", "mode", "status",
    "median_ms", "p20_ms", "p80_ms", "reps", "first_call_ms", "tokens_per_s",
    "peak_extra_bytes", "peak_extra_over_logits",
    "floor_ms", "fraction_of_floor", "achieved_GBps",
    "copy_GBps", "exp_Gps", "matmul_TFLOPs", "threads", "machine_note",
]  # fmt: skip

# Peak extra memory of each provider in units of one logits tensor (CPU fp32; the reference
# measured 7.3x at V=32000, B*T=1024), used only to skip points that would exceed the memory cap.
# The fused-linear reference materializes the same tensors plus the two matmul outputs.
MEMORY_FACTOR = {"reference": 8.0, "reference-compiled": 8.0, "reference-fl": 10.0}
DEFAULT_FACTOR = 3.0

# On a GPU run, the order providers run in within each phase: ours and Liger's first, so that a
# run cut short by its time budget still has the comparison; the compiled reference (a compile
# per shape) last.
GPU_ORDER = [
    "renio-triton", "liger-jsd", "reference", "renio-torch", "renio-cpu", "reference-compiled",
    "renio-fused-linear", "liger-fl-triton", "liger-fl-chunked", "reference-fl",
    "renio-fl-top-k", "renio-fl-sparse",
]  # fmt: skip


def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return re.search(r"model name\s*:\s*(.*)", f.read()).group(1).strip()
    except (OSError, AttributeError):
        return platform.processor() or "unknown CPU"


def write_lines(path, lines: list[str]) -> None:
    """Write a report (creating its folder) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return _sanitize(torch.cuda.get_device_name(torch.device(device)))
    return f"cpu-{_sanitize(cpu_model())}-{os.cpu_count()}c"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod, key in (("triton", "triton"), ("liger_kernel", "liger_kernel")):
        try:
            from importlib.metadata import version

            out[key] = version(mod.replace("_", "-"))
        except Exception:
            out[key] = "none"
    return out


def _commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # benchmarks never time the interpreter
    return env


def _spawn(spec: dict, timeout: float, log) -> list[dict]:
    cmd = [sys.executable, "-m", "benchmarks.worker", json.dumps(spec)]
    root = Path(__file__).resolve().parent.parent
    try:
        proc = subprocess.run(
            cmd, cwd=root, env=_worker_env(), capture_output=True, text=True, timeout=timeout
        )
        out, err, why = proc.stdout, proc.stderr, f"worker exit code {proc.returncode}"
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        why = f"worker timed out after {timeout:.0f}s"
    what = f"{spec['job']} {' '.join(spec['providers'])} ({len(spec['problems'])} points)"
    log.write(f"$ worker {what}\n{err}" + ("\n" if err else ""))
    lines = [line for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
    rows = [json.loads(line[len(RESULT_PREFIX) :]) for line in lines]
    done = {(json.dumps(r["problem"], sort_keys=True), r["provider"], r["mode"]) for r in rows}
    for pd in spec["problems"]:
        for name in spec["providers"]:
            for mode in spec["modes"]:
                if (json.dumps(pd, sort_keys=True), name, mode) not in done:
                    failed = {"status": f"failed: {why}", "note": ""}
                    rows.append({"problem": pd, "provider": name, "mode": mode, **failed})
    return rows


def _skip_for_memory(provider: str, p: Problem, cap_bytes: float) -> str | None:
    est = MEMORY_FACTOR.get(provider, DEFAULT_FACTOR) * p.logits_bytes + 2 * p.logits_bytes
    if est > cap_bytes:
        return f"skipped: estimated {est / 2**30:.1f} GiB > memory cap {cap_bytes / 2**30:.1f} GiB"
    return None


def run_preset(
    preset: Preset,
    providers: list[str],
    *,
    device: str,
    out_dir: Path,
    beta: float,
    modes: tuple[str, ...] = MODES,
    budget_s: float = 600.0,
    mem_cap_gib: float = 4.0,
    reps: dict | None = None,
    worker_timeout_s: float = 300.0,
    machine_note: str = "",
    threads: int | None = None,
    log=sys.stderr,
) -> tuple[Path, str, list[dict]]:
    """Run every provider on the preset's points; return ``(csv path, run id, rows)``."""
    start = time.time()
    deadline = start + budget_s
    cuda = device.startswith("cuda")
    reps = reps or (
        {"warmup": 3, "min_reps": 5, "max_reps": 50, "budget_s": 0.5}
        if cuda
        else {"warmup": 1, "min_reps": 3, "max_reps": 15, "budget_s": 2.0}
    )
    dtypes = tuple(sorted(set(preset.dtypes) | {d for d, _ in preset.extra_logits}))
    if threads:
        torch.set_num_threads(threads)
    ceilings = measure_ceilings(device, dtypes)
    log.write(f"ceilings: {ceilings}\n")
    dev = device_name(device)
    common = {
        "run_id": dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
        "device": dev,
        "commit": _commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "copy_GBps": round(ceilings["copy_GBps"], 2),
        "exp_Gps": round(ceilings["exp_Gps"], 3),
        "machine_note": machine_note,
        "threads": torch.get_num_threads(),
        **_versions(),
    }
    base = {"modes": list(modes), "device": device, "deadline": deadline, "reps": reps}
    base |= {"threads": threads, "worker_timeout_s": worker_timeout_s}
    ctx = (base, common, ceilings, log)
    rows: list[dict] = []
    order = sorted(providers, key=lambda n: GPU_ORDER.index(n)) if cuda else providers
    for kind, problems in phases(preset, beta):
        names = [n for n in order if PROVIDERS[n][0] == kind]
        absent = {n: unavailable_reason(n, device) for n in names}
        for n in names:
            if absent[n]:
                rows += [
                    _row(common, ceilings, p, n, m, {"status": absent[n]})
                    for p in problems
                    for m in modes
                ]
        names = [n for n in names if not absent[n]]
        if cuda:  # one process for the phase: allocator counters need no fresh process
            rows += _job("time", names, problems, ctx)
            continue
        for p in problems:
            fits = []
            for n in names:
                why = _skip_for_memory(n, p, mem_cap_gib * 2**30)
                if why:
                    rows += [_row(common, ceilings, p, n, m, {"status": why}) for m in modes]
                else:
                    fits.append(n)
            if not fits:
                continue
            memory = {}
            for n in fits:  # a fresh process per provider and point: its peak RSS is its own
                for r in _job("memory", [n], [p], ctx):
                    memory[(r["provider"], r["mode"])] = r
            for r in _job("time", fits, [p], ctx):
                rows.append(_merge_memory(r, memory.get((r["provider"], r["mode"]))))
                log.write(_line(rows[-1]))
            log.flush()
    path = out_dir / f"{dev}.csv"
    _append_csv(path, rows)
    log.write(f"{len(rows)} rows appended to {path} in {time.time() - start:.0f}s\n")
    return path, common["run_id"], rows


def _job(job: str, providers: list[str], problems: list[Problem], ctx) -> list[dict]:
    """Run one worker; return its rows (points it never reported become failed rows)."""
    base, common, ceilings, log = ctx
    modes = base["modes"]
    left = base["deadline"] - time.time()
    if left <= 0:
        skipped = {"status": "skipped: time budget of the run spent"}
        return [
            _row(common, ceilings, p, n, m, skipped)
            for p in problems
            for n in providers
            for m in modes
        ]
    spec = {**base, "job": job, "providers": providers, "problems": [p.to_dict() for p in problems]}
    timeout = max(30.0, min(base["worker_timeout_s"] * len(problems), left + 60))
    rows = []
    for r in _spawn(spec, timeout, log):
        rows.append(_row(common, ceilings, Problem(**r["problem"]), r["provider"], r["mode"], r))
        if job == "time" and base["device"].startswith("cuda"):
            log.write(_line(rows[-1]))
    return rows


def _merge_memory(row: dict, mem: dict | None) -> dict:
    """A CPU timing row with the peak RSS its memory job measured."""
    if row["status"] != "ok":
        return row
    if mem is None or mem["status"] != "ok":
        row["status"] = "memory job: " + (mem["status"] if mem else "no result")
        return row
    row["peak_extra_bytes"] = mem["peak_extra_bytes"]
    row["peak_extra_over_logits"] = mem["peak_extra_over_logits"]
    return row


def _row(common: dict, ceilings: dict, p: Problem, provider: str, mode: str, r: dict) -> dict:
    row = {
        **common,
        "kind": p.kind,
        "batch": p.batch,
        "seq": p.seq,
        "tokens": p.tokens,
        "vocab": p.vocab,
        "hidden": p.hidden,
        "dtype": p.dtype,
        "beta": p.beta,
        "provider": provider,
        "mode": mode,
        "note": r.get("note", ""),
        "status": r["status"],
        "matmul_TFLOPs": round(ceilings.get(f"matmul_TFLOPs_{p.dtype}", 0.0), 4),
    }
    if "peak_extra_bytes" in r:
        row["peak_extra_bytes"] = r["peak_extra_bytes"]
        row["peak_extra_over_logits"] = r["peak_extra_bytes"] / p.logits_bytes
    if "median_ms" in r:
        row.update({k: r[k] for k in ("median_ms", "p20_ms", "p80_ms", "reps", "first_call_ms")})
        row["tokens_per_s"] = p.tokens / (r["median_ms"] / 1e3)
        row.update(floor_metrics(p, mode, r["median_ms"], ceilings))
    for k, v in row.items():
        if isinstance(v, float):
            row[k] = float(f"{v:.5g}")
    return row


def _line(row: dict) -> str:
    shape = f"{row['kind']} T={row['tokens']} V={row['vocab']} H={row['hidden']} {row['dtype']}"
    if row["status"] != "ok":
        return f"  {row['provider']:<20} {row['mode']:<17} {shape}: {row['status']}\n"
    return (
        f"  {row['provider']:<20} {row['mode']:<17} {shape}: {row['median_ms']:.2f} ms "
        f"[{row['p20_ms']:.2f}, {row['p80_ms']:.2f}] mem {row['peak_extra_over_logits']:.2f}x "
        f"floor {row['fraction_of_floor']:.2f}\n"
    )


def _append_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)
