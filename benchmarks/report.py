"""Plots and the markdown table of one run, read back from the CSV."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

__all__ = ["load_rows", "markdown", "plot"]

OURS = {
    "logits": ("renio-triton", "renio-cpu", "renio-torch"),
    "fused-linear": ("renio-fused-linear",),
}
BASELINE = {"logits": "reference", "fused-linear": "reference-fl"}
COMPILED = {"logits": "reference-compiled"}
LIGER = {"logits": ("liger-jsd",), "fused-linear": ("liger-fl-triton", "liger-fl-chunked")}
HEADLINE_MODE = "forward+backward"


def load_rows(path: Path, run_id: str | None = None) -> list[dict]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    if run_id is None and rows:
        run_id = rows[-1]["run_id"]
    return [r for r in rows if r["run_id"] == run_id]


def _ok(rows):
    return [r for r in rows if r["status"] == "ok"]


def _key(r) -> tuple:
    return (r["kind"], r["dtype"], int(r["vocab"]), int(r["hidden"]), int(r["tokens"]))


def _index(rows) -> dict:
    """(kind, dtype, vocab, hidden, tokens, provider, mode) -> row"""
    return {(*_key(r), r["provider"], r["mode"]): r for r in _ok(rows)}


def _f(r, k) -> float:
    return float(r[k])


def _mem(r) -> str:
    return f"{_f(r, 'peak_extra_bytes') / 2**20:,.0f} MiB ({_f(r, 'peak_extra_over_logits'):.2f}x)"


def _ms(r) -> str:
    return f"{_f(r, 'median_ms'):.1f} [{_f(r, 'p20_ms'):.1f}, {_f(r, 'p80_ms'):.1f}]"


def _vs(mine, other) -> tuple[str, str]:
    """(speed-up of ours over other, "our memory / its memory")"""
    speed = _f(other, "median_ms") / _f(mine, "median_ms")
    mem = f"{_f(mine, 'peak_extra_over_logits'):.2f} / {_f(other, 'peak_extra_over_logits'):.2f}"
    return f"{speed:.2f}x", mem


def _shape_cells(shape) -> list[str]:
    kind, dtype, v, h, t = shape
    return [kind, dtype, str(v), str(h or "-"), str(t)]


def _header(r0) -> str:
    return (
        f"Machine `{r0['device']}` (torch threads: {r0['threads']}), {r0['date']}, commit "
        f"`{r0['commit']}`, torch {r0['torch']}, triton {r0['triton']}, liger-kernel "
        f"{r0['liger_kernel']}. Ceilings measured in this run: copy "
        f"{_f(r0, 'copy_GBps'):.1f} GB/s, exp {_f(r0, 'exp_Gps'):.2f} G/s, "
        f"matmul {r0['matmul_TFLOPs']} TFLOP/s. "
        f"beta={r0['beta']}. {r0['machine_note']}"
    )


def _headline(idx, shapes) -> list[str]:
    out = [
        "**Headline, forward+backward** (speed-up = their median time / ours; memory = peak "
        "extra memory in units of one logits tensor, ours / theirs):",
        "",
        "| kind | dtype | V | H | B*T | ours | ours ms | speed-up vs reference | memory vs "
        "reference | speed-up vs compiled reference | memory vs compiled | speed-up vs Liger | "
        "memory vs Liger |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in shapes:
        kind = shape[0]
        for ours in OURS[kind]:
            mine = idx.get((*shape, ours, HEADLINE_MODE))
            if not mine:
                continue
            cells = _shape_cells(shape) + [ours, f"{_f(mine, 'median_ms'):.1f}"]
            ref = idx.get((*shape, BASELINE[kind], HEADLINE_MODE))
            cells += list(_vs(mine, ref)) if ref else ["n/a", "n/a"]
            comp = idx.get((*shape, COMPILED.get(kind, ""), HEADLINE_MODE))
            cells += list(_vs(mine, comp)) if comp else ["n/a", "n/a"]
            lig = [(n, idx.get((*shape, n, HEADLINE_MODE))) for n in LIGER[kind]]
            lig = [(n, _vs(mine, r)) for n, r in lig if r]
            if lig:
                cells += ["; ".join(f"{s} ({n})" for n, (s, _) in lig)]
                cells += ["; ".join(f"{m} ({n})" for n, (_, m) in lig)]
            else:
                cells += ["n/a", "n/a"]
            out.append("| " + " | ".join(cells) + " |")
    return out


def _all_providers(idx, shapes, providers) -> list[str]:
    out = [
        "**All providers** (median ms [p20, p80]; tokens/s, peak extra memory and fraction of "
        "the floor are forward+backward's):",
        "",
        "| kind | dtype | V | H | B*T | provider | forward | backward | forward+backward | "
        "tokens/s | peak extra | fraction of floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in shapes:
        for prov in providers:
            fb = idx.get((*shape, prov, HEADLINE_MODE))
            if not fb:
                continue
            f = idx.get((*shape, prov, "forward"))
            b = idx.get((*shape, prov, "backward"))
            cells = _shape_cells(shape) + [prov, _ms(f) if f else "-", _ms(b) if b else "-"]
            cells += [_ms(fb), f"{_f(fb, 'tokens_per_s'):,.0f}", _mem(fb)]
            cells += [f"{_f(fb, 'fraction_of_floor'):.3f}"]
            out.append("| " + " | ".join(cells) + " |")
    return out


def markdown(rows: list[dict]) -> str:
    """Headline ratios, then every provider's numbers, then the points without a number."""
    if not rows:
        return "(no rows)\n"
    idx = _index(rows)
    shapes = sorted({k[:5] for k in idx})
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    out = [_header(rows[0]), ""] + _headline(idx, shapes) + [""]
    out += _all_providers(idx, shapes, providers)
    failed = sorted({(r["provider"], r["status"]) for r in rows if r["status"] != "ok"})
    if failed:
        out += ["", "**Points without a number:**", ""]
        out += [f"- `{p}`: {s}" for p, s in failed]
    notes = sorted({(r["provider"], r["note"]) for r in _ok(rows) if r["note"]})
    out += ["", "**Providers:**", ""] + [f"- `{p}`: {n}" for p, n in notes]
    return "\n".join(out) + "\n"


def plot(rows: list[dict], out_dir: Path, mode: str = HEADLINE_MODE) -> list[Path]:
    """One PNG per (kind, dtype): time (top) and peak extra memory (bottom) against B*T, one
    column of panels per V, a line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in _ok(rows) if r["mode"] == mode]
    groups = defaultdict(list)
    for r in ok:
        groups[(r["kind"], r["dtype"], r["hidden"])].append(r)
    paths = []
    for (kind, dtype, hidden), rs in sorted(groups.items()):
        vocabs = sorted({int(r["vocab"]) for r in rs})
        width = max(6.0, 4.2 * len(vocabs))
        fig, axes = plt.subplots(2, len(vocabs), figsize=(width, 7.5), squeeze=False)
        for col, v in enumerate(vocabs):
            by_prov = defaultdict(list)
            for r in rs:
                if int(r["vocab"]) == v:
                    by_prov[r["provider"]].append(r)
            for prov, pr in by_prov.items():
                pr.sort(key=lambda r: int(r["tokens"]))
                x = [int(r["tokens"]) for r in pr]
                axes[0][col].errorbar(
                    x,
                    [float(r["median_ms"]) for r in pr],
                    yerr=[
                        [float(r["median_ms"]) - float(r["p20_ms"]) for r in pr],
                        [float(r["p80_ms"]) - float(r["median_ms"]) for r in pr],
                    ],
                    marker="o",
                    label=prov,
                    capsize=3,
                )
                mem = [float(r["peak_extra_bytes"]) / 2**20 for r in pr]
                axes[1][col].plot(x, mem, marker="o", label=prov)
            title = f"V={v}" + (f", H={hidden}" if kind == "fused-linear" else "")
            axes[0][col].set_title(title)
            for row, ylabel in ((0, f"{mode} time (ms)"), (1, "peak extra memory (MiB)")):
                ax = axes[row][col]
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("tokens (B*T)")
                ax.set_ylabel(ylabel)
                ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=8)
        r0 = rs[0]
        when = f"{r0['device']}, {r0['date'][:10]}, commit {r0['commit']}"
        fig.suptitle(f"{kind} {dtype}, {mode}\n{when}", fontsize=10)
        fig.tight_layout()
        suffix = f"_H{hidden}" if kind == "fused-linear" else ""
        name = f"{r0['device']}_{kind}_{dtype}{suffix}.png"
        path = out_dir / name
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths
