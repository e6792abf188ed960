"""`simkit eval` and `simkit compare`: the paper's metrics for any OpenAI-compatible model.

A run directory holds `config.json`, `episodes.jsonl` (one full trajectory per task, appended as
episodes finish: an interrupted run resumes where it stopped), `metrics.json`, `table.md`,
`confusion.png`, `usage.json` (tokens per role: the cost of the run) and `per_task.jsonl` (one
row per task: the evidence `simkit compare` recomputes every number from, see `results.py`).

Task samples: `--tasks-file FILE` evaluates exactly the ids of a `{"task_ids": [...]}` file (the
sealed test sample is bench/results/sealed_test_ambigsql.json). Every eval on a split named
`test` is logged (`log_test_eval`) to OUT/test_evals.jsonl and to the project log given by
--test-log or $SIMKIT_TEST_LOG, so looks at the test split are counted, not forgotten.
ICL baselines (`--icl-shots K`): K demonstrations from the env's tuning pool, chosen at random
or by similarity to the task (TF-IDF cosine), the model told it may answer or ask.

Decoding: greedy (temperature 0) with at most 128 new tokens unless --temperature / --max-tokens
say otherwise, as the authors evaluate; training rollouts (`serve`, `pairs build`) keep their own
sampling settings. Every metrics file and table names the simulator and the classifier used, and
the classifier's CLARIFY precision/recall on the evaluated tasks' reference responses
(`classifier_check`; `simkit eval-classifier` measures it alone, per split).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import shlex
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from simkit.evaluation.metrics import action_report, classifier_cell, markdown_table, summarize
from simkit.types import CLARIFY, Message, Task, Trajectory


# --------------------------------------------------------------------------- ICL
def _bow(text: str) -> Counter:
    return Counter(re.findall(r"\w+", text.lower()))


class ShotSelector:
    """K-shot demonstrations from a pool: 'random' (seeded) or 'similar' (TF-IDF cosine)."""

    def __init__(self, pool: Sequence[Task], k: int, how: str = "random", seed: int = 0):
        self.pool, self.k, self.how, self.seed = list(pool), k, how, seed
        if how == "similar":
            docs = [_bow(self._query(t)) for t in self.pool]
            df = Counter(w for d in docs for w in d)
            n = len(docs)
            self._idf = {w: math.log((1 + n) / (1 + c)) + 1 for w, c in df.items()}
            self._vecs = [self._vec(d) for d in docs]

    @staticmethod
    def _query(t: Task) -> str:
        return next((m.content for m in reversed(t.prompt) if m.role == "user"), "")

    def _vec(self, bow: Counter) -> dict[str, float]:
        v = {w: c * self._idf.get(w, 1.0) for w, c in bow.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {w: x / norm for w, x in v.items()}

    def select(self, task: Task) -> list[Task]:
        cands = [i for i, t in enumerate(self.pool) if t.id != task.id]
        if self.how == "random":
            return [self.pool[i] for i in random.Random(f"{self.seed}-{task.id}").sample(cands, min(self.k, len(cands)))]
        q = self._vec(_bow(self._query(task)))
        sim = lambda i: sum(q.get(w, 0.0) * x for w, x in self._vecs[i].items())  # noqa: E731
        return [self.pool[i] for i in sorted(cands, key=lambda i: (-sim(i), i))[: self.k]]

    @staticmethod
    def as_messages(shots: Sequence[Task]) -> list[Message]:
        """Each shot as a worked conversation; clarifying shots include the user's reply and answer."""
        out: list[Message] = []
        for s in shots:
            out += [*s.prompt, Message(role="assistant", content=s.reference)]
            if s.gold_action == CLARIFY and s.user_reply:
                out += [Message(role="user", content=s.user_reply), Message(role="assistant", content=str(s.goal))]
        return out


class ICLPolicy:
    """Wraps a policy: prepends the task's K shots to the dialogue (after the system text)."""

    def __init__(self, policy: Any, selector: ShotSelector):
        self.policy, self.selector = policy, selector

    @property
    def model(self) -> str | None:
        return self.policy.model

    async def respond(self, messages, instruction=None, task=None, **kw):
        shots = ShotSelector.as_messages(self.selector.select(task))
        msgs = list(messages)
        at = 1 if msgs and msgs[0].role == "system" else 0
        note = Message(role="system", content="Here are example conversations. In each, the assistant either "
                                              "answers directly or asks a clarifying question when the request "
                                              "is ambiguous.")
        return await self.policy.respond(msgs[:at] + [note] + shots + msgs[at:], instruction, task=task, **kw)


# --------------------------------------------------------------------------- runs
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


def task_order(tasks: Sequence[Task], seed: int, limit: int | None) -> list[Task]:
    """Identical seeds give identical order (and the same --limit subset)."""
    order = list(tasks)
    random.Random(seed).shuffle(order)
    return order[:limit] if limit else order


EVAL_TEMPERATURE, EVAL_MAX_TOKENS = 0.0, 128  # the authors' evaluation decoding


async def classifier_check(classifier: Any, tasks: Sequence[Task], concurrency: int = 64) -> dict[str, Any]:
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


async def evaluate(env, tasks: Sequence[Task], policy: Any, out_dir: Path, concurrency: int = 64,
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


def compare(run_dirs: Sequence[str | Path], plot: Path | None = None, **kw: Any) -> str:
    """`simkit compare` (kept here for callers of the old name; see `simkit.evaluation.compare`)."""
    from simkit.evaluation.compare import compare as _compare

    return _compare(run_dirs, plot, **kw)


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


# --------------------------------------------------------------------------- CLI
def register_cli(sub: argparse._SubParsersAction) -> None:
    from simkit.roles.build import add_role_args
    from simkit.sampling import conversations_help

    p = sub.add_parser(
        "eval", help="score a model on an environment with the paper's metrics",
        description="Run every evaluation task through the env (policy, simulator, classifier) and report "
                    "action-level (accuracy, macro F1, CLARIFY precision/recall, confusion matrix) and "
                    "content-level scores with the task's own metric: Turn (first response vs the reference "
                    "winner: for a CLARIFY turn the gold continuation question + user's reply + answer, as the "
                    "authors), Turn (question only) (vs the reference response alone), Traj, Post-Clarify (gold "
                    "CLARIFY) (trajectory score over turns whose gold action is CLARIFY) and Post-Clarify (asked) "
                    "(over turns where the model asked). Decoding is greedy with at most 128 new tokens unless "
                    "--temperature / --max-tokens say otherwise. Every table and metrics.json names the "
                    "simulator and classifier used, with the classifier's CLARIFY precision/recall on the "
                    "evaluated reference responses. Writes OUT/episodes.jsonl, metrics.json, table.md, "
                    "confusion.png, usage.json, classifier_check.json. Resumable.")
    p.add_argument("--env", required=True, help="environment name (see `simkit envs`)")
    p.add_argument("--split", help="evaluation split (default: the env's last split)")
    p.add_argument("--out", required=True, help="run directory (resumes if it holds episodes)")
    p.add_argument("--limit", type=int,
                   help="evaluate only N tasks (turns), a seeded random subset (the same N for the same --seed)")
    p.add_argument("--n-conversations", type=int, metavar="N", help=conversations_help())
    p.add_argument("--seed", type=int, default=0, help="task order and conversation-sample seed (default 0)")
    p.add_argument("--tasks-file", metavar="FILE",
                   help="evaluate exactly the task ids of this JSON file ({\"task_ids\": [...]}, order kept; unknown "
                        "ids are an error), e.g. the sealed bench/results/sealed_test_ambigsql.json")
    p.add_argument("--test-log", metavar="PATH", default=os.environ.get("SIMKIT_TEST_LOG"),
                   help="project log of test-split evaluations: one JSON line per eval on a split named 'test' "
                        "(default $SIMKIT_TEST_LOG; OUT/test_evals.jsonl is always written)")
    p.add_argument("--exclude-conversations", metavar="FILE", nargs="+", default=[],
                   help="leave out the conversations listed in these conversations.json files (a training run's "
                        "record): evaluate on a dev split carved from the training pool, never on what was trained")
    p.add_argument("--clarify-rounds", type=int,
                   help="simulated clarification rounds before an episode must end (default 1, as the authors)")
    p.add_argument("--no-classifier-check", dest="classifier_check", action="store_false",
                   help="skip measuring the classifier on the reference responses (it costs one classifier call "
                        "per task with an LLM classifier; free with the rule classifier)")
    p.add_argument("--concurrency", type=int, default=64, help="episodes in flight (default 64)")
    p.add_argument("--icl-shots", type=int, default=0, help="K in-context examples from the tuning pool (default 0)")
    p.add_argument("--icl-select", choices=["random", "similar"], default="random",
                   help="how shots are chosen: random (seeded) or most similar to the task (TF-IDF)")
    p.add_argument("--icl-pool", help="split to draw shots from (default: the env's first split)")
    p.add_argument("--label", help="row label in tables (default: the run directory name)")
    p.add_argument("--n-train", type=int,
                   help="training conversations (dialogues, not turns) behind this model, for tables and the "
                        "vs-n plot (default: read from --train-conversations)")
    p.add_argument("--train-conversations", metavar="FILE",
                   help="conversations.json written by the training run (`trainer sft`, `serve`, `pairs build`): "
                        "its count becomes --n-train and its ids are recorded in metrics.json")
    p.add_argument("--data-dir", help="task data folder (default $SIMKIT_DATA_DIR)")
    p.add_argument("--exec-match", choices=["official", "strict"],
                   help="ambigsql only: official (default) = Spider's test-suite evaluator exactly; strict = "
                        "DISTINCT and every statement count, order only for a top-level ORDER BY")
    add_role_args(p)
    greedy_defaults(p)
    p.set_defaults(func=_run_eval)

    k = sub.add_parser(
        "eval-classifier", help="measure the action classifier against gold labels on reference responses",
        description="Classify every task's reference response (the clarifying question of a CLARIFY turn, the "
                    "answer of an ANSWER turn) with the classifier in use (--classifier rule, the default, or an "
                    "LLM URL) and report accuracy, CLARIFY precision / recall / F1 and the confusion matrix per "
                    "split. `simkit eval` reports the same numbers for its tasks next to the action metrics.")
    k.add_argument("--env", required=True, help="environment name (see `simkit envs`)")
    k.add_argument("--split", action="append", help="split(s) to measure (repeatable; default: every split)")
    k.add_argument("--limit", type=int, help="only the first N tasks of each split")
    k.add_argument("--classifier", default="rule", metavar="rule|URL",
                   help="'rule' (offline heuristics, default) or an OpenAI-compatible URL (few-shot Yes/No)")
    k.add_argument("--classifier-model", help="classifier model name (default: the server's first model)")
    k.add_argument("--concurrency", type=int, default=64, help="classifier calls in flight (default 64)")
    k.add_argument("--out", help="also write the report as JSON here")
    k.add_argument("--data-dir", help="task data folder (default $SIMKIT_DATA_DIR)")
    k.set_defaults(func=_run_eval_classifier)


def greedy_defaults(p: argparse.ArgumentParser) -> None:
    """Eval decodes greedily with at most 128 new tokens (the authors'); the role flags' help says so."""
    p.set_defaults(temperature=EVAL_TEMPERATURE, max_tokens=EVAL_MAX_TOKENS)
    for a in p._actions:
        if a.dest == "temperature":
            a.help = f"policy sampling temperature (default {EVAL_TEMPERATURE:g}: greedy, as the authors evaluate)"
        elif a.dest == "max_tokens":
            a.help = f"policy max new tokens (default {EVAL_MAX_TOKENS}, as the authors evaluate)"


def _run_eval(args: argparse.Namespace) -> int:
    return asyncio.run(_eval_main(args))


def _run_eval_classifier(args: argparse.Namespace) -> int:
    return asyncio.run(_eval_classifier_main(args))


async def _eval_classifier_main(args: argparse.Namespace) -> int:
    from simkit.env import make

    env = make(args.env, **({"data_dir": args.data_dir} if args.data_dir else {}))
    client = None
    if args.classifier == "rule":
        from simkit.roles.agents import RuleClassifier

        clf: Any = RuleClassifier()
    else:
        from simkit.roles.agents import LLMClassifier
        from simkit.roles.client import RoleClient, RoleConfig

        client = RoleClient("classifier", RoleConfig(base_urls=[u.strip() for u in args.classifier.split(",")],
                                                      model=args.classifier_model))
        clf = LLMClassifier(client, env=env.name)
    report: dict[str, Any] = {"env": env.name}
    try:
        for split in args.split or list(env.splits()):
            tasks = env.tasks(split)
            report[split] = await classifier_check(clf, tasks[: args.limit] if args.limit else tasks, args.concurrency)
    finally:
        if client is not None:
            await client.aclose()
    lines = [f"| {env.name} split | classifier | n | Acc | CLARIFY P | CLARIFY R | CLARIFY F1 | confusion [[CC, CA], [AC, AA]] |",
             "|---|---|---|---|---|---|---|---|"]
    for split, r in report.items():
        if split == "env":
            continue
        pct = lambda x: "—" if x is None else f"{100 * x:.1f}"  # noqa: E731
        lines.append(f"| {split} | {r['classifier']} | {r['n']} | {pct(r['accuracy'])} | {pct(r['clarify_precision'])} | "
                     f"{pct(r['clarify_recall'])} | {pct(r['clarify_f1'])} | {r['confusion']['matrix']} |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


async def _eval_main(args: argparse.Namespace) -> int:
    from simkit.env import make
    from simkit.roles.build import build_roles

    from simkit.sampling import TooFewConversations, sample_conversations

    env_kw: dict[str, Any] = {"data_dir": args.data_dir} if args.data_dir else {}
    if args.clarify_rounds is not None:
        env_kw["clarify_rounds"] = args.clarify_rounds
    if args.exec_match is not None:
        env_kw["exec_match"] = args.exec_match
    probe = make(args.env, **env_kw)
    roles = build_roles(args, probe.name)
    env = make(args.env, classifier=roles.classifier, simulator=roles.simulator, **env_kw)
    splits = list(env.splits())
    file_split = None
    if args.tasks_file:
        try:
            file_split = json.loads(Path(args.tasks_file).read_text()).get("split")
        except (OSError, ValueError, AttributeError) as e:
            await roles.aclose()
            raise SystemExit(f"--tasks-file {args.tasks_file}: not readable JSON ({e})")
    split = args.split or file_split or splits[-1]
    if args.tasks_file and file_split and file_split != split:
        await roles.aclose()
        raise SystemExit(f"--tasks-file {args.tasks_file} lists {file_split!r} tasks, not {split!r}")
    if args.tasks_file and args.n_conversations is not None:
        await roles.aclose()
        raise SystemExit("--tasks-file and --n-conversations both choose the tasks: give one")
    excluded = {cid for f in args.exclude_conversations for cid in json.loads(Path(f).read_text())["conversation_ids"]}
    pool = [t for t in env.tasks(split) if t.conversation_id not in excluded]
    try:
        sample = sample_conversations(pool, args.n_conversations, args.seed, env=env.name, split=split)
    except TooFewConversations as e:
        await roles.aclose()
        raise SystemExit(f"simkit eval: {e}")
    if args.tasks_file:
        try:
            tasks = load_tasks_file(args.tasks_file, pool)[: args.limit or None]
        except SystemExit:
            await roles.aclose()
            raise
    else:
        tasks = task_order(sample.tasks, args.seed, args.limit)
    n_train, train_ids = args.n_train, None
    if args.train_conversations:
        rec = json.loads(Path(args.train_conversations).read_text())
        train_ids = rec.get("conversation_ids")
        if n_train is None and train_ids is not None:
            n_train = len(train_ids)
    policy: Any = roles.policy
    if args.icl_shots:
        pool_split = args.icl_pool or splits[0]
        if pool_split == split:
            print(f"warning: ICL shots drawn from the evaluation split {split!r}", flush=True)
        policy = ICLPolicy(policy, ShotSelector(env.tasks(pool_split), args.icl_shots, args.icl_select, args.seed))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({k: v for k, v in vars(args).items() if k != "func"}, indent=2))
    if args.n_conversations is not None:
        sample.write(out / "eval_conversations.json")
    if not (roles.policy.model or roles.policy.client.model):
        try:  # name the served model in the results (the server's first model when none was given)
            await roles.policy.client.resolve_model()
        except Exception:  # noqa: BLE001 - the episodes will report the failure, counted
            pass
    meta = {"split": split, "n_train": n_train, "icl_shots": args.icl_shots, "command": shlex.join(sys.argv),
            "model": roles.policy.model or roles.policy.client.model,
            "decoding": {"temperature": args.temperature, "max_tokens": args.max_tokens}}
    if excluded:
        meta["excluded_conversations"] = len(excluded)
    if getattr(env.config, "exec_match", None):  # which execution match produced the numbers
        meta["exec_match"] = env.config.exec_match
    if train_ids is not None:
        meta["train_conversations"] = {"file": args.train_conversations, "n": len(train_ids)}
    if args.tasks_file:
        meta["tasks_file"] = args.tasks_file
    if split == "test":  # logged when the look happens, so an interrupted look counts too
        from simkit.evaluation.results import ids_sha

        entry = {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "label": args.label or out.name,
                 "model": meta["model"], "command": meta["command"], "env": env.name, "split": split,
                 "n_tasks": len(tasks), "task_ids_sha256": ids_sha(t.id for t in tasks), "out": str(out)}
        logged = log_test_eval(entry, out, args.test_log)
        print(f"note: test-split evaluation logged ({len(tasks)} tasks) to {', '.join(map(str, logged))}", flush=True)
    try:
        metrics = await evaluate(env, tasks, policy, out, args.concurrency, args.label, meta, progress=True,
                                 check_classifier=args.classifier_check)  # a bar; plain lines in a log
    finally:
        usage = {c.role: c.stats.as_dict() for c in roles.clients}
        (out / "usage.json").write_text(json.dumps(usage, indent=2))
        await roles.aclose()
    print(markdown_table([(metrics["label"], metrics)], metrics["metric"]))
    print(f"\nsimulator: {metrics['simulator']}; classifier: {classifier_cell(metrics)}; "
          f"clarification rounds: {metrics.get('clarify_rounds')}")
    tokens = sum(u["prompt_tokens"] + u["completion_tokens"] for u in usage.values())
    print(f"\nartefacts in {out}/ (episodes.jsonl, per_task.jsonl, metrics.json, table.md, confusion.png); "
          f"tokens used this run: {tokens:,}")
    return 0
