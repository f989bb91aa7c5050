"""PNG plots of a run from its metrics.jsonl (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["experiment_plot", "make_plots"]


def make_plots(run_dir: Path, records: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    paths = []

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train])
    ax_loss.set(xlabel="step", ylabel="loss", title="distillation loss")
    ax_acc.plot(
        [r["step"] for r in train],
        [r["correct_share"] for r in train],
        alpha=0.6,
        label="sampled completions (train)",
    )
    ax_acc.plot(
        [r["step"] for r in evals],
        [r["eval_accuracy"] for r in evals],
        "o-",
        label="held-out, greedy",
    )
    ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    ax_acc.legend()
    fig.tight_layout()
    paths.append(out / "loss_accuracy.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, (ax_w, ax_auc) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (
        ("weight_mean_correct", "correct SGOs"),
        ("weight_mean_incorrect", "incorrect SGOs"),
    ):
        pts = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        ax_w.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
    ax_w.set(xlabel="step", ylabel="mean ReNIO weight", title="weights by outcome")
    ax_w.legend()
    pts = [(r["step"], r["weight_auroc"]) for r in train if r.get("weight_auroc") is not None]
    ax_auc.plot([p[0] for p in pts], [p[1] for p in pts], ".", alpha=0.6)
    ax_auc.axhline(0.5, color="gray", lw=0.8)
    ax_auc.set(
        xlabel="step", ylabel="AUROC", ylim=(0, 1), title="AUROC of weights: incorrect vs correct"
    )
    fig.tight_layout()
    paths.append(out / "weights.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def _interval_bar(ax, iv, y: float, color: str) -> None:
    lo, hi = 100 * (iv.estimate - iv.low), 100 * (iv.high - iv.estimate)
    ax.errorbar(100 * iv.estimate, y, xerr=[[lo], [hi]], fmt="o", color=color, capsize=3)


def experiment_plot(path: Path, rows: list[dict]) -> Path:
    """An experiment's report figure from its arm rows (``experiment._arm_rows``): accuracy
    after training with 95% intervals (and before, as a cross), each paired difference with its
    interval, and the weight AUROC over training (mean over seeds per block of steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["seeds"]]
    y = list(range(len(rows)))[::-1]
    fig, (ax_acc, ax_diff, ax_auc) = plt.subplots(
        1, 3, figsize=(15, 0.45 * len(rows) + 2.2), gridspec_kw={"width_ratios": [1, 1, 1.1]}
    )
    for yi, r in zip(y, rows, strict=True):
        _interval_bar(ax_acc, r["after"], yi, "C0")
        ax_acc.plot(100 * r["before"], yi, "x", color="gray")
        if r["difference"] is not None:
            _interval_bar(ax_diff, r["difference"], yi, "C1")
    labels = [f"{r['arm']} ({len(r['seeds'])})" for r in rows]
    diff_labels = [f"vs {r['reference']}" if r["difference"] is not None else "" for r in rows]
    ax_acc.set_yticks(y, labels)
    ax_acc.set(xlabel="held-out accuracy, % (x: before)", title="accuracy after [95% CI]")
    ax_diff.set_yticks(y, diff_labels)
    ax_diff.axvline(0, color="gray", lw=0.8)
    ax_diff.set(xlabel="points", title="paired difference [95% CI]")
    for i, r in enumerate(rows):
        blocks = [b for b in r.get("auroc_blocks", []) if b]
        if not blocks or len({len(b) for b in blocks}) != 1:
            continue
        means = []
        for j in range(len(blocks[0])):
            vals = [b[j] for b in blocks if b[j] is not None]
            means.append(sum(vals) / len(vals) if vals else float("nan"))
        color = plt.cm.tab20(i % 20)
        ax_auc.plot(range(1, len(means) + 1), means, "o-", ms=3, label=r["arm"], color=color)
    ax_auc.axhline(0.5, color="gray", lw=0.8)
    ax_auc.set(xlabel="block of steps", ylabel="AUROC", title="weight AUROC (incorrect vs correct)")
    if ax_auc.lines[1:]:
        ax_auc.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
