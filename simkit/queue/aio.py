"""`AsyncPairQueue`: any `PairQueue` for asyncio code, every call on one worker thread.

Its coroutines are generated from `PairQueue`'s methods (`CALLS`), so the two cannot drift apart.
Written out are only what differs: `lease` (a cancelled lease is given back), `close` (it also
stops the thread) and `outage_stats` (a plain call: no I/O, safe from the event loop)."""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
from typing import Any, Callable

from simkit.queue.base import Lease, PairQueue
from simkit.queue.open import open_queue

# PairQueue's calls, all of them on AsyncPairQueue
CALLS = tuple(name for name, f in vars(PairQueue).items() if callable(f) and not name.startswith("_"))


class AsyncPairQueue:
    """A PairQueue for asyncio code: the same calls as coroutines, all run on one dedicated
    worker thread (one SQLite connection, one thread), so the event loop never blocks.

    If a `lease` coroutine is cancelled after the worker took the lease, the pairs are given back
    at once (nack) rather than waiting for the lease to expire.
    """

    def __init__(self, queue: "PairQueue | str | os.PathLike") -> None:
        self.sync: PairQueue = queue if isinstance(queue, PairQueue) else open_queue(queue)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                           thread_name_prefix="simkit-queue")

    async def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kw))

    async def lease(self, n: int, consumer: str = "trainer", lease_s: float = 600.0,
                    min_version: int | None = None) -> Lease:
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool, functools.partial(
            self.sync.lease, n, consumer=consumer, lease_s=lease_s, min_version=min_version))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            def give_back(f: asyncio.Future) -> None:
                if not f.cancelled() and f.exception() is None and f.result().pairs:
                    try:
                        self._pool.submit(self.sync.nack, f.result())
                    except RuntimeError:  # pool already shut down: the lease will expire
                        pass
            fut.add_done_callback(give_back)
            raise

    def outage_stats(self) -> dict:
        """The client's outage counters (no I/O: safe from the event loop)."""
        return self.sync.outage_stats()

    async def close(self) -> None:
        try:
            await self._call(self.sync.close)
        finally:
            self._pool.shutdown(wait=False)

    async def __aenter__(self) -> "AsyncPairQueue":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _on_worker(name: str) -> Callable[..., Any]:
    """`PairQueue.<name>` as a coroutine that runs it on the queue's worker thread."""
    @functools.wraps(getattr(PairQueue, name))
    async def call(self: AsyncPairQueue, *args: Any, **kw: Any) -> Any:
        return await self._call(getattr(self.sync, name), *args, **kw)

    call.__qualname__ = f"AsyncPairQueue.{name}"
    return call


for _name in CALLS:
    if _name not in vars(AsyncPairQueue):
        setattr(AsyncPairQueue, _name, _on_worker(_name))
