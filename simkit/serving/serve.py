"""`simkit serve`: the ACT data side, non-stop, for any registered environment.

    D_pref (Phase 1, built once, resumable) ──► Phase 2 rollouts with the *current* policy
        ──► scored pairs ──► durable queue ──► `trainer run` ──► new version ──► serve follows

State lives in the run directory (`state.json`: epoch and a low-watermark position, written
after each queue flush) and pair ids are deterministic per (task, epoch), so a restart after
SIGKILL redoes at most the in-flight episodes and the queue drops the duplicates. A failed
episode is retried in-process and then given up on (counted): it never holds the watermark back.
The parts live in `simkit.serving`; this module only wires them (`Server`, `serve()`). The
settings are `serving/config.py`, the command `serving/cli.py`.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simkit.act.contrast import Rollout, irpo_rollout, phase2_rollout, turn1_task
from simkit.roles.agents import CutFirstNewline, describe
from simkit.engine import failed_trajectory
from simkit.roles.build import RolesConfig
from simkit.serving import PairSink, Slot, StatusReporter, TaskCursor, VersionFollower
from simkit.serving.config import ServeConfig
from simkit.serving.follower import HealingPolicy
from simkit.serving.shard import parse_shard, shard_of
from simkit.serving.status import MIX_KEYS, aggregate, count_mix
from simkit.types import PreferencePair

__all__ = ["Server", "ServeConfig", "serve"]


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
                      identical_dropped=0, no_contrast=0, content_dropped=0, **{k: 0 for k in MIX_KEYS})
        self.phase1: dict[str, int] = {}
        self.split: str | None = None
        self.follower = VersionFollower(queue, roles.policy)
        self.policy = HealingPolicy(roles.policy, self.follower)  # a restarted policy server gets its adapter back
        self.sink = PairSink(queue, self.run_dir / "trajectories.jsonl" if cfg.save_trajectories else None,
                             journal=self.run_dir / "queued.jsonl")
        self.cursor: TaskCursor | None = None
        self.reporter = StatusReporter(self.run_dir / "metrics.jsonl", self._snapshot, quiet=quiet)
        self._t0 = time.monotonic()

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
        await self.sink.wait_below(self.cfg.max_pending, self.cfg.poll_s / 4, self.stop)
        if self.cfg.sync:  # never start an episode on a policy the trainer has already replaced
            await self.follow_version()
        policy = CutFirstNewline(self.policy) if self.cfg.cut_first_newline else self.policy
        version = self.follower.version
        if self.cfg.mode == "irpo":
            return await irpo_rollout(self.env, slot.task, policy, version=version, epoch=slot.epoch,
                                      samples=self.cfg.irpo_samples)
        return await phase2_rollout(self.env, slot.base, slot.task, policy, version=version, epoch=slot.epoch,
                                    simulate=self.cfg.ablation != "no-simulation", replace_rule=self.cfg.replace_rule,
                                    content_pairs=self.cfg.content_pairs)

    async def _flush(self, buf: list[Rollout], final: bool = False) -> None:
        await self.sink.write(buf)
        assert self.cursor is not None
        self.cursor.commit(buf)  # after the append: the watermark never passes a pair not yet queued
        buf.clear()
        self.reporter.write_metrics(final)

    # ------------------------------------------------------------------ reporting
    def _snapshot(self) -> dict[str, Any]:
        """This worker's metrics row: its counters through `aggregate`, plus what only it knows."""
        st = self.cursor.state if self.cursor else None
        own = {"elapsed_s": time.monotonic() - self._t0, "version": self.follower.version,
               "queue_depth": self.sink.depth, "dropped_stale": self.sink.dropped_stale,
               "recovered": self.sink.recovered, "duplicates": self.sink.duplicates,
               "retries": self.cursor.retried if self.cursor else 0, "adapter_heals": self.follower.heals,
               **self.m, **self.queue.outage_stats()}
        return {**own, **aggregate([own]), "adapter": self._adapter(),
                "epoch": st.epoch if st else 0, "position": st.position if st else 0, "sync": self.cfg.sync,
                "mode": self.cfg.mode, "phase1": self.phase1,
                "classifier": describe(self.roles.classifier), "simulator": describe(self.roles.simulator)}

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
        if r.pair is None:  # dropped for a reason, or failed
            m[_DROP_COUNTERS.get(r.dropped or "", "failures")] += 1
            return
        m["pairs"] += 1
        count_mix(m, r.pair)
        m["right_action"] += bool(t.info.get("right_action"))
        if t.terminated:
            m["terminated"] += 1
            m["successes"] += bool(t.info.get("success"))


# the metrics counter of each reason a rollout made no pair (anything else is a failure)
_DROP_COUNTERS = {"identical": "identical_dropped", "no-contrast": "no_contrast", "content-only": "content_dropped"}


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
    from simkit.queue import AsyncPairQueue, open_queue
    from simkit.roles.build import roles_config

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    roles_cfg = cfg.roles if role_args is None else roles_config(role_args)
    env, roles, sample, tasks = await _open_run(cfg, roles_cfg)
    try:
        queue = AsyncPairQueue(open_queue(cfg.queue, outage_s=cfg.queue_outage_s))
    except BaseException:
        await roles.aclose()
        raise
    server = Server(cfg, env, roles, queue, quiet=quiet)
    server.split = sample.split
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.stop.set)
    try:
        await server.follow_version()
        await server.follower.heal()  # a policy server restarted while serve was down lacks the adapter
        if cfg.mode == "irpo":  # the baseline samples its own pairs: no D_pref
            return await server.run([_TaskRef(t.id) for t in tasks])
        return await _act(server, roles_cfg, sample, tasks)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await roles.aclose()
        await queue.close()


async def _open_run(cfg: ServeConfig, roles_cfg: RolesConfig) -> tuple[Any, Any, Any, list]:
    """The env, the roles, the recorded conversation sample and this process's shard of its tasks."""
    from simkit.act.pairs import open_act_run
    from simkit.roles.build import set_rollout_sampling

    env_kw: dict[str, Any] = {"data_dir": cfg.data_dir} if cfg.data_dir else {}
    if cfg.clarify_rounds is not None:
        env_kw["clarify_rounds"] = cfg.clarify_rounds
    env, roles, sample = await open_act_run("simkit serve", cfg.env, env_kw, roles_cfg, pseudo_label=cfg.pseudo_label,
                                            split=cfg.split, n=cfg.n_conversations, seed=cfg.seed)
    set_rollout_sampling(roles, cfg.rollout_temperature)
    sample.write(Path(cfg.run_dir))
    tasks = shard_of(sample.tasks, *parse_shard(cfg.shard))
    if not tasks:
        await roles.aclose()
        raise SystemExit(f"simkit serve: shard {cfg.shard} of {len(sample.tasks)} conversations is empty: "
                         "use fewer workers / shards")
    return env, roles, sample, tasks


async def _act(server: Server, roles_cfg: RolesConfig, sample: Any, tasks: list) -> dict[str, Any]:
    """ACT: D_pref for this shard (Phase 1, resumable), then Phase 2 over it."""
    from simkit.act.pairs import base_task_id, build_pairs, new_phase1_stats, read_pairs
    from simkit.roles.build import build_loser_generator

    cfg, env, roles = server.cfg, server.env, server.roles
    dpref_path = server.run_dir / "dpref.jsonl"
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
        added = await server.queue.append(dpref)
        return {"phase1_pairs": len(dpref), "appended": added, "phase1": server.phase1,
                "conversations": len(sample.conversation_ids)}
    return await server.run(dpref)
