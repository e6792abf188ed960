"""`simkit pairs stats`: what a pair stream teaches — the action contrast or only the content.

A pair whose sides take different actions (ask vs answer) teaches *when to ask*; one whose sides
take the same action (SQL vs SQL) teaches only *what to say*. The mix decides what DPO learns, so
it is counted per gold action, per source pair (chosen_source -> rejected_source), per phase and
turn; with a trainer run, the DPO reward margins are split by the same kinds (`margins_by_kind`).
Pairs written before the provenance fields count as their derived kind (`PreferencePair.kind`).
"""
from __future__ import annotations

import json
import sqlite3
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable

from simkit.types import PreferencePair

KINDS = ("action", "content", "unknown")


def read_pairs(path: str | Path) -> list[PreferencePair]:
    """Load a pairs JSONL, failing with the line number on a corrupt row."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(PreferencePair.model_validate_json(line))
                except ValueError as e:
                    raise ValueError(f"{path}:{n}: not a valid preference pair ({str(e).splitlines()[0]})") from e
    return out


def load_pairs(source: str) -> list[PreferencePair]:
    """Pairs from a JSONL file or a SQLite queue (read-only: its live pairs; acked ones have no
    body left). Redis is not read here: point it at serve's RUN_DIR/queued.jsonl instead."""
    if source.startswith("redis://"):
        raise ValueError("a redis queue keeps no readable history: pass serve's RUN_DIR/queued.jsonl "
                         "(every pair serve appended) or RUN_DIR/dpref.jsonl")
    path = Path(source.removeprefix("sqlite:///").removeprefix("sqlite://"))
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"SQLite format 3"):
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT body FROM bodies ORDER BY seq").fetchall()
        finally:
            db.close()
        return [PreferencePair.model_validate_json(r[0]) for r in rows]
    return read_pairs(path)


def _mix(pairs: Iterable[PreferencePair]) -> dict[str, int]:
    c = Counter(p.kind for p in pairs)
    return {k: c.get(k, 0) for k in KINDS}


def pair_stats(pairs: list[PreferencePair]) -> dict[str, Any]:
    """The mix tables as plain data (see `format_stats`)."""
    by_gold: dict[str, list] = defaultdict(list)
    by_source: dict[tuple, list] = defaultdict(list)
    by_phase: dict[str, list] = defaultdict(list)
    for p in pairs:
        by_gold[p.gold_action].append(p)
        by_source[(p.phase, p.chosen_source or "?", p.rejected_source or "?")].append(p)
        by_phase[f"phase {p.phase} turn {p.turn}"].append(p)
    return {
        "pairs": len(pairs), "mix": _mix(pairs),
        "by_gold_action": {g: _mix(ps) for g, ps in sorted(by_gold.items())},
        "by_source": [{"phase": ph, "chosen_source": c, "rejected_source": r, **_mix(ps)}
                      for (ph, c, r), ps in sorted(by_source.items())],
        "by_phase": {k: _mix(ps) for k, ps in sorted(by_phase.items())},
        "by_pair_source": {k: _mix(ps) for k, ps in sorted(_group(pairs, lambda p: p.source or "?").items())},
    }


def _group(pairs: Iterable[PreferencePair], key) -> dict[str, list]:
    out: dict[str, list] = defaultdict(list)
    for p in pairs:
        out[key(p)].append(p)
    return out


def margins_by_kind(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """DPO reward margins split by contrast kind from trainer step rows (trainer/metrics.py logs
    `pairs/action` and `pairs/content` per step next to TRL's batch `rewards/margins`).

    TRL logs one margin per step (the batch mean), so a kind's margin is read two ways: the mean
    margin of steps that trained only that kind (`pure`), and a least-squares split of every
    step's margin as frac_action x m_action + frac_content x m_content (`fit`, when both kinds
    were trained)."""
    steps = [r for r in rows if r.get("event") == "step" and isinstance(r.get("rewards/margins"), (int, float))]
    pure: dict[str, list[float]] = {"action": [], "content": []}
    xs: list[tuple[float, float, float]] = []
    for r in steps:
        a, c = r.get("pairs/action") or 0, r.get("pairs/content") or 0
        if a + c == 0:
            continue
        m = float(r["rewards/margins"])
        if c == 0:
            pure["action"].append(m)
        elif a == 0:
            pure["content"].append(m)
        xs.append((a / (a + c), c / (a + c), m))
    out: dict[str, Any] = {"steps": len(steps), "steps_with_kinds": len(xs),
                           "pure": {k: {"steps": len(v), "margin_mean": round(sum(v) / len(v), 5) if v else None}
                                    for k, v in pure.items()}}
    saa = sum(x[0] * x[0] for x in xs)
    scc = sum(x[1] * x[1] for x in xs)
    sac = sum(x[0] * x[1] for x in xs)
    det = saa * scc - sac * sac
    if xs and abs(det) > 1e-12:
        sam, scm = sum(x[0] * x[2] for x in xs), sum(x[1] * x[2] for x in xs)
        out["fit"] = {"action": round((scc * sam - sac * scm) / det, 5), "content": round((saa * scm - sac * sam) / det, 5)}
    return out


def train_margins(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    return margins_by_kind(rows)


def _table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[str(x) for x in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([title, fmt(header), *(fmt(r) for r in cells[1:])])


def format_stats(report: dict[str, Any]) -> str:
    """The report as plain-text tables."""
    kinds = ["action", "content", "unknown"]
    parts = [f"{report['pairs']} pairs: " + ", ".join(f"{k} {report['mix'][k]}" for k in kinds)]
    parts.append(_table("by gold action", ["gold", *kinds],
                        [[g, *(m[k] for k in kinds)] for g, m in report["by_gold_action"].items()]))
    parts.append(_table("by source (chosen -> rejected)", ["phase", "chosen -> rejected", *kinds],
                        [[r["phase"], f"{r['chosen_source']} -> {r['rejected_source']}", *(r[k] for k in kinds)]
                         for r in report["by_source"]]))
    parts.append(_table("by phase and turn", ["phase/turn", *kinds],
                        [[k, *(m[x] for x in kinds)] for k, m in report["by_phase"].items()]))
    parts.append(_table("by pair source", ["source", *kinds],
                        [[k, *(m[x] for x in kinds)] for k, m in report["by_pair_source"].items()]))
    if "train" in report:
        t = report["train"]
        rows = [[k, t["pure"][k]["steps"], t["pure"][k]["margin_mean"], (t.get("fit") or {}).get(k)]
                for k in ("action", "content")]
        parts.append(_table(f"DPO reward margins by kind ({t['steps_with_kinds']} of {t['steps']} steps logged kinds)",
                            ["kind", "pure steps", "pure mean", "fit"], rows))
    return "\n\n".join(parts)
