"""Figures for the native CPU kernel: speed vs the reference, vs the machine's floor,
and extra peak memory, for forward+backward of ``renio_loss(..., backend="cpu")``.

    python benchmarks/cpu_kernel.py           # 2 rounds -> benchmarks/results/cpu_kernel.md
    python benchmarks/cpu_kernel.py --quick   # small shapes, to check the script runs

Every round measures, in this process: the machine's copy bandwidth and exp rate (best of
several runs: a ceiling is what the machine can do), then per configuration the median wall time
of our forward+backward in three settings, of ``renio_kernels.reference.renio_loss`` (the paper
trainer's eager math, in the inputs' dtype), and peak extra memory. Our settings:

* ``ours``: the defaults. The gradient through ``d`` is formed at unit scale in the forward and
  scaled in the backward (``config.cpu_grad_in_forward``), and gradients come from the
  gradient-buffer cache (``renio_kernels.cpu_cache``): in a loop, the previous call's buffer.
* ``no cache``: the same with the cache off, so every gradient is a fresh mmap whose pages fault
  on first touch (what a process's first call pays).
* ``recompute``: the recompute-in-backward kernels (``config.cpu_grad_in_forward(False)``, cache
  on), the design before the gradient moved to the forward, as a same-run baseline.

Memory is measured with the cache emptied first, so the gradient's allocation is counted;
``held`` is what the cache keeps between calls (the last gradient's buffer). Labels are all valid
(no ignored rows), the most work for our kernel. The reference is run one sequence (256 rows) at
a time when a whole batch would not fit the 1.5 GiB budget: its work is per row, so the sum of
the chunks' times is the batch's time.

Floors (as ``benchmarks/floor.py``, ``N = B*T*V``, ``s`` bytes per logit),
``max(bytes / bandwidth, exps / exp rate)``, the bandwidth being the best of the copy and the
read-only ceilings of the round:

* strict: ``3Ns`` bytes and ``2N`` exps: one fused pass that reads both logits once and writes the
  gradient once, one exp per element per side.
* autograd: ``5Ns`` bytes and ``2N`` exps. The ReNIO weights need every row's ``ls[x] - lt[x]``
  before any row's gradient scale is known, and ``grad_output`` arrives only in the backward, so
  any forward/backward split touches each logit's gradient (or logits) twice: ours reads the
  logits and writes the unit gradient in the forward (``3Ns``) and reads and writes it in the
  backward (``2Ns``); a recompute design reads the logits twice and writes once (also ``5Ns``).

Process CPU time over wall time shows how much of the 2 cores the run got: this machine is
shared with other engineers, so wall times carry their load.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import renio_kernels  # noqa: E402
from benchmarks import exp_probe  # noqa: E402
from benchmarks.memory import peak_extra_bytes  # noqa: E402
from benchmarks.runner import cpu_model  # noqa: E402
from renio_kernels import config, reference  # noqa: E402
from renio_kernels.ops.cpu import native as cpu  # noqa: E402

TOKEN_CLIP = 0.05
MEM_BUDGET = 1.5 * 2**30  # the reference runs in chunks whose temporaries stay below this


@dataclass(frozen=True)
class Config:
    name: str
    batch: int
    seq: int
    vocab: int
    dtype: torch.dtype

    @property
    def n(self) -> int:
        return self.batch * self.seq * self.vocab

    @property
    def elt(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


CONFIGS = [
    Config("fp32, V=151936", 4, 256, 151936, torch.float32),
    Config("fp32, V=32000", 4, 256, 32000, torch.float32),
    Config("bf16, V=151936", 4, 256, 151936, torch.bfloat16),
    Config("bf16, V=32000", 4, 256, 32000, torch.bfloat16),
]
QUICK = [Config("fp32, V=4096 (quick)", 2, 32, 4096, torch.float32)]


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def malloc_in_use() -> int | None:
    """Bytes glibc's malloc has handed out and not taken back (heap + mmapped), or None."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def malloc_peak_extra(fn) -> int | None:
    """Peak of malloc's in-use bytes above the start while ``fn()`` runs.

    Unlike resident memory (``peak_extra_bytes``), this does not miss an allocation that reuses
    pages glibc already holds, which makes the RSS figure read 0 for mid-sized gradients here.
    """
    if malloc_in_use() is None:
        return None
    gc.collect()
    base = peak = malloc_in_use()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, malloc_in_use())
            time.sleep(5e-4)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
        peak = max(peak, malloc_in_use())
    finally:
        done.set()
        thread.join()
    return peak - base


def make_inputs(c: Config, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = torch.empty(c.batch, c.seq, c.vocab, dtype=c.dtype)
    t = torch.empty_like(s)
    for b in range(c.batch):  # fp32 staging one sequence at a time
        sb = torch.randn(c.seq, c.vocab, generator=g) * 2.0
        s[b] = sb
        t[b] = 0.7 * sb + torch.randn(c.seq, c.vocab, generator=g)
    labels = torch.randint(0, c.vocab, (c.batch, c.seq), generator=g)
    return s, t, labels


def timed(fn, repeats: int) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of ``repeats`` calls after one warm-up."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        gc.collect()
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return walls, cpus


def best_s(fn, reps: int) -> float:
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


def bandwidths() -> tuple[float, float]:
    """(copy, read) bytes per second on 256 MiB buffers, 8x the L3, with the kernel's threads."""
    src = torch.ones(1 << 26)
    dst = torch.empty_like(src)
    copy = 2 * src.nbytes / best_s(lambda: dst.copy_(src), 30)
    return copy, src.nbytes / best_s(lambda: src.sum(), 30)


def exp_rates() -> tuple[float, float]:
    """(torch.exp, the kernel's vexp) exps per second: one core's best short run times the
    threads (exp is compute-bound per core; a short single-thread run is the least likely to be
    interrupted by the neighbours), or the multi-threaded best if that is higher."""
    threads = torch.get_num_threads()
    x = torch.rand(1 << 14) * -20  # 64 KiB: L1/L2-resident, below torch's parallel grain
    y = torch.empty_like(x)
    vexp = exp_probe.exp_throughput
    try:
        torch.set_num_threads(1)
        torch_one = x.numel() / best_s(lambda: torch.exp(x, out=y), 500)
        ours_one = max(vexp(2000) for _ in range(30))
    finally:
        torch.set_num_threads(threads)
    ours_all = max(vexp(2000) for _ in range(30))
    return torch_one * threads, max(ours_one * threads, ours_all)


def ceilings() -> dict[str, float]:
    """The machine's ceilings: the best of many runs, since neighbours only slow a run down."""
    copy, read = bandwidths()
    torch_exp, ours_exp = exp_rates()
    return {
        "copy_GBps": copy / 1e9,
        "read_GBps": read / 1e9,
        "torch_exp_Gps": torch_exp / 1e9,
        "vexp_Gps": ours_exp / 1e9,
        "exp_Gps": max(torch_exp, ours_exp) / 1e9,
    }


def floors(c: Config, ceil: dict[str, float]) -> dict[str, float]:
    # The best bandwidth seen: a copy is charged 2 bytes per element moved but also pays the
    # destination's read-for-ownership, so a read-only sweep can show more, and the kernel
    # (streaming stores) can beat the copy figure; the floor must not be above what it achieves.
    bw = max(ceil["copy_GBps"], ceil["read_GBps"]) * 1e9
    exp = ceil["exp_Gps"] * 1e9
    return {
        "strict": max(3 * c.n * c.elt / bw, 2 * c.n / exp),
        "autograd": max(5 * c.n * c.elt / bw, 2 * c.n / exp),
        "mem_strict": 3 * c.n * c.elt / bw,
        "exp_strict": 2 * c.n / exp,
    }


def bench_config(c: Config, repeats: int, ref_repeats: int) -> dict:
    s, t, labels = make_inputs(c)
    s.requires_grad_()

    def ours(keep_grad: bool = False):
        s.grad = None
        renio_kernels.renio_loss(s, t, labels, token_clip=TOKEN_CLIP, backend="cpu").backward()
        if not keep_grad:
            s.grad = None

    # The reference materializes ~7 logits-sized temporaries; chunk by whole sequences.
    per_seq = c.seq * c.vocab * max(c.elt, 4) * 8
    chunk = max(1, min(c.batch, int(MEM_BUDGET // per_seq)))
    ref_loss = None

    def ref():
        nonlocal ref_loss
        s.grad = None
        for b0 in range(0, c.batch, chunk):
            sb = s[b0 : b0 + chunk].detach().requires_grad_()
            loss = reference.renio_loss(
                sb, t[b0 : b0 + chunk], labels[b0 : b0 + chunk], token_clip=TOKEN_CLIP
            )
            loss.backward()
            if chunk == c.batch:
                ref_loss = loss.detach().double()
            del sb, loss

    ours_wall, ours_cpu = timed(ours, repeats)
    renio_kernels.set_cpu_grad_cache(False)
    try:
        cold_wall, _ = timed(ours, repeats)
    finally:
        renio_kernels.set_cpu_grad_cache(True)
    with config.cpu_grad_in_forward(False):
        recompute_wall, _ = timed(ours, repeats)
    # Memory from an empty cache, so the gradient's allocation counts. The gradient stays alive
    # until the sampler's last look (a short run can fall between two RSS samples on a loaded
    # machine); the figure is the gradient plus whatever else peaked.
    renio_kernels.empty_cpu_grad_cache()
    ours_mem = peak_extra_bytes(lambda: ours(keep_grad=True))
    s.grad = None
    held = renio_kernels.cpu_grad_cache_info()["cached_bytes"]
    renio_kernels.empty_cpu_grad_cache()
    ours_malloc = malloc_peak_extra(lambda: ours(keep_grad=True))
    s.grad = None
    if ref_repeats > 0:
        ref_wall, ref_cpu = timed(ref, ref_repeats)
        ref_mem, ref_malloc = peak_extra_bytes(ref), malloc_peak_extra(ref)
    else:  # --ref-repeats 0: our kernel only (the reference's columns read nan / n/a)
        ref_wall, ref_cpu, ref_mem, ref_malloc = [math.nan], [math.nan], math.nan, None
    agree = None
    if ref_loss is not None:
        mine = renio_kernels.renio_loss(s.detach(), t, labels, token_clip=TOKEN_CLIP, backend="cpu")
        agree = abs(mine.item() - ref_loss.item()) / abs(ref_loss.item())
    logits = c.n * c.elt
    return {
        "ours_s": statistics.median(ours_wall),
        "cold_s": statistics.median(cold_wall),
        "recompute_s": statistics.median(recompute_wall),
        "held_x": held / logits,
        # Process CPU seconds over threads: what the run would take with the cores to itself
        # (it counts page-fault time and OpenMP spinning, not time spent descheduled).
        "ours_cpu_s": statistics.median(ours_cpu) / torch.get_num_threads(),
        "ours_cpu_share": statistics.median(
            cp / (w * torch.get_num_threads()) for w, cp in zip(ours_wall, ours_cpu, strict=True)
        ),
        "ref_s": statistics.median(ref_wall),
        "ref_cpu_share": statistics.median(
            cp / (w * torch.get_num_threads()) for w, cp in zip(ref_wall, ref_cpu, strict=True)
        ),
        "ours_mem_x": ours_mem / logits,
        "ref_mem_x": ref_mem / (logits * chunk / c.batch),
        "ours_malloc_x": None if ours_malloc is None else ours_malloc / logits,
        "ref_malloc_x": None if ref_malloc is None else ref_malloc / (logits * chunk / c.batch),
        "ref_chunk_rows": chunk * c.seq,
        "loss_rel_diff": agree,
        "ours_all_s": ours_wall,
        "ref_all_s": ref_wall,
    }


def commit() -> str:
    """HEAD, marked dirty only for changes outside the results this script writes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", ".", ":!benchmarks/results"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}-dirty" if changed else head


def machine() -> str:
    return (
        f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
        f"({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads, "
        f"Python {platform.python_version()}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--ref-repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu_kernel.md")
    args = ap.parse_args()
    if cpu.load_extension() is None:
        sys.exit(f"the native CPU kernel did not build: {cpu.extension_error()}")
    configs = QUICK if args.quick else CONFIGS

    rounds = []
    for r in range(args.rounds):
        load0 = os.getloadavg()[0]
        ceil = ceilings()
        res = {}
        for c in configs:
            res[c.name] = bench_config(c, args.repeats, args.ref_repeats)
            res[c.name]["floor"] = floors(c, ceil)
            print(f"round {r + 1} {c.name}: {fmt_row(res[c.name])}", flush=True)
        rounds.append({"ceil": ceil, "res": res, "load": (load0, os.getloadavg()[0])})
        print(f"round {r + 1} ceilings: {ceil}", flush=True)
    report = render(rounds, configs, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)


def fmt_row(x: dict) -> str:
    f = x["floor"]
    return (
        f"ours {x['ours_s'] * 1e3:.0f} ms, reference {x['ref_s']:.2f} s "
        f"({x['ref_s'] / x['ours_s']:.1f}x), no cache {x['cold_s'] * 1e3:.0f} ms, recompute "
        f"{x['recompute_s'] * 1e3:.0f} ms, floor {f['strict'] * 1e3:.1f} ms "
        f"({x['ours_s'] / f['strict']:.2f}x; autograd floor {x['ours_s'] / f['autograd']:.2f}x), "
        f"memory {_x(x['ours_malloc_x'])} malloc / {x['ours_mem_x']:.2f}x RSS "
        f"(reference {_x(x['ref_malloc_x'])} / {x['ref_mem_x']:.1f}x)"
    )


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _med_x(xs: list[dict], key: str) -> str:
    vals = [x[key] for x in xs if x[key] is not None]
    return _x(statistics.median(vals) if vals else None)


def render(rounds: list[dict], configs: list[Config], args) -> str:
    med = statistics.median
    out = [
        "# Native CPU kernel (csrc/): forward+backward figures",
        "",
        f"Machine: {machine()}. Shared with other engineers' jobs while measured (load averages "
        "below); wall times include their load. Generated by `python benchmarks/cpu_kernel.py"
        f"{' --quick' if args.quick else ''}` ({args.rounds} rounds, {args.repeats} timed runs of "
        f"ours and {args.ref_repeats} of the reference per round, medians), "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, commit {commit()}.",
        "",
        f"`renio_loss(student, teacher, labels, token_clip={TOKEN_CLIP}, backend='cpu')` then "
        "`.backward()`, beta=0, B*T = 1024 (4 x 256), all labels valid, vs "
        "`renio_kernels.reference.renio_loss` in the inputs' dtype.",
        "",
        "## Summary (median over rounds of each round's median)",
        "",
        "| config | ours | reference | speed-up | strict floor (3Ns) | ours / strict "
        "| autograd floor (5Ns) | ours / autograd | no cache | recompute | ours, CPU s / threads "
        "| extra peak memory, malloc (RSS) | held between calls | reference memory, malloc (RSS) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in configs:
        xs = [r["res"][c.name] for r in rounds]
        ours = med(x["ours_s"] for x in xs)
        ref = med(x["ref_s"] for x in xs)
        speedup = med(x["ref_s"] / x["ours_s"] for x in xs)
        strict = med(x["floor"]["strict"] for x in xs)
        vs_strict = med(x["ours_s"] / x["floor"]["strict"] for x in xs)
        autograd = med(x["floor"]["autograd"] for x in xs)
        vs_autograd = med(x["ours_s"] / x["floor"]["autograd"] for x in xs)
        cold = med(x["cold_s"] for x in xs)
        recompute = med(x["recompute_s"] for x in xs)
        cpu_s = med(x["ours_cpu_s"] for x in xs)
        out.append(
            f"| {c.name} | {ours * 1e3:.0f} ms | {ref:.2f} s | {speedup:.1f}x "
            f"| {strict * 1e3:.1f} ms | {vs_strict:.2f}x | {autograd * 1e3:.1f} ms "
            f"| {vs_autograd:.2f}x | {cold * 1e3:.0f} ms | {recompute * 1e3:.0f} ms "
            f"| {cpu_s * 1e3:.0f} ms "
            f"| {_med_x(xs, 'ours_malloc_x')} ({med(x['ours_mem_x'] for x in xs):.2f}x) "
            f"| {med(x['held_x'] for x in xs):.2f}x "
            f"| {_med_x(xs, 'ref_malloc_x')} ({med(x['ref_mem_x'] for x in xs):.1f}x) |"
        )
    out += ["", "## Per round", ""]
    for i, r in enumerate(rounds):
        ceil = r["ceil"]
        out += [
            f"### Round {i + 1} (1-min load average {r['load'][0]:.1f} before, "
            f"{r['load'][1]:.1f} after)",
            "",
            f"Ceilings (best of several): copy {ceil['copy_GBps']:.1f} GB/s (read+write), "
            f"read {ceil['read_GBps']:.1f} GB/s, exp {ceil['exp_Gps']:.2f} G/s "
            f"(torch.exp {ceil['torch_exp_Gps']:.2f}, the kernel's vexp {ceil['vexp_Gps']:.2f}).",
            "",
            "| config | ours (all runs, ms) | CPU share | reference (all runs, s) | CPU share "
            "| strict floor: bytes / exps (ms) | ref. chunk rows | loss rel. diff |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in configs:
            x = r["res"][c.name]
            f = x["floor"]
            agree = "-" if x["loss_rel_diff"] is None else f"{x['loss_rel_diff']:.1e}"
            floor_parts = f"{f['mem_strict'] * 1e3:.1f} / {f['exp_strict'] * 1e3:.1f}"
            out.append(
                f"| {c.name} | {', '.join(f'{v * 1e3:.0f}' for v in x['ours_all_s'])} "
                f"| {x['ours_cpu_share']:.2f} | {', '.join(f'{v:.2f}' for v in x['ref_all_s'])} "
                f"| {x['ref_cpu_share']:.2f} | {floor_parts} "
                f"| {x['ref_chunk_rows']} | {agree} |"
            )
        out.append("")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
