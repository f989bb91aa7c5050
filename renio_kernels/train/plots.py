"""PNG plots of a run from its metrics.jsonl (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["make_plots"]


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
