"""The status reporter: a live line on stderr and a `metrics.jsonl` row, from one snapshot."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

# the pair mix serve reports: pairs whose sides take different actions (ask vs answer) or the same
# one (content only), overall and per gold action
MIX_KEYS = ("pairs_action", "pairs_content", "pairs_action_clarify", "pairs_content_clarify",
            "pairs_action_answer", "pairs_content_answer")


def count_mix(m: dict[str, Any], pair: Any) -> None:
    """Add one appended pair to the mix counters in `m` (see MIX_KEYS)."""
    kind = pair.kind
    if kind not in ("action", "content"):
        return
    m[f"pairs_{kind}"] += 1
    gold = str(pair.gold_action).lower()
    if f"pairs_{kind}_{gold}" in m:
        m[f"pairs_{kind}_{gold}"] += 1


def _mix(s: dict[str, Any]) -> str:
    if "pairs_action" not in s:
        return ""
    return (f" | mix action/content {s['pairs_action']}/{s['pairs_content']} (clarify "
            f"{s.get('pairs_action_clarify', 0)}/{s.get('pairs_content_clarify', 0)}, answer "
            f"{s.get('pairs_action_answer', 0)}/{s.get('pairs_content_answer', 0)})")


def status_line(s: dict[str, Any]) -> str:
    return (f"v{s['version']} | {s['episodes']} ep ({s['episodes_per_s']:.1f}/s) | {s['pairs']} pairs "
            f"({s['pairs_per_s']:.1f}/s) | action acc {s['action_accuracy'] or 0:.2f} | success "
            f"{s['success_rate'] or 0:.2f} | queue {s['queue_depth']} | failed {s['failures']} | "
            f"stale dropped {s['dropped_stale']}" + _mix(s) + (f" | workers {s['alive']}/{s['workers']}" if "workers" in s else ""))


class StatusReporter:
    def __init__(self, metrics_path: Path, snapshot: Callable[[], dict[str, Any]],
                 metrics_every_s: float = 1.0, log_every_s: float = 5.0, quiet: bool = False):
        self.metrics_path, self.snapshot = metrics_path, snapshot
        self.metrics_every_s, self.log_every_s = metrics_every_s, log_every_s
        self._last_metrics = time.monotonic()
        self._last_log = 0.0
        self.tty = sys.stderr.isatty()
        self.quiet = quiet  # metrics only, no line (a pool worker: its parent prints the sum)

    def write_metrics(self, final: bool = False) -> None:
        now = time.monotonic()
        if final or now - self._last_metrics >= self.metrics_every_s:
            self._last_metrics = now
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(self.snapshot()) + "\n")

    def tick(self) -> None:
        """The status line: redrawn on a terminal, one line every `log_every_s` in logs."""
        if self.quiet:
            return
        line = status_line(self.snapshot())
        if self.tty:
            print("\r" + line[:200].ljust(120), end="", file=sys.stderr, flush=True)
        elif time.monotonic() - self._last_log >= self.log_every_s:
            self._last_log = time.monotonic()
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty and not self.quiet:
            print(file=sys.stderr)
