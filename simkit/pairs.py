"""`simkit pairs build`: ACT Phase 1 — write D_pref (TRL-ready JSONL, and/or into the queue).

Each line is a `PreferencePair`: TRL's conversational `prompt`/`chosen`/`rejected` columns plus
metadata (gold and rejected action, policy version, adapter, provenance). Resumable: tasks whose
pair is already in the output file are skipped.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .types import PreferencePair


@dataclass
class Phase1Result:
    pair: PreferencePair | None
    task_id: str
    error: str | None = None

    @property
    def status(self) -> str:
        return "failed" if self.pair is None else "ok"


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


async def build_pairs(env, tasks, policy, out: Path | None = None, queue=None, annotator=None,
                      random_actions: bool = False, seed: int = 0, concurrency: int = 64,
                      progress: bool | None = None) -> tuple[list[PreferencePair], int]:
    """Run Phase 1 over `tasks`; return (pairs, failures). Appends to `out` as pairs finish."""
    from .act import phase1_pair
    from .engine import run_episodes

    done = {p.task_id for p in read_pairs(out)} if out and out.exists() else set()
    todo = [t for t in tasks if t.id not in done]

    async def one(env, task, policy) -> Phase1Result:
        from .client import RoleError

        rng = random.Random(f"{seed}-{task.id}") if random_actions else None
        try:
            return Phase1Result(await phase1_pair(env, task, policy, annotator=annotator, rng=rng), task.id)
        except RoleError as e:
            return Phase1Result(None, task.id, str(e))

    pairs, failures = [], 0
    fh = open(out, "a", encoding="utf-8") if out else None
    try:
        async for r in run_episodes(env, todo, policy, concurrency=concurrency, episode_fn=one, progress=progress):
            if r.pair is None:
                failures += 1
                continue
            pairs.append(r.pair)
            if fh:
                fh.write(r.pair.model_dump_json() + "\n")
                fh.flush()
            if queue is not None:
                await queue.append([r.pair])
    finally:
        if fh:
            fh.close()
    return pairs, failures


def register_cli(sub: argparse._SubParsersAction) -> None:
    from .roles import add_role_args

    p = sub.add_parser("pairs", help="ACT Phase 1: build contrastive action pairs (D_pref)",
                       description="Preference-pair datasets for ACT.")
    psub = p.add_subparsers(dest="pairs_command", metavar="SUBCOMMAND", required=True)
    b = psub.add_parser(
        "build", help="write D_pref: reference vs the policy forced to take the other action",
        description="ACT Phase 1 (Algorithm 1): for each task the gold action (data, or --pseudo-label), the "
                    "rejected action, winning response = reference, losing response = the policy forced to take "
                    "the rejected action. Writes TRL-ready JSONL (conversational prompt/chosen/rejected + "
                    "metadata); resumable (tasks already in --out are skipped).")
    b.add_argument("--env", required=True, help="environment name (see `simkit envs`)")
    b.add_argument("--split", default=None, help="task split (default: the env's first split)")
    b.add_argument("--out", required=True, help="output JSONL path (appended to; resumable)")
    b.add_argument("--queue", help="also append the pairs to this queue (SQLite path)")
    b.add_argument("--limit", type=int, help="use only the first N tasks")
    b.add_argument("--pseudo-label", action="store_true",
                   help="label gold actions with the LLM classifier (--classifier URL) instead of the data")
    b.add_argument("--random-actions", action="store_true", help="ablation: random gold actions")
    b.add_argument("--concurrency", type=int, default=64, help="episodes in flight (default 64)")
    b.add_argument("--seed", type=int, default=0, help="seed for task order and ablations")
    b.add_argument("--data-dir", help="task data folder (default $SIMKIT_DATA_DIR)")
    add_role_args(b)
    b.set_defaults(func=_run_build)


def _run_build(args: argparse.Namespace) -> int:
    return asyncio.run(_build_main(args))


async def _build_main(args: argparse.Namespace) -> int:
    from .env import make
    from .roles import build_roles

    env = make(args.env, **({"data_dir": args.data_dir} if args.data_dir else {}))
    split = args.split or next(iter(env.splits()))
    tasks = env.tasks(split)[: args.limit] if args.limit else env.tasks(split)
    roles = build_roles(args, env.name)
    if args.pseudo_label and args.classifier == "rule":
        raise SystemExit("--pseudo-label needs an LLM annotator: pass --classifier URL")
    queue = None
    if args.queue:
        from .queue import AsyncPairQueue, open_queue

        queue = AsyncPairQueue(open_queue(args.queue))
    try:
        pairs, failures = await build_pairs(
            env, tasks, roles.policy, Path(args.out), queue, roles.classifier if args.pseudo_label else None,
            args.random_actions, args.seed, args.concurrency)
    finally:
        await roles.aclose()
        if queue is not None:
            await queue.close()
    summary: dict[str, Any] = {"env": env.name, "split": split, "tasks": len(tasks), "new_pairs": len(pairs),
                               "failures": failures, "out": args.out}
    print(json.dumps(summary))
    return 1 if failures and not pairs else 0
