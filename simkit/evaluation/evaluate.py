"""An eval run: the paper's metrics for any OpenAI-compatible model (`simkit eval`, in cli.py).

A run directory holds `config.json`, `episodes.jsonl` (one full trajectory per task, appended as
episodes finish: an interrupted run resumes where it stopped), `metrics.json`, `table.md`,
`confusion.png`, `usage.json` (tokens per role: the cost of the run) and `per_task.jsonl` (one
row per task: the evidence `simkit compare` recomputes every number from, see `results.py`).

Task samples: `--tasks-file FILE` evaluates exactly the ids of a `{"task_ids": [...]}` file (the
sealed test sample is bench/results/sealed_test_ambigsql.json). Every eval on a split named
`test` is logged (`log_test_eval`) to OUT/test_evals.jsonl and to the project log given by
--test-log or $SIMKIT_TEST_LOG, so looks at the test split are counted, not forgotten.
ICL baselines (`--icl-shots K`, icl.py): K demonstrations from the env's tuning pool, chosen at random
or by similarity to the task (TF-IDF cosine), the model told it may answer or ask.

Decoding: greedy (temperature 0) with at most 128 new tokens unless --temperature / --max-tokens
say otherwise, as the authors evaluate; training rollouts (`serve`, `pairs build`) keep their own
sampling settings. Every metrics file and table names the simulator and the classifier used, and
the classifier's CLARIFY precision/recall on the evaluated tasks' reference responses
(`classifier_check`; `simkit eval-classifier` measures it alone, per split).
"""
from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any, Sequence

from simkit.evaluation.metrics import action_report, markdown_table, summarize
from simkit.engine import DEFAULT_CONCURRENCY
from simkit.evaluation.plots import plot_confusion
from simkit.evaluation.results import read_episodes
from simkit.types import Task


# --------------------------------------------------------------------------- runs
def task_order(tasks: Sequence[Task], seed: int, n_tasks: int | None) -> list[Task]:
    """Identical seeds give identical order (and the same --n-tasks subset)."""
    order = list(tasks)
    random.Random(seed).shuffle(order)
    return order[:n_tasks] if n_tasks else order


EVAL_TEMPERATURE, EVAL_MAX_TOKENS = 0.0, 128  # the authors' evaluation decoding


async def classifier_check(classifier: Any, tasks: Sequence[Task], concurrency: int = DEFAULT_CONCURRENCY) -> dict[str, Any]:
    """The action classifier against gold labels on the tasks' reference responses: does it call
    the reference clarifying questions CLARIFY and the reference answers ANSWER?"""
    from simkit.roles.agents import describe

    sem = asyncio.Semaphore(max(1, concurrency))

    async def one(t: Task) -> str | None:
        async with sem:
            try:
                return await classifier.classify(t.reference, t)
            except Exception:  # a failed call counts as a wrong label, as in the action metrics
                return None

    pred = await asyncio.gather(*(one(t) for t in tasks))
    return {"classifier": describe(classifier), **action_report([t.gold_action for t in tasks], list(pred)),
            "failed": sum(p is None for p in pred)}


async def _cached_check(env, tasks: Sequence[Task], out_dir: Path, concurrency: int) -> dict[str, Any]:
    from simkit.roles.agents import describe

    path = out_dir / "classifier_check.json"
    ids = sorted(t.id for t in tasks)
    key = {"classifier": describe(env.classifier), "tasks": len(ids), "ids_hash": hash_ids(ids)}
    if path.exists():
        try:
            old = json.loads(path.read_text())
            if old.get("key") == key:
                return old["check"]
        except (ValueError, KeyError):
            pass
    check = await classifier_check(env.classifier, tasks, concurrency)
    path.write_text(json.dumps({"key": key, "check": check}, indent=1))
    return check


def hash_ids(ids: Sequence[str]) -> str:
    import hashlib

    return hashlib.sha1("\n".join(ids).encode()).hexdigest()[:16]


async def evaluate(env, tasks: Sequence[Task], policy: Any, out_dir: Path, concurrency: int = DEFAULT_CONCURRENCY,
                   label: str | None = None, meta: dict | None = None, progress: bool | None = None,
                   check_classifier: bool = True) -> dict[str, Any]:
    """Run (or resume) an eval; write every artefact; return the metrics dict (with the
    simulator and classifier used and, unless `check_classifier` is off, the classifier's
    CLARIFY precision/recall on the tasks' reference responses)."""
    from simkit.roles.agents import describe
    from simkit.engine import run_episodes

    out_dir.mkdir(parents=True, exist_ok=True)
    ep_path = out_dir / "episodes.jsonl"
    done = {t.task_id: t for t in read_episodes(ep_path) if t.status == "ok"}  # failed ones are retried
    if ep_path.exists():  # rewrite without torn lines / failed episodes before appending
        ep_path.write_text("".join(t.model_dump_json() + "\n" for t in done.values()), encoding="utf-8")
    todo = [t for t in tasks if t.id not in done]
    with open(ep_path, "a", encoding="utf-8") as f:
        async for traj in run_episodes(env, todo, policy, concurrency=concurrency, progress=progress):
            f.write(traj.model_dump_json() + "\n")
            f.flush()
            done[traj.task_id] = traj
    order = {t.id: i for i, t in enumerate(tasks)}
    trajs = sorted((t for t in done.values() if t.task_id in order), key=lambda t: order[t.task_id])
    metrics = summarize(trajs)
    from simkit.evaluation.results import FILE as ROWS_FILE, ids_sha, rows_from_episodes, run_meta, write_rows

    metrics["task_ids_sha256"] = ids_sha(t.id for t in tasks)
    metrics.update(env=env.name, metric=getattr(env, "metric_name", "score"), label=label or out_dir.name,
                   classifier=describe(env.classifier), simulator=describe(env.simulator),
                   clarify_rounds=getattr(env, "clarify_rounds", None), **(meta or {}))
    if check_classifier:
        metrics["classifier_check"] = await _cached_check(env, tasks, out_dir, concurrency)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_rows(out_dir / ROWS_FILE, rows_from_episodes(trajs), run_meta(out_dir, trajs))
    (out_dir / "table.md").write_text(markdown_table([(metrics["label"], metrics)], metrics["metric"]) + "\n")
    plot_confusion(metrics, out_dir / "confusion.png")
    return metrics


# --------------------------------------------------------------------------- test-split log
def load_tasks_file(path: str | Path, pool: Sequence[Task]) -> list[Task]:
    """The tasks named by a `{"task_ids": [...]}` file, in its order; unknown ids are an error."""
    try:
        doc = json.loads(Path(path).read_text())
        ids = [str(i) for i in doc["task_ids"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--tasks-file {path}: expected a JSON object with a 'task_ids' list ({e})")
    by_id = {t.id: t for t in pool}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise SystemExit(f"--tasks-file {path}: {len(unknown)} task ids not in the split: {', '.join(unknown[:5])}"
                         + (" ..." if len(unknown) > 5 else ""))
    dup = len(ids) - len(set(ids))
    if dup:
        raise SystemExit(f"--tasks-file {path}: {dup} task ids repeated")
    return [by_id[i] for i in ids]


def log_test_eval(entry: dict[str, Any], out_dir: Path, project_log: str | None) -> list[Path]:
    """Append one line to OUT/test_evals.jsonl and to the project log (if any); the paths written."""
    paths = [out_dir / "test_evals.jsonl"] + ([Path(project_log)] if project_log else [])
    line = json.dumps(entry, ensure_ascii=False) + "\n"
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "a", encoding="utf-8") as f:
            f.write(line)
    return paths
