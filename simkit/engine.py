"""The episode engine: thousands of concurrent episodes, bounded in-flight, results streamed.

    async for traj in run_episodes(env, tasks, policy, concurrency=1000):
        ...

Two layers. `amap` is a bounded concurrent map: a fixed pool of worker coroutines pulls items,
so memory stays flat however many items there are, and each result is yielded as it finishes.
Its error path is explicit: every exception of `fn` goes to the caller's `on_error`, whose value
is yielded in place of the result (nothing is dropped, nothing escapes the loop unless
`on_error` itself raises). `run_episodes` is the typed wrapper for episodes: Task in,
Trajectory out, and any failure (a role giving up, an env hook raising) is a counted
`status='failed'` trajectory. Closing the iterator (`contextlib.aclosing` around an early
`break`), an exception, or Ctrl-C cancels every worker cleanly.
"""
from __future__ import annotations

import asyncio
import gc
import sys
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import (TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Iterable, Protocol, Sequence, TypeVar,
                    runtime_checkable)

from simkit.roles.client import RoleError
from simkit.types import Message, Reply, Task, Trajectory

DEFAULT_CONCURRENCY = 64  # episodes in flight: the one default every command (eval, pairs, serve, loadtest) takes

if TYPE_CHECKING:
    from simkit.env import Env, Episode

T = TypeVar("T")
R = TypeVar("R")


@runtime_checkable
class PolicyLike(Protocol):
    """What the engine needs from a policy: a reply to the dialogue so far."""

    async def respond(self, messages: Sequence[Message], instruction: str | None = None,
                      task: Task | None = None, **sampling: Any) -> Reply: ...


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


async def amap(fn: Callable[[T], Awaitable[R]], items: Iterable[T], *, concurrency: int,
               on_error: Callable[[T, Exception], R], total: int | None = None) -> AsyncIterator[R]:
    """Yield `fn(item)` for every item as it finishes, at most `concurrency` at a time.

    An exception from `fn` (not a cancellation) becomes `on_error(item, exc)`, yielded like a
    result. `total` (default: `len(items)` when it has one) only caps the worker pool."""
    it = iter(items)
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    n_workers = max(1, concurrency if total is None else min(concurrency, total or 1))
    out: asyncio.Queue = asyncio.Queue()
    done_token = object()

    async def worker() -> None:
        try:
            for item in it:  # shared iterator: each item taken by exactly one worker
                try:
                    res = await fn(item)
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    res = on_error(item, e)
                out.put_nowait(res)
                if out.qsize() > n_workers:  # items finishing without suspending (offline roles,
                    await asyncio.sleep(0)  # instant failures) must not starve the consumer
        finally:
            out.put_nowait(done_token)

    _gc_enter()
    workers = [asyncio.create_task(worker()) for _ in range(n_workers)]
    alive = n_workers
    try:
        while alive:
            res = await out.get()
            if res is done_token:
                alive -= 1
                continue
            yield res
        for w in workers:  # re-raise what escaped a worker: on_error raising, or the item iterator
            if not w.cancelled() and w.exception():
                raise w.exception()  # type: ignore[misc]
    finally:
        _gc_exit()
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


def failed_trajectory(env_name: str, task: Task, error: BaseException | str, **extra: Any) -> Trajectory:
    """A counted failed episode for a task whose episode raised before it could report itself."""
    msg = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return Trajectory(task_id=task.id, env=env_name, prompt=task.prompt, gold_action=task.gold_action,
                      status="failed", error=msg, **extra)


async def play(ep: "Episode", policy: PolicyLike, until: Callable[["Episode"], bool] | None = None) -> None:
    """The episode loop: the policy acts, the episode advances, until it ends (or `until` says
    stop before advancing: the simulator is then never asked). Role errors propagate."""
    task = ep.task
    while not ep.done:
        reply = await policy.respond(ep.messages, task=task)
        await ep.act(reply.text, reply)
        if until is not None and until(ep):
            return
        await ep.advance()


async def run_episode(env: "Env", task: Task, policy: PolicyLike, **extra: Any) -> Trajectory:
    """Drive one episode to its end. A role that gives up or an env hook that raises (scoring,
    classifying, simulating) ends it as a failed trajectory, with what was played so far."""
    ep = env.episode(task)
    try:
        await play(ep, policy)
    except RoleError as e:
        return ep.trajectory(status="failed", error=str(e), **extra)
    except Exception as e:
        return ep.trajectory(status="failed", error=f"{type(e).__name__}: {e}", **extra)
    return ep.trajectory(**extra)


async def run_episodes(env: "Env", tasks: Iterable[Task], policy: PolicyLike, concurrency: int = DEFAULT_CONCURRENCY,
                       progress: bool | None = None, stats: EngineStats | None = None,
                       episode_fn: Callable[..., Awaitable[Trajectory]] = run_episode, total: int | None = None,
                       **extra: Any) -> AsyncIterator[Trajectory]:
    """Yield trajectories as episodes finish, with at most `concurrency` in flight.

    `episode_fn(env, task, policy, **extra) -> Trajectory` plays one task (default
    `run_episode`); if it raises, the task becomes a failed trajectory. Other item or result
    types go through `amap` directly."""
    stats = stats or EngineStats()
    if total is None and hasattr(tasks, "__len__"):
        total = len(tasks)  # type: ignore[arg-type]

    async def one(task: Task) -> Trajectory:
        stats.started += 1
        return await episode_fn(env, task, policy, **extra)

    def failed(task: Task, e: Exception) -> Trajectory:
        return failed_trajectory(env.name, task, e)

    bar = progress_bar(total, progress)
    try:
        async with aclosing(amap(one, tasks, concurrency=concurrency, on_error=failed, total=total)) as trajs:
            async for traj in trajs:
                stats.finished += 1
                stats.failed += traj.status == "failed"
                stats.requests += len(traj.assistant_turns)
                if bar is not None:
                    bar.update(1)
                    if stats.failed:
                        bar.set_postfix(failed=stats.failed, refresh=False)
                yield traj
    finally:
        if bar is not None:
            bar.close()


class LineProgress:
    """A progress bar for logs and pipes (`simkit demo > demo.log`): one plain line each time the
    count crosses another `every` percent (or, without a total, every `every_n` items), never the
    carriage-return frames a terminal bar writes. The tqdm calls the callers use: update, n, close."""

    def __init__(self, total: int | None, unit: str = "it", desc: str = "", every: float = 5.0,
                 every_n: int = 50, stream: Any = None):
        self.total, self.unit, self.desc, self.every, self.every_n = total, unit, desc, every, every_n
        self.stream, self.n, self._mark, self._t0 = stream or sys.stderr, 0, 0, time.monotonic()

    def update(self, k: int = 1) -> None:
        self.n += k
        mark = int(100 * self.n / self.total // self.every) if self.total else self.n // self.every_n
        if mark > self._mark:
            self._mark = mark
            self._line()

    def _line(self) -> None:
        done = f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n} {self.unit}"
        print(f"{self.desc + ': ' if self.desc else ''}{done}, {time.monotonic() - self._t0:.0f}s", file=self.stream,
              flush=True)

    def close(self) -> None:
        pass


def progress_bar(total: int | None, enabled: bool | None, unit: str = "ep", desc: str = "episodes"):
    """A tqdm bar on a terminal; elsewhere (a log file, a pipe) a `LineProgress` when `enabled`, and
    nothing when `enabled=None` (the default of library calls: quiet unless on a terminal)."""
    tty = sys.stderr.isatty()
    if enabled is None:
        enabled = tty
    if not enabled:
        return None
    if not tty:
        return LineProgress(total, unit=unit, desc=desc)
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, desc=desc, smoothing=0.1)


async def collect(env: "Env", tasks: Iterable[Task], policy: PolicyLike, **kw: Any) -> list[Trajectory]:
    """All trajectories of a run, as a list (convenience for small runs and tests)."""
    return [t async for t in run_episodes(env, tasks, policy, **kw)]
