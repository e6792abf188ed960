"""The episode engine: thousands of concurrent episodes, bounded in-flight, results streamed.

    async for traj in run_episodes(env, tasks, policy, concurrency=1000):
        ...

A fixed pool of worker coroutines pulls tasks, so memory stays flat however many tasks there
are; finished trajectories are yielded as they complete. A role call that fails after its
retries ends that episode with status='failed' (counted, yielded, never dropped). Closing the
iterator (`contextlib.aclosing` around an early `break`), an exception, or Ctrl-C cancels every
worker cleanly.
"""
from __future__ import annotations

import asyncio
import gc
import sys
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterable

from .client import RoleError
from .env import Env
from .types import Task, Trajectory


@dataclass
class EngineStats:
    started: int = 0
    finished: int = 0
    failed: int = 0
    requests: int = 0  # policy turns sent

    def as_dict(self) -> dict[str, int]:
        return dict(started=self.started, finished=self.finished, failed=self.failed, requests=self.requests)


# CPython's cyclic GC vs thousands of in-flight episodes: every request allocates short-lived
# containers, so gen-0 collections fire every 700 allocations and promote in-flight objects, and
# the frequent full collections then scan the whole (large) live heap: ~45% of client CPU at
# 5,000 episodes in flight (bench/bench_engine.py). While any run is active the gen-0 threshold
# is raised to GC_GEN0_THRESHOLD so request garbage dies young; cycles are still collected, in
# bigger batches. Restored when the last run ends. Set to None to leave the GC alone.
GC_GEN0_THRESHOLD: int | None = 50_000
_gc_runs = 0
_gc_saved: tuple[int, int, int] | None = None


def _gc_enter() -> None:
    global _gc_runs, _gc_saved
    _gc_runs += 1
    if _gc_runs == 1 and GC_GEN0_THRESHOLD:
        t = gc.get_threshold()
        if t[0] < GC_GEN0_THRESHOLD:
            _gc_saved = t
            gc.set_threshold(GC_GEN0_THRESHOLD, *t[1:])


def _gc_exit() -> None:
    global _gc_runs, _gc_saved
    _gc_runs -= 1
    if _gc_runs == 0 and _gc_saved is not None:
        if gc.get_threshold()[0] == GC_GEN0_THRESHOLD:  # nobody changed it meanwhile
            gc.set_threshold(*_gc_saved)
        _gc_saved = None


async def run_episode(env: Env, task: Task, policy: Any, **extra: Any) -> Trajectory:
    """Drive one episode to its end: policy replies, env classifies/simulates/scores."""
    ep = env.episode(task)
    try:
        while not ep.done:
            reply = await policy.respond(ep.messages, task=task)
            await ep.step(reply.text, reply)
    except RoleError as e:
        return ep.trajectory(status="failed", error=str(e), **extra)
    return ep.trajectory(**extra)


async def run_episodes(env: Env, tasks: Iterable[Task], policy: Any, concurrency: int = 256,
                       progress: bool | None = None, stats: EngineStats | None = None,
                       episode_fn: Callable[..., Any] = run_episode, total: int | None = None,
                       **extra: Any) -> AsyncIterator[Trajectory]:
    """Yield trajectories as episodes finish, with at most `concurrency` in flight."""
    stats = stats or EngineStats()
    it = iter(tasks)
    if total is None and hasattr(tasks, "__len__"):
        total = len(tasks)  # type: ignore[arg-type]
    out: asyncio.Queue = asyncio.Queue()
    done_token = object()

    async def worker() -> None:
        try:
            for task in it:  # shared iterator: each task taken by exactly one worker
                stats.started += 1
                try:
                    traj = await episode_fn(env, task, policy, **extra)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # a bug in scoring etc.: surface it as a failed episode
                    traj = Trajectory(task_id=task.id, env=env.name, prompt=task.prompt,
                                      gold_action=task.gold_action, status="failed",
                                      error=f"{type(e).__name__}: {e}")
                out.put_nowait(traj)
                if out.qsize() > n_workers:  # episodes finishing without suspending (offline roles,
                    await asyncio.sleep(0)  # instant failures) must not starve the consumer
        finally:
            out.put_nowait(done_token)

    n_workers = max(1, concurrency if total is None else min(concurrency, total or 1))
    _gc_enter()
    workers = [asyncio.create_task(worker()) for _ in range(n_workers)]
    bar = _progress(total, progress)
    alive = n_workers
    try:
        while alive:
            item = await out.get()
            if item is done_token:
                alive -= 1
                continue
            stats.finished += 1
            stats.failed += getattr(item, "status", "ok") == "failed"
            # episode_fn may wrap the trajectory (no getattr miss on pydantic: it raises inside)
            traj = item if isinstance(item, Trajectory) else getattr(item, "trajectory", item)
            if isinstance(traj, Trajectory):
                stats.requests += len(traj.assistant_turns)
            if bar is not None:
                bar.update(1)
                if stats.failed:
                    bar.set_postfix(failed=stats.failed, refresh=False)
            yield item
        for w in workers:  # re-raise anything unexpected from a worker
            if not w.cancelled() and w.exception():
                raise w.exception()  # type: ignore[misc]
    finally:
        _gc_exit()
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        if bar is not None:
            bar.close()


def _progress(total: int | None, enabled: bool | None):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="ep", desc="episodes", smoothing=0.1)


async def collect(env: Env, tasks: Iterable[Task], policy: Any, **kw: Any) -> list[Trajectory]:
    """All trajectories of a run, as a list (convenience for small runs and tests)."""
    return [t async for t in run_episodes(env, tasks, policy, **kw)]
