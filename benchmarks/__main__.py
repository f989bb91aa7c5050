"""``python -m benchmarks run|report``.

    python -m benchmarks run --preset cpu-quick            # ~10 min on 2 cores
    python -m benchmarks run --preset gpu --budget-s 300   # on a CUDA machine
    python -m benchmarks report --csv benchmarks/results/<device>.csv [--run-id ID]

``run`` appends rows to ``<out>/<device>.csv`` and writes ``<device>_<run id>.md`` (the table) and
PNG plots next to it. ``--out`` defaults to ``$OUT`` when set, else ``benchmarks/results``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .problems import MODES, PRESETS
from .providers import PROVIDERS

DEFAULT_PROVIDERS = list(PROVIDERS)


def _default_out() -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return Path(__file__).resolve().parent / "results"


def _write_report(csv_path: Path, run_id: str | None, out_dir: Path) -> None:
    from .report import load_rows, markdown, plot

    rows = load_rows(csv_path, run_id)
    if not rows:
        sys.exit(f"no rows for run {run_id!r} in {csv_path}")
    rid = rows[0]["run_id"]
    md = out_dir / f"{rows[0]['device']}_{rid}.md"
    md.write_text(markdown(rows))
    try:
        pngs = plot(rows, out_dir)
    except ImportError as err:  # a GPU box without matplotlib still gets the CSV and table
        print(f"no plots: {err}")
        pngs = []
    print(f"table: {md}")
    for p in pngs:
        print(f"plot: {p}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="measure a preset and write CSV rows, plots and a table")
    run.add_argument("--preset", choices=sorted(PRESETS), default="cpu-quick")
    run.add_argument("--providers", nargs="+", choices=DEFAULT_PROVIDERS, default=DEFAULT_PROVIDERS)
    run.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    run.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if present)")
    run.add_argument("--beta", type=float, default=0.0, help="0 forward KL, 1 reverse KL, else JSD")
    run.add_argument("--budget-s", type=float, default=600.0, help="stop starting points after it")
    run.add_argument(
        "--mem-cap-gib", type=float, default=4.0, help="CPU: skip points estimated above it"
    )
    run.add_argument("--worker-timeout-s", type=float, default=300.0)
    run.add_argument(
        "--threads", type=int, default=None, help="CPU threads per worker (default: torch's)"
    )
    run.add_argument("--note", default="", help="machine note stored in every row")
    run.add_argument("--out", type=Path, default=None)
    rep = sub.add_parser("report", help="plots and table of a run already in a CSV")
    rep.add_argument("--csv", type=Path, required=True)
    rep.add_argument("--run-id", default=None, help="default: the last run in the file")
    rep.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    if args.cmd == "report":
        _write_report(args.csv, args.run_id, args.out or args.csv.parent)
        return

    import torch

    from .runner import run_preset

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out or _default_out()
    path, run_id, _ = run_preset(
        PRESETS[args.preset],
        args.providers,
        device=device,
        out_dir=out,
        beta=args.beta,
        modes=tuple(args.modes),
        budget_s=args.budget_s,
        mem_cap_gib=args.mem_cap_gib,
        worker_timeout_s=args.worker_timeout_s,
        machine_note=args.note,
        threads=args.threads,
    )
    _write_report(path, run_id, out)


if __name__ == "__main__":
    main()
