"""`simkit eval` and `simkit eval-classifier`: flags generated from `EvalConfig` and
`ClassifierCheckConfig` (simkit.config), so a YAML file and the flags say the same things.

Task count: `--n-tasks N` is the one flag, with one meaning: a seeded random N tasks (turns) of the
split, or the first N of `--tasks-file`. Decoding: greedy with at most 128 new tokens (the
authors'), the defaults of `EvalPolicyRole`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from simkit.engine import DEFAULT_CONCURRENCY
from simkit.roles.build import PolicyRole, RolesConfig

EVAL_TEMPERATURE, EVAL_MAX_TOKENS = 0.0, 128  # the authors' evaluation decoding

N_TASKS_HELP = ("evaluate N tasks (turns): a seeded random subset of the split (the same N for the same --seed), "
                "or the first N of --tasks-file")


class EvalPolicyRole(PolicyRole):
    """Policy role (the model being evaluated)."""

    temperature: float = Field(EVAL_TEMPERATURE, ge=0, json_schema_extra={"flags": ["--temperature"]},
                               description="policy sampling temperature (0: greedy, as the authors evaluate)")
    max_tokens: int = Field(EVAL_MAX_TOKENS, ge=1, json_schema_extra={"flags": ["--max-tokens"]},
                            description="policy max new tokens (as the authors evaluate)")


class EvalRoles(RolesConfig):
    """The three roles; the policy decodes greedily by default."""

    policy: EvalPolicyRole = Field(default_factory=EvalPolicyRole)


class IclSettings(BaseModel):
    """In-context baseline (K shots from the tuning pool)."""

    model_config = ConfigDict(extra="forbid")

    shots: int = Field(0, ge=0, json_schema_extra={"flags": ["--icl-shots"]},
                       description="K in-context examples from the tuning pool")
    select: Literal["random", "similar"] = Field(
        "random", json_schema_extra={"flags": ["--icl-select"]},
        description="how shots are chosen: random (seeded) or most similar to the task (TF-IDF)")
    pool: str | None = Field(None, json_schema_extra={"flags": ["--icl-pool"]},
                             description="split to draw shots from (default: the env's first split)")


class EvalConfig(BaseModel):
    """`simkit eval`: one run directory of episodes, metrics and per-task rows."""

    model_config = ConfigDict(extra="forbid")

    env: str = Field(..., description="environment name (see `simkit envs`)")
    out: Path = Field(..., description="run directory (resumes if it holds episodes)")
    split: str | None = Field(None, description="evaluation split (default: the env's last split)")
    n_tasks: int | None = Field(None, ge=1, json_schema_extra={"metavar": "N"}, description=N_TASKS_HELP + " (default: all)")
    seed: int = Field(0, description="task order seed")
    tasks_file: Path | None = Field(
        None, json_schema_extra={"metavar": "FILE"},
        description="evaluate exactly the task ids of this JSON file ({\"task_ids\": [...]}, order kept; unknown ids "
                    "are an error), e.g. the sealed bench/results/sealed_test_ambigsql.json")
    test_log: str | None = Field(
        None, json_schema_extra={"metavar": "PATH"},
        description="project log of test-split evaluations, one JSON line per eval on a split named 'test' "
                    "(default $SIMKIT_TEST_LOG; OUT/test_evals.jsonl is always written)")
    exclude_conversations: list[str] = Field(
        default_factory=list, json_schema_extra={"metavar": "FILE"},
        description="leave out the conversations listed in these conversations.json files (a training run's "
                    "record): evaluate on a dev split carved from the training pool, never on what was trained")
    clarify_rounds: int | None = Field(
        None, ge=0, description="simulated clarification rounds before an episode must end (default 1, as the authors)")
    classifier_check: bool = Field(
        True, description="measure the classifier on the reference responses (one classifier call per task with "
                          "an LLM classifier; free with the rule classifier)")
    concurrency: int = Field(DEFAULT_CONCURRENCY, ge=1, description="episodes in flight")
    icl: IclSettings = Field(default_factory=IclSettings)
    label: str | None = Field(None, description="row label in tables (default: the run directory name)")
    n_train: int | None = Field(
        None, ge=0, description="training conversations (dialogues, not turns) behind this model, for tables and the "
                                "vs-n plot (default: read from --train-conversations)")
    train_conversations: Path | None = Field(
        None, json_schema_extra={"metavar": "FILE"},
        description="conversations.json written by the training run (`trainer sft`, `serve`, `pairs build`): its "
                    "count becomes --n-train and its ids are recorded in metrics.json")
    data_dir: str | None = Field(None, description="task data folder (default $SIMKIT_DATA_DIR)")
    exec_match: Literal["official", "strict"] | None = Field(
        None, description="ambigsql only: official (default) = Spider's test-suite evaluator exactly; strict = "
                          "DISTINCT and every statement count, order only for a top-level ORDER BY")
    roles: EvalRoles = Field(default_factory=EvalRoles)


class ClassifierCheckConfig(BaseModel):
    """`simkit eval-classifier`: the classifier alone, against gold labels on reference responses."""

    model_config = ConfigDict(extra="forbid")

    env: str = Field(..., description="environment name (see `simkit envs`)")
    split: list[str] = Field(default_factory=list, description="split(s) to measure (default: every split)")
    n_tasks: int | None = Field(None, ge=1, json_schema_extra={"metavar": "N"},
                                description=N_TASKS_HELP + ", per split (default: all)")
    seed: int = Field(0, description="task order seed")
    classifier: str = Field("rule", json_schema_extra={"metavar": "rule|URL"},
                            description="'rule' (offline heuristics) or an OpenAI-compatible URL (few-shot Yes/No)")
    classifier_model: str | None = Field(None, description="classifier model name (default: the server's first model)")
    concurrency: int = Field(DEFAULT_CONCURRENCY, ge=1, description="classifier calls in flight")
    out: Path | None = Field(None, description="also write the report as JSON here")
    data_dir: str | None = Field(None, description="task data folder (default $SIMKIT_DATA_DIR)")


EVAL_DESCRIPTION = (
    "Run every evaluation task through the env (policy, simulator, classifier) and report action-level "
    "(accuracy, macro F1, CLARIFY precision/recall, confusion matrix) and content-level scores with the task's "
    "own metric: Turn (first response vs the reference winner: for a CLARIFY turn the gold continuation question "
    "+ user's reply + answer, as the authors), Turn (question only), Traj, Post-Clarify (gold CLARIFY) and "
    "Post-Clarify (asked). Decoding is greedy with at most 128 new tokens unless --temperature / --max-tokens say "
    "otherwise. Every table and metrics.json names the simulator and classifier used, with the classifier's "
    "CLARIFY precision/recall on the evaluated reference responses. Writes OUT/episodes.jsonl, per_task.jsonl, "
    "metrics.json, table.md, confusion.png, usage.json, classifier_check.json. Resumable.")


def register_cli(sub: argparse._SubParsersAction) -> None:
    from simkit.config import add_config_args

    p = sub.add_parser("eval", help="score a model on an environment with the paper's metrics",
                       description=EVAL_DESCRIPTION)
    add_config_args(p, EvalConfig)
    p.set_defaults(func=_run_eval)
    k = sub.add_parser(
        "eval-classifier", help="measure the action classifier against gold labels on reference responses",
        description="Classify every task's reference response (the clarifying question of a CLARIFY turn, the "
                    "answer of an ANSWER turn) with the classifier in use and report accuracy, CLARIFY precision / "
                    "recall / F1 and the confusion matrix per split. `simkit eval` reports the same numbers for "
                    "its tasks next to the action metrics.")
    add_config_args(k, ClassifierCheckConfig)
    k.set_defaults(func=_run_eval_classifier)


def _config(cls: type[BaseModel], args: argparse.Namespace) -> Any:
    from simkit.config import config_or_exit

    return config_or_exit(cls, args, args.command)


def _run_eval(args: argparse.Namespace) -> int:
    cfg = _config(EvalConfig, args)
    if not cfg.roles.policy.url:
        raise SystemExit("simkit eval: the policy needs a URL (--policy URL)")
    return asyncio.run(eval_main(cfg))


def _run_eval_classifier(args: argparse.Namespace) -> int:
    return asyncio.run(eval_classifier_main(_config(ClassifierCheckConfig, args)))


# --------------------------------------------------------------------------- eval-classifier
def _classifier(cfg: ClassifierCheckConfig, env_name: str) -> tuple[Any, Any]:
    """(classifier, its client or None)."""
    if cfg.classifier == "rule":
        from simkit.roles.agents import RuleClassifier

        return RuleClassifier(), None
    from simkit.roles.agents import LLMClassifier
    from simkit.roles.client import RoleClient, RoleConfig

    client = RoleClient("classifier", RoleConfig(base_urls=[u.strip() for u in cfg.classifier.split(",")],
                                                  model=cfg.classifier_model))
    return LLMClassifier(client, env=env_name), client


def _classifier_table(report: dict[str, Any]) -> str:
    pct = lambda x: "—" if x is None else f"{100 * x:.1f}"  # noqa: E731
    lines = [f"| {report['env']} split | classifier | n | Acc | CLARIFY P | CLARIFY R | CLARIFY F1 | "
             "confusion [[CC, CA], [AC, AA]] |", "|---|---|---|---|---|---|---|---|"]
    for split, r in report.items():
        if split != "env":
            lines.append(f"| {split} | {r['classifier']} | {r['n']} | {pct(r['accuracy'])} | "
                         f"{pct(r['clarify_precision'])} | {pct(r['clarify_recall'])} | {pct(r['clarify_f1'])} | "
                         f"{r['confusion']['matrix']} |")
    return "\n".join(lines)


async def eval_classifier_main(cfg: ClassifierCheckConfig) -> int:
    from simkit.env import make
    from simkit.evaluation.evaluate import classifier_check, task_order

    env = make(cfg.env, **({"data_dir": cfg.data_dir} if cfg.data_dir else {}))
    clf, client = _classifier(cfg, env.name)
    report: dict[str, Any] = {"env": env.name}
    try:
        for split in cfg.split or list(env.splits()):
            tasks = task_order(env.tasks(split), cfg.seed, cfg.n_tasks)
            report[split] = await classifier_check(clf, tasks, cfg.concurrency)
    finally:
        if client is not None:
            await client.aclose()
    print(_classifier_table(report))
    if cfg.out:
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        cfg.out.write_text(json.dumps(report, indent=1))
    return 0


# --------------------------------------------------------------------------- eval
def _env_kw(cfg: EvalConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {"data_dir": cfg.data_dir} if cfg.data_dir else {}
    if cfg.clarify_rounds is not None:
        kw["clarify_rounds"] = cfg.clarify_rounds
    if cfg.exec_match is not None:
        kw["exec_match"] = cfg.exec_match
    return kw


def _split_of(cfg: EvalConfig, splits: list[str]) -> str:
    """The evaluation split: --split, else the tasks file's, else the env's last."""
    file_split = None
    if cfg.tasks_file:
        try:
            file_split = json.loads(cfg.tasks_file.read_text()).get("split")
        except (OSError, ValueError, AttributeError) as e:
            raise SystemExit(f"--tasks-file {cfg.tasks_file}: not readable JSON ({e})")
    split = cfg.split or file_split or splits[-1]
    if cfg.tasks_file and file_split and file_split != split:
        raise SystemExit(f"--tasks-file {cfg.tasks_file} lists {file_split!r} tasks, not {split!r}")
    return split


def select_tasks(cfg: EvalConfig, env: Any, split: str) -> tuple[list[Any], int]:
    """(the tasks to evaluate, how many conversations --exclude-conversations left out)."""
    from simkit.evaluation.evaluate import load_tasks_file, task_order

    excluded = {cid for f in cfg.exclude_conversations for cid in json.loads(Path(f).read_text())["conversation_ids"]}
    pool = [t for t in env.tasks(split) if t.conversation_id not in excluded]
    if cfg.tasks_file:
        return load_tasks_file(cfg.tasks_file, pool)[: cfg.n_tasks or None], len(excluded)
    return task_order(pool, cfg.seed, cfg.n_tasks), len(excluded)


def _policy(cfg: EvalConfig, env: Any, roles: Any, split: str) -> Any:
    """The policy, wrapped with K in-context shots when --icl-shots asks."""
    if not cfg.icl.shots:
        return roles.policy
    from simkit.evaluation.icl import ICLPolicy, ShotSelector

    pool_split = cfg.icl.pool or list(env.splits())[0]
    if pool_split == split:
        print(f"warning: ICL shots drawn from the evaluation split {split!r}", flush=True)
    return ICLPolicy(roles.policy, ShotSelector(env.tasks(pool_split), cfg.icl.shots, cfg.icl.select, cfg.seed))


def _run_meta(cfg: EvalConfig, env: Any, roles: Any, split: str, n_excluded: int) -> dict[str, Any]:
    """What metrics.json and per_task.jsonl record about this run."""
    n_train, train_ids = cfg.n_train, None
    if cfg.train_conversations:
        train_ids = json.loads(cfg.train_conversations.read_text()).get("conversation_ids")
        if n_train is None and train_ids is not None:
            n_train = len(train_ids)
    meta = {"split": split, "n_train": n_train, "icl_shots": cfg.icl.shots, "command": shlex.join(sys.argv),
            "model": roles.policy.model or roles.policy.client.model,
            "decoding": {"temperature": cfg.roles.policy.temperature, "max_tokens": cfg.roles.policy.max_tokens}}
    if n_excluded:
        meta["excluded_conversations"] = n_excluded
    if getattr(env.config, "exec_match", None):  # which execution match produced the numbers
        meta["exec_match"] = env.config.exec_match
    if train_ids is not None:
        meta["train_conversations"] = {"file": str(cfg.train_conversations), "n": len(train_ids)}
    if cfg.tasks_file:
        meta["tasks_file"] = str(cfg.tasks_file)
    return meta


def _log_test_look(cfg: EvalConfig, env: Any, tasks: list[Any], meta: dict[str, Any]) -> None:
    """Every eval on a split named `test` is logged when the look happens (an interrupted one counts)."""
    from simkit.evaluation.evaluate import log_test_eval
    from simkit.evaluation.results import ids_sha

    entry = {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "label": cfg.label or cfg.out.name,
             "model": meta["model"], "command": meta["command"], "env": env.name, "split": meta["split"],
             "n_tasks": len(tasks), "task_ids_sha256": ids_sha(t.id for t in tasks), "out": str(cfg.out)}
    logged = log_test_eval(entry, cfg.out, cfg.test_log or os.environ.get("SIMKIT_TEST_LOG"))
    print(f"note: test-split evaluation logged ({len(tasks)} tasks) to {', '.join(map(str, logged))}", flush=True)


async def _name_model(roles: Any) -> None:
    """Name the served model in the results (the server's first model when none was given)."""
    if not (roles.policy.model or roles.policy.client.model):
        try:
            await roles.policy.client.resolve_model()
        except Exception:  # noqa: BLE001 - the episodes will report the failure, counted
            pass


async def eval_main(cfg: EvalConfig) -> int:
    from simkit.env import make
    from simkit.evaluation.evaluate import evaluate
    from simkit.roles.build import build_roles

    env_kw = _env_kw(cfg)
    roles = build_roles(cfg.roles, make(cfg.env, **env_kw).name)
    try:
        env = make(cfg.env, classifier=roles.classifier, simulator=roles.simulator, **env_kw)
        split = _split_of(cfg, list(env.splits()))
        tasks, n_excluded = select_tasks(cfg, env, split)
        policy = _policy(cfg, env, roles, split)
        cfg.out.mkdir(parents=True, exist_ok=True)
        (cfg.out / "config.json").write_text(cfg.model_dump_json(indent=2))
        await _name_model(roles)
        meta = _run_meta(cfg, env, roles, split, n_excluded)
        if split == "test":
            _log_test_look(cfg, env, tasks, meta)
        metrics = await evaluate(env, tasks, policy, cfg.out, cfg.concurrency, cfg.label, meta, progress=True,
                                 check_classifier=cfg.classifier_check)  # a bar; plain lines in a log
    finally:
        usage = {c.role: c.stats.as_dict() for c in roles.clients}
        if cfg.out.is_dir():
            (cfg.out / "usage.json").write_text(json.dumps(usage, indent=2))
        await roles.aclose()
    _print_summary(metrics, usage, cfg.out)
    return 0


def _print_summary(metrics: dict[str, Any], usage: dict[str, Any], out: Path) -> None:
    from simkit.evaluation.metrics import classifier_cell, markdown_table

    print(markdown_table([(metrics["label"], metrics)], metrics["metric"]))
    print(f"\nsimulator: {metrics['simulator']}; classifier: {classifier_cell(metrics)}; "
          f"clarification rounds: {metrics.get('clarify_rounds')}")
    tokens = sum(u["prompt_tokens"] + u["completion_tokens"] for u in usage.values())
    print(f"\nartefacts in {out}/ (episodes.jsonl, per_task.jsonl, metrics.json, table.md, confusion.png); "
          f"tokens used this run: {tokens:,}")
