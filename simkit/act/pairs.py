"""`simkit pairs build`: ACT Phase 1 — write D_pref (TRL-ready JSONL, and/or into the queue);
`simkit pairs stats`: the action-vs-content mix of a pair stream (`simkit.act.pairstats`).

Each line is a `PreferencePair`: TRL's conversational `prompt`/`chosen`/`rejected` columns plus
metadata (gold and rejected action, policy version, adapter, provenance, how the forced loser was
obtained, provenance of each side). Beside OUT: `OUT.stats.json` (forced-ok / retried-ok / fallback /
generator-ok / generator-fallback / reference-loser / identical-dropped / random-flip / turn-1 / contrast
counts, dropped task ids) and `OUT.conversations.json` (the conversation sample).
Resumable: tasks whose pair is already in the output file (or was dropped) are skipped.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from simkit.act.pairstats import read_pairs
from simkit.engine import DEFAULT_CONCURRENCY
from simkit.roles.build import RolesConfig
from simkit.roles.client import RoleError
from simkit.sampling import conversations_help
from simkit.types import PreferencePair

log = logging.getLogger(__name__)


@dataclass
class Phase1Result:
    pair: list[PreferencePair] | None  # the task's pairs (turn 0, and turn 1 when made); None: failed
    task_id: str
    error: str | None = None

    @property
    def status(self) -> str:
        return "failed" if self.pair is None else "ok"


def new_phase1_stats() -> dict[str, int]:
    """Counters of a Phase 1 build: how each loser was obtained (forced-ok / retried-ok / fallback
    when forced; generator-ok / generator-fallback when generated; the gold answer as a reference
    loser), what was dropped, and the pair mix (action vs content contrast, turn-1 pairs)."""
    return {"forced_ok": 0, "retried_ok": 0, "fallback": 0, "identical_dropped": 0, "random_flips": 0,
            "generator_ok": 0, "generator_fallback": 0, "reference_loser": 0, "turn1_pairs": 0,
            "contrast_action": 0, "contrast_content": 0}


def _count(d: dict[str, int], p: PreferencePair) -> None:
    """Add one new pair's loser path to the counters `d`."""
    if p.meta.get("forced_path"):
        key = p.meta["forced_path"].replace("-", "_")
    elif p.meta.get("generator_path"):
        key = "generator_ok" if p.meta["generator_path"] == "generator-ok" else "generator_fallback"
    else:
        key = "reference_loser"
    d[key] = d.get(key, 0) + 1
    d["random_flips"] += p.source == "random-flip"


def _count_kept(d: dict[str, int], p: PreferencePair) -> None:
    d["turn1_pairs"] = d.get("turn1_pairs", 0) + (p.turn == 1)
    if p.kind in ("action", "content"):
        d[f"contrast_{p.kind}"] = d.get(f"contrast_{p.kind}", 0) + 1


def stats_path(out: Path) -> Path:
    """Where a pairs file keeps its Phase 1 counters and dropped task ids (survives resumes)."""
    return out.with_name(out.stem + ".stats.json")


def base_task_id(p: PreferencePair) -> str:
    """The task a pair was built from (a turn-1 pair's task is derived from it)."""
    return str(p.meta.get("base_task_id") or p.task_id)


class Phase1Log:
    """A pairs file's Phase 1 record beside it (`stats_path`): the counters and the dropped task ids,
    so a resume neither redoes nor forgets them. `stats` also takes the caller's counters."""

    def __init__(self, out: Path | None, stats: dict[str, int]):
        self.path, self.stats = (stats_path(out) if out else None), stats
        saved: dict[str, Any] = json.loads(self.path.read_text()) if self.path and self.path.exists() else {}
        for k, v in saved.get("counts", {}).items():
            stats[k] = stats.get(k, 0) + v
        self.dropped_ids: list[str] = list(saved.get("dropped_task_ids", []))
        self.counts = {k: saved.get("counts", {}).get(k, 0) for k in new_phase1_stats()}
        self.done = ({base_task_id(p) for p in read_pairs(out)} if out and out.exists() else set()) | set(self.dropped_ids)

    def keep(self, task_id: str, pairs: list[PreferencePair]) -> list[PreferencePair]:
        """Count a task's pairs; the ones worth training on (identical sides dropped)."""
        from simkit.act.contrast import identical_sides

        kept = []
        for p in pairs:
            for d in (self.stats, self.counts):
                _count(d, p)
            if identical_sides(p):
                for d in (self.stats, self.counts):
                    d["identical_dropped"] += 1
                continue
            for d in (self.stats, self.counts):
                _count_kept(d, p)
            kept.append(p)
        if not kept:
            self.dropped_ids.append(task_id)
        return kept

    def save(self) -> None:
        if self.path:
            self.path.write_text(json.dumps({"counts": self.counts, "dropped_task_ids": self.dropped_ids}, indent=1))


async def build_pairs(env, tasks, policy, out: Path | None = None, queue=None, annotator=None,
                      random_actions: bool = False, seed: int = 0, concurrency: int = DEFAULT_CONCURRENCY,
                      progress: bool | None = None, classifier=None,
                      stats: dict[str, int] | None = None, contrast: str = "authors", generator=None,
                      per_conversation: str | None = None) -> tuple[list[PreferencePair], int]:
    """Run Phase 1 over `tasks`; return (pairs, failures). Appends to `out` as pairs finish.

    `contrast` / `generator` / `per_conversation`: see `simkit.act.contrast` (the generator defaults to the
    policy itself, with shots from `tasks`). `stats` (see `new_phase1_stats`) is updated in place.
    With `out`, the counters and the dropped task ids are kept in `stats_path(out)` (`Phase1Log`).
    A task's pairs (both turns) are written together, so a resume redoes a task or skips it whole."""
    from simkit.act.contrast import TurnIndex, phase1_pairs
    from simkit.engine import amap, progress_bar
    from simkit.roles.agents import LoserGenerator

    tasks = list(tasks)
    record = Phase1Log(out, stats if stats is not None else new_phase1_stats())
    todo = [t for t in tasks if t.id not in record.done]
    if contrast == "authors" and generator is None:
        generator = LoserGenerator(policy, tasks, env=env.name, seed=seed)
    index = TurnIndex.of(tasks)

    async def one(task) -> Phase1Result:
        rng = random.Random(f"{seed}-{task.id}") if random_actions else None
        return Phase1Result(await phase1_pairs(env, task, policy, annotator=annotator, rng=rng,
                                               classifier=classifier, contrast=contrast, generator=generator,
                                               per_conversation=per_conversation, index=index), task.id)

    def failed(task, e: Exception) -> Phase1Result:  # a role gave up or an env hook raised: counted
        return Phase1Result(None, task.id, str(e) if isinstance(e, RoleError) else f"{type(e).__name__}: {e}")

    pairs, failures = [], 0
    fh = open(out, "a", encoding="utf-8") if out else None
    bar = progress_bar(len(todo), progress, unit="task", desc="phase 1")
    try:
        async for r in amap(one, todo, concurrency=concurrency, on_error=failed):
            if bar is not None:
                bar.update(1)
            if r.pair is None:
                failures += 1
                if failures <= 3:  # say why, not only how many
                    log.warning("phase 1 failed on %s: %s", r.task_id, r.error)
                continue
            kept = record.keep(r.task_id, r.pair)
            pairs.extend(kept)
            if kept and fh:
                fh.write("".join(p.model_dump_json() + "\n" for p in kept))
                fh.flush()
            record.save()
            if kept and queue is not None:
                await queue.append(kept)
    finally:
        if bar is not None:
            bar.close()
        if fh:
            fh.close()
        record.save()
    return pairs, failures


class Phase1Options(BaseModel):
    """Phase 1 losers (the same fields as `simkit serve`'s)."""

    model_config = ConfigDict(extra="forbid")

    contrast: Literal["authors", "forced"] = Field(
        "authors", description="loser of each turn: authors (the authors' code: a CLARIFY turn's loser is the gold "
                               "answer, an ANSWER turn's a question from the few-shot --loser-generator) or forced "
                               "(the policy forced to take the other action, checked, retried, then the fallback)")
    pairs_per_conversation: Literal["turn", "one"] | None = Field(
        None, description="turn: one pair per user turn (a gold-CLARIFY task also gives the turn after the "
                          "clarification); one: a pair per task. Default: turn under --contrast authors, else one")
    loser_generator: str | None = Field(
        None, json_schema_extra={"metavar": "URL"},
        description="OpenAI-compatible URL of the model that writes the clarifying-question losers (10 shots, "
                    "temperature 0.1, 64 tokens, cut at the first '?'; default: the policy's own server)")
    loser_generator_model: str | None = Field(None, description="model name at --loser-generator "
                                                                 "(default: the server's first model)")


class PairsBuildConfig(Phase1Options):
    """`simkit pairs build`: D_pref for one env split."""

    env: str = Field(..., description="environment name (see `simkit envs`)")
    out: Path = Field(..., description="output JSONL path (appended to; resumable)")
    split: str | None = Field(None, description="task split (default: the env's first split)")
    queue: str | None = Field(None, description="also append the pairs to this queue: a SQLite path or "
                                                "redis://host:6379/0?stream=act")
    n_conversations: int | None = Field(None, ge=1, json_schema_extra={"flags": ["--n-conversations", "--n"],
                                                                        "metavar": "N"},
                                        description=conversations_help())
    pseudo_label: bool = Field(False, description="label gold actions with the LLM classifier (--classifier URL) "
                                                  "instead of the data")
    random_actions: bool = Field(False, description="ablation: a random label replaces the gold action; where it "
                                                    "differs from the reference's action the policy forced to take "
                                                    "the random action wins over the reference")
    concurrency: int = Field(DEFAULT_CONCURRENCY, ge=1, description="episodes in flight")
    seed: int = Field(0, description="seed of the conversation sample and of the random-actions labels")
    data_dir: str | None = Field(None, description="task data folder (default $SIMKIT_DATA_DIR)")
    roles: RolesConfig = Field(default_factory=RolesConfig)


class PairsStatsConfig(BaseModel):
    """`simkit pairs stats`: what a pair stream contrasts."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(..., json_schema_extra={"positional": True, "metavar": "PATH|QUEUE"},
                        description="pairs JSONL, SQLite queue path (or sqlite:///path)")
    train_run: str | None = Field(None, json_schema_extra={"metavar": "DIR"},
                                  description="a `trainer run` directory: margins by contrast kind")
    as_json: bool = Field(False, json_schema_extra={"flags": ["--json"]},
                          description="print the tables as one JSON object")


def register_cli(sub: argparse._SubParsersAction) -> None:
    from simkit.config import add_config_args

    p = sub.add_parser("pairs", help="ACT Phase 1: build contrastive action pairs (D_pref)",
                       description="Preference-pair datasets for ACT.")
    psub = p.add_subparsers(dest="pairs_command", metavar="SUBCOMMAND", required=True)
    b = psub.add_parser(
        "build", help="write D_pref: reference vs a response taking the other action",
        description="ACT Phase 1 (Algorithm 1): for each task the gold action (data, or --pseudo-label), the "
                    "rejected action, winning response = the reference (for a CLARIFY turn the whole gold "
                    "continuation: clarifying question, the user's clarification, the gold answer), losing "
                    "response = a response taking the rejected action. --contrast authors (default, the authors' "
                    "code): a CLARIFY turn loses to the gold answer, an ANSWER turn to a question of the few-shot "
                    "--loser-generator, and the turn after each clarification gets a pair of its own. --contrast "
                    "forced: the policy forced to take the rejected action. Each forced reply is checked by the "
                    "classifier in use; a reply that takes the wrong action is retried once with a stronger "
                    "few-shot instruction, then replaced by the authors' fallback (forced ANSWER -> the gold "
                    "answer; forced CLARIFY -> the reply cut at its first '?', else a template question). Pairs "
                    "whose two sides are identical are dropped. Writes TRL-ready JSONL (conversational "
                    "prompt/chosen/rejected + metadata), OUT's .stats.json (forced-ok / retried-ok / fallback / "
                    "identical-dropped counts) and .conversations.json (the conversations used); resumable "
                    "(tasks already in --out are skipped).")
    add_config_args(b, PairsBuildConfig)
    b.set_defaults(func=_run_build)

    st = psub.add_parser(
        "stats", help="the pair mix: action vs content contrast per gold action, sources, phases",
        description="Read pairs (a pairs JSONL such as D_pref or serve's RUN_DIR/queued.jsonl, or a SQLite queue: "
                    "its live, not yet acked pairs) and print how many contrast the action (ask vs answer) and how "
                    "many only the content, per gold action, per source pair (chosen_source -> rejected_source), "
                    "per phase and turn. --train-run DIR adds the DPO reward margins split by kind.")
    add_config_args(st, PairsStatsConfig, config_flag=False)
    st.set_defaults(func=_run_stats)


async def open_act_run(command: str, env_name: str, env_kw: dict[str, Any], roles_cfg: Any, *,
                       pseudo_label: bool, split: str | None, n: int | None, seed: int) -> tuple[Any, Any, Any]:
    """The set-up `pairs build` and `serve` share: roles, the env wired to them, and the recorded
    n-conversation sample. Returns (env, roles, sample); a bad request closes the roles and exits
    with a message naming `command`."""
    from simkit.env import make
    from simkit.roles.build import build_roles
    from simkit.sampling import TooFewConversations, sample_conversations

    roles = build_roles(roles_cfg, make(env_name, **env_kw).name)
    if pseudo_label and roles_cfg.classifier.offline:
        await roles.aclose()
        raise SystemExit(f"{command}: --pseudo-label needs an LLM annotator: pass --classifier URL")
    # the env's own data seed stays the default: the same tasks as `trainer sft`, `pairs build`, `eval`
    env = make(env_name, classifier=roles.classifier, simulator=roles.simulator, **env_kw)
    split = split or next(iter(env.splits()))
    try:
        sample = sample_conversations(env.tasks(split), n, seed, env=env.name, split=split)
    except TooFewConversations as e:
        await roles.aclose()
        raise SystemExit(f"{command}: {e}")
    return env, roles, sample


def _run_build(args: argparse.Namespace) -> int:
    from simkit.config import config_or_exit

    cfg = config_or_exit(PairsBuildConfig, args, "pairs build")
    if not cfg.roles.policy.url:
        raise SystemExit("simkit pairs build: the policy needs a URL (--policy URL)")
    return asyncio.run(build_main(cfg))


async def build_main(cfg: PairsBuildConfig) -> int:
    from simkit.roles.agents import describe
    from simkit.roles.build import build_loser_generator

    env_kw = {"data_dir": cfg.data_dir} if cfg.data_dir else {}
    env, roles, sample = await open_act_run("simkit pairs build", cfg.env, env_kw, cfg.roles,
                                            pseudo_label=cfg.pseudo_label, split=cfg.split,
                                            n=cfg.n_conversations, seed=cfg.seed)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    sample.write(cfg.out.with_name(cfg.out.stem + ".conversations.json"))
    stats = new_phase1_stats()
    queue = None
    if cfg.queue:
        from simkit.queue import AsyncPairQueue, open_queue

        queue = AsyncPairQueue(open_queue(cfg.queue))
    generator = build_loser_generator(roles, cfg.roles, cfg.loser_generator, cfg.loser_generator_model,
                                      sample.tasks, env.name, cfg.seed)
    try:
        pairs, failures = await build_pairs(
            env, sample.tasks, roles.policy, cfg.out, queue, roles.classifier if cfg.pseudo_label else None,
            cfg.random_actions, cfg.seed, cfg.concurrency, classifier=roles.classifier, stats=stats,
            contrast=cfg.contrast, generator=generator, per_conversation=cfg.pairs_per_conversation,
            progress=True)  # a bar on a terminal, plain lines in a log
    finally:
        await roles.aclose()
        if queue is not None:
            await queue.close()
    print(json.dumps({"env": env.name, "split": sample.split, "conversations": len(sample.conversation_ids),
                      "tasks": len(sample.tasks), "new_pairs": len(pairs), "failures": failures, "phase1": stats,
                      "classifier": describe(roles.classifier), "contrast": cfg.contrast,
                      "loser_generator": describe(generator), "out": str(cfg.out)}))
    return 1 if failures and not pairs else 0


def _run_stats(args: argparse.Namespace) -> int:
    from simkit.act.pairstats import format_stats, load_pairs, pair_stats
    from simkit.config import config_or_exit

    cfg = config_or_exit(PairsStatsConfig, args, "pairs stats")
    try:
        pairs = load_pairs(cfg.source)
    except (OSError, ValueError) as e:
        raise SystemExit(f"simkit pairs stats: {e}")
    report = pair_stats(pairs)
    if cfg.train_run:
        from simkit.act.pairstats import train_margins

        report["train"] = train_margins(cfg.train_run)
    print(json.dumps(report, indent=1) if cfg.as_json else format_stats(report))
    return 0
