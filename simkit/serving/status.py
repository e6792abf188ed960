"""Serve's metrics: `aggregate` makes every metrics row (a worker's own and a host's sum of its
workers', see docs/SERVE_METRICS.md) and `StatusReporter` shows one as a live line on stderr and
appends it to `metrics.jsonl`."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

# the pair mix serve reports: pairs whose sides take different actions (ask vs answer) or the same
# one (content only), overall and per gold action
MIX_KEYS = ("pairs_action", "pairs_content", "pairs_action_clarify", "pairs_content_clarify",
            "pairs_action_answer", "pairs_content_answer")
# per-worker counters: each worker counts its own work, so the host's figure is their sum
SUM_KEYS = ("episodes", "pairs", "failures", "right_action", "successes", "terminated", "identical_dropped",
            "no_contrast", "content_dropped", "duplicates", "recovered", "retries", "adapter_heals", "queue_outages",
            "queue_outage_s") + MIX_KEYS
# per-second rates, of these counters over each worker's own elapsed_s (summed over workers too)
RATE_KEYS = ("episodes", "pairs")
# queue-wide figures: every worker reads the same queue counter, so summing would count it once per
# worker; the host reports it once, from the newest row (dropped_stale only grows: the newest is the largest)
QUEUE_KEYS = ("dropped_stale", "queue_depth")


def count_mix(m: dict[str, Any], pair: Any) -> None:
    """Add one appended pair to the mix counters in `m` (see MIX_KEYS)."""
    kind = pair.kind
    if kind not in ("action", "content"):
        return
    m[f"pairs_{kind}"] += 1
    gold = str(pair.gold_action).lower()
    if f"pairs_{kind}_{gold}" in m:
        m[f"pairs_{kind}_{gold}"] += 1


def aggregate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One metrics row from counter rows: a worker passes its own counters, the pool its workers'
    latest metrics rows (themselves made here). One function, so both agree on every figure.

    Counters (SUM_KEYS) and rates (RATE_KEYS over each row's elapsed_s) are summed; queue-wide
    figures (QUEUE_KEYS) come once, from the newest row (a sum would multiply them by the number
    of workers); plus the version range and the ratios."""
    out: dict[str, Any] = {"time": time.time(), "workers_reporting": len(rows)}
    for k in SUM_KEYS:
        out[k] = round(sum(r.get(k) or 0 for r in rows), 3)
    for k in RATE_KEYS:
        out[f"{k}_per_s"] = round(sum((r.get(k) or 0) / r["elapsed_s"] for r in rows if r.get("elapsed_s")), 3)
    versions = [r.get("version") or 0 for r in rows] or [0]
    out["version"], out["version_min"] = max(versions), min(versions)
    newest = max(rows, key=lambda r: r.get("time") or 0, default={})
    for k in QUEUE_KEYS:
        out[k] = newest.get(k) or 0
    out["action_accuracy"] = round(out["right_action"] / out["episodes"], 4) if out["episodes"] else None
    out["success_rate"] = round(out["successes"] / out["terminated"], 4) if out["terminated"] else None
    out["elapsed_s"] = round(max((r.get("elapsed_s") or 0 for r in rows), default=0), 2)
    return out


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
            f"stale dropped {s['dropped_stale']}" + _mix(s)
            + (f" | content dropped {s['content_dropped']}" if s.get("content_dropped") else "")
            + (f" | workers {s['alive']}/{s['workers']}" if "workers" in s else ""))


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
