"""The pictures of an eval: the confusion matrix of one run, and metrics against the number of
training conversations across runs."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence


def plot_confusion(metrics: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, m = metrics["confusion"]["labels"], metrics["confusion"]["matrix"]
    fig, ax = plt.subplots(figsize=(3.6, 3.2), dpi=120)
    ax.imshow(m, cmap="Blues")
    for i in range(len(m)):
        for j in range(len(m)):
            ax.text(j, i, str(m[i][j]), ha="center", va="center", fontsize=12)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted (first action)")
    ax.set_ylabel("gold")
    ax.set_title(f"{metrics.get('label', '')} — {metrics.get('env', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def method_of(label: str) -> str:
    """A run's method: its label without the "n=50"-style training-size part."""
    return re.sub(r"\s*\bn\s*=\s*\d+\b", "", str(label)).strip(" ,;") or str(label)


def plot_vs_n(runs: Sequence[dict[str, Any]], path: Path) -> None:
    """Metrics vs number of training conversations (runs carrying `n_train`): one panel per metric,
    one line per method (the run label without its "n=…")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_method: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for r in runs:
        if r.get("n_train") is not None:
            by_method.setdefault(method_of(r.get("label", "")), []).append((int(r["n_train"]), r))
    if not by_method:
        return
    panels = (("macro_f1", "Macro F1"), ("turn_score", "Turn"), ("trajectory_score", "Traj"),
              ("post_clarify_score", "Post-Clarify (gold CLARIFY)"), ("post_clarify_score_asked", "Post-Clarify (asked)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), dpi=120, sharex=True)
    for ax, (key, name) in zip(axes, panels):
        for method, pts in by_method.items():
            pts.sort(key=lambda p: p[0])
            ax.plot([n for n, _ in pts], [100 * (r.get(key) or 0) for _, r in pts], marker="o", label=method)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("training conversations")
    axes[0].set_ylabel("score (x100)")
    axes[-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
