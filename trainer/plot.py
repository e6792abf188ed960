"""`trainer plot RUN_DIR`: learning-curve PNGs from RUN_DIR/metrics.jsonl (DPO or SFT runs).

The chosen and rejected rewards get a figure of their own (both may fall while the margin grows:
a rising margin alone does not say the chosen got likelier), the margin another, with the
margins of steps that trained only action-contrast or only content-contrast pairs when the run
logged its pair mix (trainer/metrics.py)."""
from __future__ import annotations

from pathlib import Path

from .metrics import read_metrics

# figure name -> (title, y label, [(metric key, legend)])
FIGURES = {
    "loss": ("Training loss", "loss", [("loss", "loss")]),
    "rewards": ("DPO implicit rewards (β·log π/π_ref): chosen and rejected", "reward",
                [("rewards/chosen", "chosen"), ("rewards/rejected", "rejected")]),
    "margins": ("DPO reward margin (chosen − rejected), by pair kind when logged", "margin",
                [("rewards/margins", "all pairs"), ("rewards/margins_action", "action-contrast steps"),
                 ("rewards/margins_content", "content-only steps")]),
    "pair_mix": ("Pairs per step by contrast kind", "pairs",
                 [("pairs/action", "action (ask vs answer)"), ("pairs/content", "content (same action)")]),
    "reward_accuracy": ("Reward accuracy (chosen > rejected)", "fraction", [("rewards/accuracies", "accuracy")]),
    "logps": ("Sequence log-probabilities", "log p", [("logps/chosen", "chosen"), ("logps/rejected", "rejected")]),
    "token_accuracy": ("Next-token accuracy", "fraction", [("mean_token_accuracy", "accuracy")]),
    "throughput": ("Throughput", "pairs / s", [("pairs_per_s", "pairs/s")]),
    "staleness": ("Staleness (current version − pair's policy version)", "versions",
                  [("staleness_mean", "mean"), ("staleness_max", "max"), ("policy_version", "policy version")]),
    "learning_rate": ("Learning rate", "lr", [("learning_rate", "lr")]),
}


def _smooth(ys: list[float], k: int) -> list[float]:
    if k <= 1 or len(ys) < 2 * k:
        return ys
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= k:
            acc -= ys[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None, smooth: int = 1) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    rows = read_metrics(run_dir)
    steps = [r for r in rows if r.get("event") == "step"]
    if not steps:
        raise ValueError(f"{run_dir}/metrics.jsonl has no training steps yet")
    publishes = [r["step"] for r in rows if r.get("event") == "publish"]
    written = []
    for name, (title, ylabel, series) in FIGURES.items():
        present = [(k, label) for k, label in series if any(isinstance(r.get(k), (int, float)) for r in steps)]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for (key, label), style in zip(present, ("-", "--", ":", "-.")):
            pts = [(r["step"], r[key]) for r in steps if isinstance(r.get(key), (int, float))]
            xs, ys = zip(*pts)
            if key.startswith("rewards/margins_"):  # by-kind margins exist only on single-kind steps: points
                ax.plot(xs, ys, "o", ms=3, alpha=0.7, label=label)
                continue
            ax.plot(xs, _smooth(list(ys), smooth), style, label=label, lw=1.5)
        for s in publishes:
            ax.axvline(s, color="grey", alpha=0.25, lw=0.8)
        ax.set_title(title + (" — grey lines: published versions" if publishes else ""), fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        if len(present) > 1:
            ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
