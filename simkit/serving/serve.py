"""`simkit serve`: the ACT data side, non-stop, for any registered environment.

    D_pref (Phase 1, built once, resumable) ──► Phase 2 rollouts with the *current* policy
        ──► scored pairs ──► durable queue ──► `trainer run` ──► new version ──► serve follows

State lives in the run directory (`state.json`: epoch and a low-watermark position, written
after each queue flush) and pair ids are deterministic per (task, epoch), so a restart after
SIGKILL redoes at most the in-flight episodes and the queue drops the duplicates. A failed
episode is retried in-process and then given up on (counted): it never holds the watermark back.
The parts live in `simkit.serving`; this module holds the config, the wiring and the CLI.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from simkit.act.contrast import Rollout, irpo_rollout, phase2_rollout, turn1_task
from simkit.roles.agents import CutFirstNewline, describe
from simkit.engine import failed_trajectory
from simkit.roles.build import RolesConfig
from simkit.sampling import conversations_help
from simkit.serving import PairSink, Slot, StatusReporter, TaskCursor, VersionFollower
from simkit.serving.follower import HealingPolicy
from simkit.serving.status import MIX_KEYS, count_mix
from simkit.types import PreferencePair

ASYNC_MAX_PENDING = 4096


class ServeConfig(BaseModel):
    """Everything `simkit serve` needs; loadable from YAML (`--config`), overridden by flags
    (generated from these fields by `simkit.config`).

    Schedules: the default is asynchronous (rollouts keep flowing while the trainer trains).
    `sync=True` is the paper's quasi-online schedule: bounded pending (`max_pending` defaults to
    `concurrency`), the version re-read before every episode; run `trainer run --sync` (publish
    every step, train only current-version pairs). Staleness is one setting, the trainer's
    `--max-staleness`, enforced when it leases: serve appends every pair it makes."""

    model_config = ConfigDict(extra="forbid")

    env: str = Field(description="environment name (see `simkit envs`)")
    queue: str = Field(description="the queue shared with `trainer run`: a SQLite path (sqlite:///path) or "
                                   "redis://host:6379/0?stream=act")
    split: str | None = Field(None, description="task split (default: the env's first split)")
    run_dir: str = Field("runs/serve", description="run directory: config, state, metrics.jsonl, dpref.jsonl")
    data_dir: str | None = Field(None, description="task data folder (default $SIMKIT_DATA_DIR)")
    n_conversations: int | None = Field(
        None, ge=1, json_schema_extra={"flags": ["--n-conversations", "--n", "--limit"], "metavar": "N"},
        description=conversations_help() + " (--limit is the old name of this option)")
    concurrency: int = Field(64, ge=1, description="episodes in flight")
    max_pending: int | None = Field(
        None, ge=1, description="back-pressure: pause while the queue holds this many unacked pairs (default "
                                f"{ASYNC_MAX_PENDING}; with --sync: --concurrency; set it to the trainer's batch_size "
                                "x grad_accum to waste least)")
    sync: bool = Field(False, description="the paper's schedule: every trainer step trains only on pairs of the "
                                          "latest policy version (bounded pending, version re-read before each "
                                          "episode); pair it with `trainer run --sync`, which trains only "
                                          "current-version pairs. Off: asynchronous (rollouts never wait; the "
                                          "trainer's --max-staleness bounds what it trains)")
    ablation: Literal["none", "random-actions", "no-sampling", "no-simulation"] = Field(
        "none", description="ACT ablations: random-actions (a random label replaces the gold action and, where it "
                            "differs, the forced response for it wins over the reference); no-sampling (Phase 1 "
                            "pairs only: offline DPO); no-simulation (Phase 2 judges by the action only)")
    mode: Literal["act", "irpo"] = Field(
        "act", description="act, or the IRPO baseline: pairs from K samples of the current policy, best success vs "
                           "worst failure by the env's heuristic (train with `trainer run --rpo-alpha`)")
    irpo_samples: int = Field(4, ge=1, description="IRPO: samples per task (at least 2 are drawn)")
    pseudo_label: bool = Field(False, description="Phase 1 gold actions from the LLM classifier (--classifier URL) "
                                                  "labelling each reference, instead of the data's labels (ACT's "
                                                  "pseudo-labelled setting)")
    clarify_rounds: int | None = Field(None, ge=0, description="simulated clarification rounds per episode before it "
                                                               "must end (default: the env's, 1 as the authors)")
    max_episodes: int | None = Field(None, ge=0, description="stop after this many Phase 2 episodes, counted across "
                                                             "restarts (default: never)")
    max_epochs: int | None = Field(None, ge=0, description="stop after this many passes over D_pref (default: never)")
    poll_s: float = Field(1.0, gt=0, description="how often to check for a new policy version")
    flush_s: float = Field(0.25, gt=0, description="how often finished pairs are appended to the queue")
    seed: int = Field(0, description="seed of the conversation sample (the same as `trainer sft --seed`), task "
                                     "order and random-actions labels")
    save_trajectories: bool = Field(False, description="also write every trajectory to RUN_DIR/trajectories.jsonl")
    retries: int = Field(2, ge=0, description="in-process retries of an episode whose role call gave up (then it "
                                              "is a counted failure and the resume watermark moves past it)")
    retry_backoff_s: float = Field(0.5, ge=0, description="wait before the first such retry (doubles per retry)")
    workers: int = Field(1, ge=1, description="serve processes on this host, each with its own event loop, task "
                                              "slice and RUN_DIR/worker-G state (the parent aggregates status and "
                                              "restarts a worker that dies)")
    shard: str = Field("0/1", json_schema_extra={"metavar": "I/S"}, description="this host's shard I of S: hosts x workers partition the "
                                                        "tasks (worker g = I*workers+i takes task g mod S*workers); "
                                                        "every host needs the same --workers, --seed and --n")
    contrast: Literal["authors", "forced"] = Field(
        "authors", description="Phase 1 loser: authors (their code: a CLARIFY turn's loser is the gold answer, an "
                               "ANSWER turn's a question from the few-shot --loser-generator) or forced (the policy "
                               "forced to take the other action, checked, retried, then the fallback)")
    pairs_per_conversation: Literal["turn", "one"] | None = Field(
        None, description="turn: one pair per user turn (a gold-CLARIFY task also gives the turn after the "
                          "clarification); one: a pair per task. Default: turn under --contrast authors, else one")
    loser_generator: str | None = Field(None, json_schema_extra={"metavar": "URL"},
                                        description="URL of the model writing the clarifying-question losers (10 "
                                                    "shots, temperature 0.1, 64 tokens; default: the policy's server)")
    loser_generator_model: str | None = Field(None, description="model name at --loser-generator")
    replace_rule: Literal["paper", "authors"] = Field(
        "paper", description="Phase 2 replacement: paper (Algorithm 2: a wrong action always loses; a right one by "
                             "its simulated outcome) or authors (act_trainer.py: by the outcome alone)")
    rollout_temperature: float | None = Field(
        None, ge=0, description="policy sampling temperature sent with every request; default: none is sent, so "
                                "the checkpoint's generation_config.json applies (the server's defaults, as vLLM "
                                "--generation-config auto), as the authors sample; serve does not use --temperature")
    cut_first_newline: bool = Field(False, description="cut each sampled policy reply at its first newline (the "
                                                       "authors' simulator.py post-processing)")
    queue_outage_s: float = Field(
        180.0, ge=0, description="ride through a queue outage (a Redis restart, a locked SQLite file) this long: "
                                 "calls are retried, the outage logged and counted (queue_outages, queue_outage_s); "
                                 "past it serve stops with exit code 75 and resumes when run again")
    roles: RolesConfig = Field(default_factory=RolesConfig, description="the three roles and their clients")

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        if isinstance(data, dict) and "limit" in data:
            data = dict(data)
            limit = data.pop("limit")
            if data.get("n_conversations") is None:
                data["n_conversations"] = limit
        return data

    @model_validator(mode="after")
    def _schedule(self) -> "ServeConfig":
        if self.sync:
            if self.max_pending is None:
                self.max_pending = self.concurrency
        else:
            self.max_pending = ASYNC_MAX_PENDING if self.max_pending is None else self.max_pending
        from simkit.serving.workers import parse_shard

        parse_shard(self.shard)
        if self.mode == "irpo" and self.ablation != "none":
            raise ValueError("--mode irpo is a baseline of its own: no --ablation with it")
        return self


@dataclass
class _TaskRef:
    """A stream item without a D_pref pair (IRPO samples its own pairs)."""

    task_id: str


class Server:
    """`Server.run` only wires the parts (simkit/serving): the cursor feeds slots to the engine,
    each finished rollout goes to the sink, the sink's flush commits the cursor's watermark, and
    a watcher task follows versions and reports status."""

    def __init__(self, cfg: ServeConfig, env, roles, queue, quiet: bool = False):
        self.cfg, self.env, self.roles, self.queue = cfg, env, roles, queue
        self.run_dir = Path(cfg.run_dir)
        self.stop = asyncio.Event()
        self.m = dict(episodes=0, pairs=0, failures=0, right_action=0, successes=0, terminated=0,
                      identical_dropped=0, no_contrast=0, **{k: 0 for k in MIX_KEYS})
        self.phase1: dict[str, int] = {}
        self.split: str | None = None
        self.follower = VersionFollower(queue, roles.policy)
        self.policy = HealingPolicy(roles.policy, self.follower)  # a restarted policy server gets its adapter back
        self.sink = PairSink(queue, self.run_dir / "trajectories.jsonl" if cfg.save_trajectories else None,
                             journal=self.run_dir / "queued.jsonl")
        self.cursor: TaskCursor | None = None
        self.reporter = StatusReporter(self.run_dir / "metrics.jsonl", self._snapshot, quiet=quiet)
        self._t0 = time.monotonic()

    @property
    def version(self) -> int:
        return self.follower.version

    async def follow_version(self) -> None:
        await self.follower.follow()
        await self.sink.refresh_depth()

    async def _watch(self) -> None:
        while not self.stop.is_set():
            try:
                await asyncio.wait_for(self.stop.wait(), self.cfg.poll_s)
            except TimeoutError:
                pass
            await self.follower.follow()
            await self.sink.refresh_stats()
            self.reporter.tick()
            self.reporter.write_metrics()  # also while back-pressure holds rollouts

    async def _rollout(self, slot: Slot) -> Rollout:
        while self.sink.depth >= self.cfg.max_pending and not self.stop.is_set():  # back-pressure
            await asyncio.sleep(self.cfg.poll_s / 4)
            await self.sink.refresh_depth()
        if self.cfg.sync:  # never start an episode on a policy the trainer has already replaced
            await self.follow_version()
        policy = CutFirstNewline(self.policy) if self.cfg.cut_first_newline else self.policy
        if self.cfg.mode == "irpo":
            return await irpo_rollout(self.env, slot.task, policy, version=self.version, epoch=slot.epoch,
                                      samples=self.cfg.irpo_samples)
        return await phase2_rollout(self.env, slot.base, slot.task, policy, version=self.version, epoch=slot.epoch,
                                    simulate=self.cfg.ablation != "no-simulation", replace_rule=self.cfg.replace_rule)

    async def _flush(self, buf: list[Rollout], final: bool = False) -> None:
        await self.sink.write(buf, self.version)
        assert self.cursor is not None
        self.cursor.commit(buf)  # after the append: the watermark never passes a pair not yet queued
        buf.clear()
        self.reporter.write_metrics(final)

    # ------------------------------------------------------------------ reporting
    def _snapshot(self) -> dict[str, Any]:
        el = max(1e-9, time.monotonic() - self._t0)
        m = self.m
        st = self.cursor.state if self.cursor else None
        return {"time": time.time(), "elapsed_s": round(el, 2), "version": self.version,
                "adapter": self._adapter(), "queue_depth": self.sink.depth,
                **m, "dropped_stale": self.sink.dropped_stale, "recovered": self.sink.recovered,
                "duplicates": self.sink.duplicates, "retries": self.cursor.retried if self.cursor else 0,
                "adapter_heals": self.follower.heals, **self._outages(),
                "episodes_per_s": round(m["episodes"] / el, 3), "pairs_per_s": round(m["pairs"] / el, 3),
                "action_accuracy": round(m["right_action"] / m["episodes"], 4) if m["episodes"] else None,
                "success_rate": round(m["successes"] / m["terminated"], 4) if m["terminated"] else None,
                "epoch": st.epoch if st else 0, "position": st.position if st else 0, "sync": self.cfg.sync,
                "mode": self.cfg.mode, "phase1": self.phase1,
                "classifier": describe(self.roles.classifier), "simulator": describe(self.roles.simulator)}

    def _outages(self) -> dict[str, Any]:
        """This worker's queue outages (queue_outages, queue_outage_s, queue_down)."""
        stats = getattr(self.queue, "outage_stats", None)
        return stats() if stats is not None else {}

    def _adapter(self) -> str | None:
        policy = self.roles.policy
        return getattr(policy, "model", None) or getattr(getattr(policy, "client", None), "model", None)

    # ------------------------------------------------------------------ main
    async def run(self, dpref: list) -> dict[str, Any]:
        from contextlib import aclosing

        from simkit.engine import amap

        cfg = self.cfg
        tasks = {t.id: t for t in self.env.tasks(self.split or next(iter(self.env.splits())))}
        for p in dpref:  # turn-1 pairs: the turn after the clarification is a task derived from its base
            if isinstance(p, PreferencePair) and p.task_id not in tasks and p.meta.get("base_task_id") in tasks:
                t1 = turn1_task(tasks[p.meta["base_task_id"]])
                if t1 is not None:
                    tasks[t1.id] = t1
        self.cursor = cursor = TaskCursor(self.run_dir / "state.json", dpref, tasks, seed=cfg.seed,
                                          max_epochs=cfg.max_epochs, max_episodes=cfg.max_episodes,
                                          retries=cfg.retries, retry_backoff_s=cfg.retry_backoff_s)
        self._t0 = time.monotonic()
        await self.sink.recover()  # the queue must hold every pair below the watermark
        await self.follow_version()
        watcher = asyncio.create_task(self._watch())
        buf: list[Rollout] = []
        last_flush = time.monotonic()

        async def one(slot: Slot) -> Rollout:
            return await cursor.run(slot, self._rollout)

        def failed(slot: Slot, e: Exception) -> Rollout:  # only a bug in serve itself lands here
            traj = failed_trajectory(self.env.name, slot.task, e, info={"epoch": slot.epoch, "position": slot.position})
            return Rollout(traj, None)

        try:
            async with aclosing(amap(one, cursor.slots(self.stop), concurrency=cfg.concurrency,
                                     on_error=failed)) as rollouts:
                async for r in rollouts:
                    self._count(r)
                    buf.append(r)
                    if time.monotonic() - last_flush >= cfg.flush_s or len(buf) >= 256:
                        await self._flush(buf)
                        last_flush = time.monotonic()
                    if self.stop.is_set():
                        break
        finally:
            await self._flush(buf, final=True)
            self.stop.set()
            await watcher
            self.reporter.close()
        return self._snapshot()

    def _count(self, r: Rollout) -> None:
        m, t = self.m, r.trajectory
        m["episodes"] += 1
        if r.pair is None:
            if r.dropped == "identical":
                m["identical_dropped"] += 1
            elif r.dropped == "no-contrast":
                m["no_contrast"] += 1
            else:
                m["failures"] += 1
            return
        m["pairs"] += 1
        count_mix(m, r.pair)
        m["right_action"] += bool(t.info.get("right_action"))
        if t.terminated:
            m["terminated"] += 1
            m["successes"] += bool(t.info.get("success"))


async def _unless_stopped(stop: asyncio.Event, coro: Any) -> Any:
    """`await coro`, but cancel it as soon as `stop` is set (a signal); None then."""
    task, stopped = asyncio.ensure_future(coro), asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    return None if task.cancelled() else task.result()


async def serve(cfg: ServeConfig, role_args: argparse.Namespace | RolesConfig | None = None,
                quiet: bool = False) -> dict[str, Any]:
    """Phase 1 once, then Phase 2 until a limit or a signal, over this process's shard of the
    tasks (`cfg.shard`; `--workers` runs several of these, see `simkit.serving.workers`). The
    roles come from `cfg.roles` (`role_args`, parsed role flags or a RolesConfig, replaces them:
    the older call style). `quiet`: no status line (a pool worker; its parent prints one)."""
    from simkit.serving.workers import parse_shard, shard_of

    from simkit.act.pairs import base_task_id, build_pairs, new_phase1_stats, open_act_run, read_pairs
    from simkit.queue import AsyncPairQueue, open_queue
    from simkit.roles.build import build_loser_generator, roles_config, set_rollout_sampling

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    env_kw: dict[str, Any] = {"data_dir": cfg.data_dir} if cfg.data_dir else {}
    if cfg.clarify_rounds is not None:
        env_kw["clarify_rounds"] = cfg.clarify_rounds
    roles_cfg = cfg.roles if role_args is None else roles_config(role_args)
    env, roles, sample = await open_act_run("simkit serve", cfg.env, env_kw, roles_cfg, pseudo_label=cfg.pseudo_label,
                                            split=cfg.split, n=cfg.n_conversations, seed=cfg.seed)
    set_rollout_sampling(roles, cfg.rollout_temperature)
    split = sample.split
    sample.write(run_dir)
    tasks = shard_of(sample.tasks, *parse_shard(cfg.shard))
    if not tasks:
        await roles.aclose()
        raise SystemExit(f"simkit serve: shard {cfg.shard} of {len(sample.tasks)} conversations is empty: "
                         "use fewer workers / shards")
    try:
        queue = AsyncPairQueue(open_queue(cfg.queue, outage_s=cfg.queue_outage_s))
    except BaseException:
        await roles.aclose()
        raise
    server = Server(cfg, env, roles, queue, quiet=quiet)
    server.split = split
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.stop.set)
    try:
        await server.follow_version()
        await server.follower.heal()  # a policy server restarted while serve was down lacks the adapter
        if cfg.mode == "irpo":  # the baseline samples its own pairs: no D_pref
            return await server.run([_TaskRef(t.id) for t in tasks])
        dpref_path = run_dir / "dpref.jsonl"
        server.phase1 = new_phase1_stats()
        generator = build_loser_generator(roles, roles_cfg, cfg.loser_generator, cfg.loser_generator_model,
                                          sample.tasks, env.name, cfg.seed)
        built = await _unless_stopped(server.stop, build_pairs(
            env, tasks, roles.policy, dpref_path, annotator=roles.classifier if cfg.pseudo_label else None,
            random_actions=cfg.ablation == "random-actions", seed=cfg.seed, concurrency=cfg.concurrency,
            progress=None, classifier=roles.classifier, stats=server.phase1, contrast=cfg.contrast,
            generator=generator, per_conversation=cfg.pairs_per_conversation))
        if built is None:  # a signal during Phase 1: stop now, a rerun resumes it (dpref.jsonl holds whole tasks)
            return server._snapshot()
        _, failures = built
        ids = {t.id for t in tasks}
        dpref = [p for p in read_pairs(dpref_path) if base_task_id(p) in ids]
        if not dpref:
            raise SystemExit(f"no Phase 1 pairs could be built ({failures} failures): is the policy server up?")
        if cfg.ablation == "no-sampling":  # offline DPO on D_pref only
            added = await queue.append(dpref)
            return {"phase1_pairs": len(dpref), "appended": added, "phase1": server.phase1,
                    "conversations": len(sample.conversation_ids)}
        return await server.run(dpref)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await roles.aclose()
        await queue.close()


def register_cli(sub: argparse._SubParsersAction) -> None:
    from simkit.config import add_config_args

    p = sub.add_parser(
        "serve", help="run ACT rollouts non-stop and stream scored pairs into the queue",
        description="ACT data side for any environment: builds Phase 1 pairs (D_pref) once, then refreshes them "
                    "with the current policy (Phase 2: sample, classify, simulate, score) and appends the pairs "
                    "to a durable queue for `trainer run`. Follows each policy version the trainer publishes. "
                    "Stops cleanly on SIGINT/SIGTERM and resumes from the run directory on restart. Flags "
                    "override values from --config YAML.")
    add_config_args(p, ServeConfig)
    p.set_defaults(func=_run, parser=p)


def _run(args: argparse.Namespace) -> int:
    from simkit.config import config_from_args

    try:
        cfg = config_from_args(ServeConfig, args)
    except ValueError as e:
        raise SystemExit(f"simkit serve: bad configuration: {e}")
    if not cfg.roles.policy.url:
        raise SystemExit("simkit serve: --policy URL is required (e.g. http://127.0.0.1:8000/v1)")
    if cfg.workers > 1:
        from simkit.serving.workers import WorkerPool

        pool = WorkerPool(cfg)
        code = pool.run()
        print(json.dumps(pool.snapshot()))
        return code
    from simkit.queue.outage import QueueUnavailable

    try:
        summary = asyncio.run(serve(cfg))
    except QueueUnavailable as e:  # the outage outlasted --queue-outage-s: say what to do, no traceback
        print(f"simkit serve: stopped: {e}", file=sys.stderr, flush=True)
        return QueueUnavailable.exit_code
    print(json.dumps(summary))
    return 0
