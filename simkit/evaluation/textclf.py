"""`simkit textclf`: a text-classifier row — TF-IDF word 1-2-grams + logistic regression.

Why: before crediting a trained policy with knowing *when* to ask, compare it with the cheapest
model that reads only the words of the request. If a bag of n-grams trained on the same n
conversations matches the policy's Macro F1 and J, the policy learnt a surface cue.

* Training data: the tasks of the same n training conversations `trainer sft --n-conversations N
  --sample-seed S` trains on (`sample_conversations(env.tasks(train_split), N, S)`), labelled with
  their gold action.
* Text: for AmbigSQL (tasks with `meta["question"]`) only the question. The user message there is
  the database schema followed by "Question: ...": the schema is the same for a database's
  CLARIFY and ANSWER variants, so its n-grams carry no action signal and would only let the
  model memorise databases. Other envs: the user's last message.
* Model: `TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)` + `LogisticRegression(
  class_weight="balanced", max_iter=2000)` (deterministic). A training sample with one action
  only predicts that action.
* Eval tasks: `--tasks-file` (exact ids) or the split in `simkit eval`'s seeded order
  (`task_order(tasks, --eval-seed, --n-tasks)`), so rows pair with an eval run's rows.
* A run on a split named `test` is logged like `simkit eval`'s (OUT/test_evals.jsonl and
  $SIMKIT_TEST_LOG).
* Output: OUT/per_task.jsonl (first_action = the prediction, content scores null, `p_clarify`
  = the predicted probability of CLARIFY), metrics.json, table.md, conversations.json.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, Field

from simkit.types import ANSWER, CLARIFY, Task


def text_of(task: Task) -> str:
    """The words the classifier reads: the AmbigSQL question alone, else the last user message."""
    q = task.meta.get("question")
    if isinstance(q, str) and q:
        return q
    return next((m.content for m in reversed(task.prompt) if m.role == "user"), "")


class TextActionClassifier:
    """Gold action from the request's words (fit on training tasks, predict on eval tasks)."""

    def __init__(self, c: float = 1.0):
        self.c = c
        self._only: str | None = None
        self._model: Any = None

    def fit(self, tasks: Sequence[Task]) -> "TextActionClassifier":
        labels = [t.gold_action for t in tasks]
        if not labels:
            raise ValueError("no training tasks")
        if len(set(labels)) == 1:
            self._only = labels[0]
            return self
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        self._model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, lowercase=True),
                                    LogisticRegression(C=self.c, class_weight="balanced", max_iter=2000))
        self._model.fit([text_of(t) for t in tasks], [int(a == CLARIFY) for a in labels])
        return self

    def p_clarify(self, tasks: Sequence[Task]) -> list[float]:
        if self._only is not None:
            return [float(self._only == CLARIFY)] * len(tasks)
        return [float(p) for p in self._model.predict_proba([text_of(t) for t in tasks])[:, 1]]

    def predict(self, tasks: Sequence[Task]) -> list[str]:
        return [CLARIFY if p >= 0.5 else ANSWER for p in self.p_clarify(tasks)]


def rows_of(tasks: Sequence[Task], probs: Sequence[float]) -> list[dict[str, Any]]:
    """Per-task rows of the predictions (content scores null: the classifier writes no reply)."""
    out = []
    for t, p in zip(tasks, probs):
        first = CLARIFY if p >= 0.5 else ANSWER
        clarify = t.gold_action == CLARIFY
        out.append({"task_id": t.id, "gold_action": t.gold_action, "first_action": first, "asked": first == CLARIFY,
                    "p_question": None, "answer_exec": None,
                    "ask_credit": int(first == CLARIFY) if clarify else None, "turn_score": None,
                    "traj_score": None, "post_clarify_exec": None, "status": "ok", "p_clarify": round(p, 6)})
    return out


def run(env_name: str, out: Path, n_conversations: int | None, seed: int = 0, train_split: str = "train",
        split: str | None = None, tasks_file: str | None = None, n_tasks: int | None = None, eval_seed: int = 0,
        label: str | None = None, data_dir: str | None = None) -> dict[str, Any]:
    """Fit on the training sample, predict the eval tasks, write the artefacts; the metrics dict."""
    from simkit.env import make
    from simkit.evaluation.evaluate import load_tasks_file, task_order
    from simkit.evaluation.metrics import markdown_table, summarize
    from simkit.evaluation.results import FILE, write_rows
    from simkit.sampling import TooFewConversations, sample_conversations
    from simkit.types import Trajectory

    t0 = time.time()
    env = make(env_name, **({"data_dir": data_dir} if data_dir else {}))
    splits = list(env.splits())
    split = split or splits[-1]
    if split == train_split:
        print(f"warning: evaluating on the training split {split!r}", flush=True)
    try:
        sample = sample_conversations(env.tasks(train_split), n_conversations, seed, env=env.name, split=train_split)
    except TooFewConversations as e:
        raise SystemExit(f"simkit textclf: {e}")
    pool = env.tasks(split)
    tasks = load_tasks_file(tasks_file, pool)[: n_tasks or None] if tasks_file else task_order(pool, eval_seed, n_tasks)
    clf = TextActionClassifier().fit(sample.tasks)
    probs = clf.p_clarify(tasks)
    rows = rows_of(tasks, probs)
    out.mkdir(parents=True, exist_ok=True)
    sample.write(out / "conversations.json")
    label = label or f"textclf n={len(sample.conversation_ids)}"
    trajs = [Trajectory(task_id=r["task_id"], env=env.name, prompt=[], gold_action=r["gold_action"],
                        first_action=r["first_action"]) for r in rows]
    metrics = summarize(trajs)
    for k in ("turn_score", "turn_score_question_only", "trajectory_score", "post_clarify_score",
              "post_clarify_score_asked", "answer_exec", "avg_assistant_turns"):
        metrics[k] = None  # no reply was written: content scores do not apply
    meta = {"label": label, "env": env.name, "metric": getattr(env, "metric_name", "score"),
            "model": "tfidf-word-1-2gram+logreg", "adapter": None, "seed": seed, "n_train": len(sample.conversation_ids),
            "train_split": train_split, "command": shlex.join(sys.argv), "split": split,
            "sample_file": tasks_file, "n_tasks": n_tasks, "eval_seed": eval_seed, "wall_s": round(time.time() - t0, 2),
            "classifier": "textclf (the prediction is the action)", "simulator": None,
            "text": "meta.question" if tasks and "question" in tasks[0].meta else "last user message"}
    metrics.update({k: v for k, v in meta.items() if k not in metrics})
    write_rows(out / FILE, rows, meta)
    if split == "test":  # a look at the test split is logged, as `simkit eval` logs it
        import os

        from simkit.evaluation.evaluate import log_test_eval
        from simkit.evaluation.results import ids_sha

        entry = {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "label": label,
                 "model": meta["model"], "command": meta["command"], "env": env.name, "split": split,
                 "n_tasks": len(tasks), "task_ids_sha256": ids_sha(t.id for t in tasks), "out": str(out)}
        logged = log_test_eval(entry, out, os.environ.get("SIMKIT_TEST_LOG"))
        print(f"note: test-split evaluation logged ({len(tasks)} tasks) to {', '.join(map(str, logged))}")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "table.md").write_text(markdown_table([(label, metrics)], metrics["metric"]) + "\n")
    return metrics


class TextclfConfig(BaseModel):
    """`simkit textclf`: the text-classifier row."""

    model_config = ConfigDict(extra="forbid")

    env: str = Field(..., description="environment name (see `simkit envs`)")
    out: Path = Field(..., description="output directory")
    train_split: str = Field("train", description="split the training conversations come from")
    n_conversations: int | None = Field(None, ge=1, json_schema_extra={"flags": ["--n-conversations", "--n"],
                                                                        "metavar": "N"},
                                        description="training conversations (default: all)")
    seed: int = Field(0, description="conversation-sample seed, as `trainer sft --sample-seed`")
    split: str | None = Field(None, description="evaluation split (default: the env's last split)")
    tasks_file: str | None = Field(None, json_schema_extra={"metavar": "FILE"},
                                   description="evaluate exactly these task ids ({\"task_ids\": [...]})")
    n_tasks: int | None = Field(None, ge=1, json_schema_extra={"metavar": "N"},
                                description="evaluate N tasks, chosen as `simkit eval --n-tasks N --seed EVAL_SEED` "
                                            "chooses them (default: all)")
    eval_seed: int = Field(0, description="eval task order seed for --n-tasks")
    label: str | None = Field(None, description="row label (default 'textclf n=N')")
    data_dir: str | None = Field(None, description="task data folder (default $SIMKIT_DATA_DIR)")


def register_cli(sub: argparse._SubParsersAction) -> None:
    from simkit.config import add_config_args

    p = sub.add_parser(
        "textclf", help="a text-classifier baseline row: TF-IDF word 1-2-grams + logistic regression",
        description="Train TF-IDF (word 1-2-grams) + logistic regression on the user's request of the same N "
                    "training conversations `trainer sft --n-conversations N --sample-seed S` uses (AmbigSQL: the "
                    "question only, not the schema) to predict the gold action; predict the eval tasks; write "
                    "OUT/per_task.jsonl (first_action = the prediction, content scores null) for `simkit compare`.")
    add_config_args(p, TextclfConfig)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from simkit.evaluation.compare import compare

    from simkit.config import config_or_exit

    c = config_or_exit(TextclfConfig, args, "textclf")
    m = run(c.env, c.out, c.n_conversations, c.seed, c.train_split, c.split, c.tasks_file, c.n_tasks, c.eval_seed,
            c.label, c.data_dir)
    print(compare([str(c.out)]))
    print(f"\n{m['n']} tasks; trained on {m['n_train']} conversations; rows in {c.out}/per_task.jsonl")
    return 0
