"""Per-task results rows: the compact evidence every reported number is recomputed from.

Why: a table of means cannot be re-tested (no CI, no paired test, no check that two runs saw the
same tasks). One JSONL row per task, after a `{"_meta": {...}}` header row, is small enough to
commit under bench/results/ and is all `simkit compare` needs.

Row fields (scores in [0, 1]; null where a field does not apply):
  task_id, gold_action, first_action (CLARIFY | ANSWER | null when the episode failed),
  asked (first_action == CLARIFY), p_question (first-token probability of a question opener,
  where measured: bench/action_first_token.py --rows), answer_exec (content score — for
  AmbigSQL the execution match — of the FIRST reply on gold-ANSWER turns; null on gold CLARIFY),
  ask_credit (gold-CLARIFY turns: 1 if the first action was CLARIFY; null on gold ANSWER — what
  AmbigSQL's old "Turn Exec" counted on CLARIFY turns), turn_score, traj_score (reward if the
  episode terminated, else 0), post_clarify_exec (traj_score on gold-CLARIFY turns where the
  policy asked; else null), status.

`simkit eval` writes OUT/per_task.jsonl at the end of every run; `simkit results export RUN_DIR`
derives the same rows from an older run's episodes.jsonl + metrics.json/config.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from pydantic import BaseModel, ConfigDict, Field

from simkit.datafile import DataError
from simkit.types import CLARIFY, Trajectory

FILE = "per_task.jsonl"
FIELDS = ("task_id", "gold_action", "first_action", "asked", "p_question", "answer_exec", "ask_credit",
          "turn_score", "traj_score", "post_clarify_exec", "status")
REQUIRED = ("task_id", "gold_action", "first_action")


def row_of(t: Trajectory) -> dict[str, Any]:
    """One task's row (failed episodes score 0, as in `metrics.summarize`)."""
    clarify = t.gold_action == CLARIFY
    asked = t.first_action == CLARIFY
    traj = float(t.reward) if t.terminated else 0.0
    turn = float(t.turn_score or 0.0)
    return {"task_id": t.task_id, "gold_action": t.gold_action, "first_action": t.first_action, "asked": asked,
            "p_question": t.info.get("p_question"), "answer_exec": None if clarify else turn,
            "ask_credit": (1 if asked else 0) if clarify else None, "turn_score": turn, "traj_score": traj,
            "post_clarify_exec": traj if clarify and asked else None, "status": t.status}


def rows_from_episodes(trajs: Iterable[Trajectory]) -> list[dict[str, Any]]:
    """Rows of a run's trajectories, in their order."""
    return [row_of(t) for t in trajs]


def ids_sha(ids: Iterable[str]) -> str:
    """sha256 of the sorted task ids, one per line: names a task sample independently of order."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def write_rows(path: str | os.PathLike, rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """Header row `{"_meta": meta}` then one row per task (written atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "n": len(rows), "task_ids_sha256": ids_sha(r["task_id"] for r in rows)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps({"_meta": meta}, ensure_ascii=False, default=str) + "\n")
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def read_rows(path: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(meta, rows) of a rows file; a corrupt row is a `DataError` naming file and line."""
    path = Path(path)
    meta: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON: {e.msg}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: a row must be a JSON object, not {type(obj).__name__}")
        if "_meta" in obj:
            if rows or meta:
                raise DataError(f"{path}:{lineno}: the _meta header must be the first row")
            meta = dict(obj["_meta"] or {})
            continue
        missing = [k for k in REQUIRED if k not in obj]
        if missing:
            raise DataError(f"{path}:{lineno}: row lacks {', '.join(missing)}")
        if obj["task_id"] in seen:
            raise DataError(f"{path}:{lineno}: task {obj['task_id']!r} appears twice")
        seen.add(obj["task_id"])
        obj.setdefault("asked", obj["first_action"] == CLARIFY)
        rows.append(obj)
    return meta, rows


# --------------------------------------------------------------------------- run directories
def read_episodes(path: Path) -> list[Trajectory]:
    """Episodes of a run; a torn last line (killed mid-write) is ignored, not fatal."""
    out = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(Trajectory.model_validate_json(line))
            except ValueError:
                continue
    return out


def _episodes_of(run_dir: Path) -> list[Trajectory]:
    """A run's episodes, one per task (the last written wins: resumed runs retry failed ones)."""
    by_id: dict[str, Trajectory] = {}
    for t in read_episodes(run_dir / "episodes.jsonl"):
        by_id.pop(t.task_id, None)
        by_id[t.task_id] = t
    return list(by_id.values())


def wall_seconds(trajs: Sequence[Trajectory]) -> float | None:
    """First episode start to last episode end (the run's wall time, over resumes too)."""
    if not trajs:
        return None
    return round(max(t.started_at + t.duration_s for t in trajs) - min(t.started_at for t in trajs), 2)


def run_meta(run_dir: Path, trajs: Sequence[Trajectory] = ()) -> dict[str, Any]:
    """What produced a run: label, model, adapter, seed, training n, command, split, sample file,
    wall time, classifier, simulator — from metrics.json and config.json where present."""
    def load(name: str) -> dict[str, Any]:
        p = run_dir / name
        try:
            return json.loads(p.read_text()) if p.exists() else {}
        except ValueError:
            return {}
    m, c = load("metrics.json"), load("config.json")
    sample = c.get("tasks_file") or (str(run_dir / "eval_conversations.json")  # older runs wrote one
                                     if (run_dir / "eval_conversations.json").exists() else None)
    policy = (c.get("roles") or {}).get("policy") or {}
    return {"label": m.get("label") or c.get("label") or run_dir.name, "env": m.get("env") or c.get("env"),
            "metric": m.get("metric"), "model": m.get("model") or policy.get("model") or c.get("policy_model"),
            "adapter": m.get("adapter") or c.get("adapter"), "seed": c.get("seed"), "n_train": m.get("n_train"),
            "command": m.get("command") or c.get("command"), "split": m.get("split") or c.get("split"),
            "sample_file": sample, "n_tasks": c.get("n_tasks", c.get("limit")), "wall_s": wall_seconds(trajs),
            "classifier": m.get("classifier"), "simulator": m.get("simulator"), "run_dir": str(run_dir)}


def run_rows(run_dir: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(meta, rows) of a run dir: its per_task.jsonl, or derived from episodes.jsonl (old runs)."""
    run_dir = Path(run_dir)
    if (run_dir / FILE).exists():
        return read_rows(run_dir / FILE)
    trajs = _episodes_of(run_dir)
    return run_meta(run_dir, trajs), rows_from_episodes(trajs)


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """(Re)derive a run's rows from its episodes and write them with the run's meta (+ `extra`)."""
    run_dir = Path(run_dir)
    if not (run_dir / "episodes.jsonl").exists():
        raise SystemExit(f"{run_dir}: no episodes.jsonl to export")
    trajs = _episodes_of(run_dir)
    return write_rows(out, rows_from_episodes(trajs), {**run_meta(run_dir, trajs), **(extra or {})})


def parse_meta(items: Sequence[str]) -> dict[str, Any]:
    """key=value pairs; values that read as JSON (numbers, true, null) are kept typed."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--meta {item!r}: expected key=value")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


class ExportConfig(BaseModel):
    """`simkit results export`: a run's per-task rows as one file."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str = Field(..., json_schema_extra={"positional": True, "metavar": "RUN_DIR"},
                         description="a `simkit eval` run directory")
    out: str = Field(..., description="rows file to write, e.g. bench/results/NAME.jsonl")
    meta: list[str] = Field(default_factory=list, json_schema_extra={"metavar": "KEY=VALUE"},
                            description="header fields to add or override (label=..., adapter=..., seed=1, n_train=50)")


def register_cli(sub: argparse._SubParsersAction) -> None:
    from simkit.config import add_config_args

    p = sub.add_parser("results", help="per-task results rows (the evidence behind every table)",
                       description="Per-task results rows: one JSONL row per task after a _meta header. "
                                   "`export` (re)derives them from a run directory's episodes.jsonl.")
    rs = p.add_subparsers(dest="results_command", metavar="SUBCOMMAND")
    e = rs.add_parser("export", help="write a run's per-task rows to a JSONL file",
                      description="Derive the per-task rows of RUN_DIR from its episodes.jsonl (+ metrics.json / "
                                  "config.json for the header) and write them to --out.")
    add_config_args(e, ExportConfig, config_flag=False)
    e.set_defaults(func=_export_main)
    p.set_defaults(func=lambda a: p.print_help() or 0)


def _export_main(args: argparse.Namespace) -> int:
    from simkit.config import config_or_exit

    cfg = config_or_exit(ExportConfig, args, "results export")
    path = export_run(cfg.run_dir, cfg.out, parse_meta(cfg.meta))
    meta, rows = read_rows(path)
    print(f"{len(rows)} rows ({meta.get('label')}) -> {path}")
    return 0
