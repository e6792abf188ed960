"""`simkit eval` and `simkit compare`: the paper's metrics for any OpenAI-compatible model.

A run directory holds `config.json`, `episodes.jsonl` (one full trajectory per task, appended as
episodes finish: an interrupted run resumes where it stopped), `metrics.json`, `table.md`,
`confusion.png` and `usage.json` (tokens per role: the cost of the run).
ICL baselines (`--icl-shots K`): K demonstrations from the env's tuning pool, chosen at random
or by similarity to the task (TF-IDF cosine), the model told it may answer or ask.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from .metrics import markdown_table, summarize
from .types import CLARIFY, Message, Task, Trajectory


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


async def evaluate(env, tasks: Sequence[Task], policy: Any, out_dir: Path, concurrency: int = 64,
                   label: str | None = None, meta: dict | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Run (or resume) an eval; write every artefact; return the metrics dict."""
    from .engine import run_episodes

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
    metrics.update(env=env.name, metric=getattr(env, "metric_name", "score"), label=label or out_dir.name, **(meta or {}))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
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


def plot_vs_n(runs: Sequence[dict[str, Any]], path: Path) -> None:
    """Metric vs number of training conversations (runs carrying `n_train`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted((r["n_train"], r) for r in runs if r.get("n_train") is not None)
    if not pts:
        return
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    for key, name in (("macro_f1", "Macro F1"), ("turn_score", "Turn"), ("trajectory_score", "Traj"),
                      ("post_clarify_score", "Post-Clarify")):
        ax.plot([n for n, _ in pts], [100 * (r.get(key) or 0) for _, r in pts], marker="o", label=name)
    ax.set_xlabel("training conversations")
    ax.set_ylabel("score (x100)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def compare(run_dirs: Sequence[str | Path], plot: Path | None = None) -> str:
    runs = []
    for d in run_dirs:
        p = Path(d) / "metrics.json"
        if not p.exists():
            raise SystemExit(f"{d}: no metrics.json (run `simkit eval ... --out {d}` first)")
        runs.append(json.loads(p.read_text()))
    metric = runs[0].get("metric", "score") if len({r.get("metric") for r in runs}) == 1 else "score"
    if plot is not None:
        plot_vs_n(runs, plot)
    return markdown_table([(r.get("label", str(d)), r) for r, d in zip(runs, run_dirs)], metric)


# --------------------------------------------------------------------------- CLI
def register_cli(sub: argparse._SubParsersAction) -> None:
    from .roles import add_role_args

    p = sub.add_parser(
        "eval", help="score a model on an environment with the paper's metrics",
        description="Run every evaluation task through the env (policy, simulator, classifier) and report "
                    "action-level (accuracy, macro F1, CLARIFY precision/recall, confusion matrix) and "
                    "content-level (turn, trajectory, post-clarify) scores with the task's own metric. "
                    "Writes OUT/episodes.jsonl, metrics.json, table.md, confusion.png, usage.json. Resumable.")
    p.add_argument("--env", required=True, help="environment name (see `simkit envs`)")
    p.add_argument("--split", help="evaluation split (default: the env's last split)")
    p.add_argument("--out", required=True, help="run directory (resumes if it holds episodes)")
    p.add_argument("--limit", type=int, help="evaluate only N tasks (the same N for the same --seed)")
    p.add_argument("--seed", type=int, default=0, help="task order seed (default 0)")
    p.add_argument("--concurrency", type=int, default=64, help="episodes in flight (default 64)")
    p.add_argument("--icl-shots", type=int, default=0, help="K in-context examples from the tuning pool (default 0)")
    p.add_argument("--icl-select", choices=["random", "similar"], default="random",
                   help="how shots are chosen: random (seeded) or most similar to the task (TF-IDF)")
    p.add_argument("--icl-pool", help="split to draw shots from (default: the env's first split)")
    p.add_argument("--label", help="row label in tables (default: the run directory name)")
    p.add_argument("--n-train", type=int, help="training conversations behind this model (for the vs-n plot)")
    p.add_argument("--data-dir", help="task data folder (default $SIMKIT_DATA_DIR)")
    add_role_args(p)
    p.set_defaults(func=_run_eval)

    c = sub.add_parser("compare", help="print several eval runs side by side",
                       description="Print the metrics of several `simkit eval` runs as one markdown table in the "
                                   "paper's layout; --plot draws metric vs training conversations (--n-train).")
    c.add_argument("runs", nargs="+", help="run directories written by `simkit eval`")
    c.add_argument("--plot", help="write a PNG of metrics vs number of training conversations")
    c.set_defaults(func=lambda a: print(compare(a.runs, Path(a.plot) if a.plot else None)) or 0)


def _run_eval(args: argparse.Namespace) -> int:
    return asyncio.run(_eval_main(args))


async def _eval_main(args: argparse.Namespace) -> int:
    from .env import make
    from .roles import build_roles

    env_kw = {"data_dir": args.data_dir} if args.data_dir else {}
    probe = make(args.env, **env_kw)
    roles = build_roles(args, probe.name)
    env = make(args.env, classifier=roles.classifier, simulator=roles.simulator, **env_kw)
    splits = list(env.splits())
    split = args.split or splits[-1]
    tasks = task_order(env.tasks(split), args.seed, args.limit)
    policy: Any = roles.policy
    if args.icl_shots:
        pool_split = args.icl_pool or splits[0]
        if pool_split == split:
            print(f"warning: ICL shots drawn from the evaluation split {split!r}", flush=True)
        policy = ICLPolicy(policy, ShotSelector(env.tasks(pool_split), args.icl_shots, args.icl_select, args.seed))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({k: v for k, v in vars(args).items() if k != "func"}, indent=2))
    try:
        metrics = await evaluate(env, tasks, policy, out, args.concurrency, args.label,
                                 {"split": split, "n_train": args.n_train, "icl_shots": args.icl_shots,
                                  "model": roles.policy.model or roles.policy.client.model})
    finally:
        usage = {c.role: c.stats.as_dict() for c in roles.clients}
        (out / "usage.json").write_text(json.dumps(usage, indent=2))
        await roles.aclose()
    print(markdown_table([(metrics["label"], metrics)], metrics["metric"]))
    tokens = sum(u["prompt_tokens"] + u["completion_tokens"] for u in usage.values())
    print(f"\nartefacts in {out}/ (episodes.jsonl, metrics.json, table.md, confusion.png); "
          f"tokens used this run: {tokens:,}")
    return 0
