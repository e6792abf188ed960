"""Pick a learning rate from `recipes/lora_sweep.sh` results, by a rule fixed before looking:
the highest dev Macro F1; ties (within 0.1 points) go to the lower mean training loss of the last
half of the run. Dev = held-out conversations of the TRAINING pool; the test split is never read.

    python recipes/choose_lr.py runs/lora-sweep sft     # prints the chosen lr, and a table on stderr
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def train_loss(run: Path) -> float:
    """Mean loss over the last half of the logged optimizer steps."""
    for metrics in (run / "metrics.jsonl", run / "run" / "metrics.jsonl"):
        if metrics.is_file():
            steps = [json.loads(line) for line in metrics.read_text().splitlines() if '"event": "step"' in line]
            losses = [s["loss"] for s in steps if "loss" in s]
            tail = losses[len(losses) // 2:] or losses
            return sum(tail) / len(tail) if tail else float("inf")
    return float("inf")


def choose(sweep: Path, kind: str) -> tuple[str, list[tuple[str, float, float]]]:
    rows = []
    for dev in sorted(sweep.glob(f"dev-{kind}-*")):
        lr = dev.name.split(f"dev-{kind}-", 1)[1]
        f1 = json.loads((dev / "metrics.json").read_text())["macro_f1"]
        rows.append((lr, round(100 * f1, 1), train_loss(sweep / f"{kind}-{lr}")))
    if not rows:
        raise SystemExit(f"no dev-{kind}-* results in {sweep}")
    best_f1 = max(r[1] for r in rows)
    tied = [r for r in rows if best_f1 - r[1] <= 0.1]
    return min(tied, key=lambda r: r[2])[0], rows


if __name__ == "__main__":
    lr, rows = choose(Path(sys.argv[1]), sys.argv[2])
    for r in rows:
        print(f"{sys.argv[2]} lr={r[0]}: dev Macro F1 {r[1]}, train loss (last half) {r[2]:.4f}", file=sys.stderr)
    print(lr)
