"""`AsyncPairQueue`: any `PairQueue` for asyncio code, every call on one worker thread."""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
from typing import Any, Sequence

from simkit.queue.base import Lease, PairQueue, VersionInfo
from simkit.queue.open import open_queue
from simkit.types import PreferencePair


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

    async def append(self, pairs: Sequence[PreferencePair]) -> int:
        return await self._call(self.sync.append, list(pairs))

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

    async def ack(self, lease_or_ids: "Lease | Sequence[str]") -> int:
        return await self._call(self.sync.ack, lease_or_ids)

    async def nack(self, lease_or_ids: "Lease | Sequence[str]") -> int:
        return await self._call(self.sync.nack, lease_or_ids)

    async def renew(self, lease: Lease, lease_s: float = 600.0) -> int:
        return await self._call(self.sync.renew, lease, lease_s)

    async def release(self, consumer: str) -> int:
        return await self._call(self.sync.release, consumer)

    async def depth(self) -> int:
        return await self._call(self.sync.depth)

    async def publish_version(self, version: int, adapter: str, path: str | None = None,
                              meta: dict | None = None) -> None:
        await self._call(self.sync.publish_version, version, adapter, path, meta)

    async def current_version(self) -> VersionInfo | None:
        return await self._call(self.sync.current_version)

    async def drop_stale(self, min_version: int) -> int:
        return await self._call(self.sync.drop_stale, min_version)

    async def missing(self, ids: Sequence[str]) -> list[str]:
        return await self._call(self.sync.missing, list(ids))

    async def stats(self) -> dict:
        return await self._call(self.sync.stats)

    def outage_stats(self) -> dict:
        """The client's outage counters (no I/O: safe from the event loop)."""
        return self.sync.outage_stats()

    async def wait_below(self, max_depth: int, poll_s: float = 0.5,
                         timeout: float | None = None) -> int:
        """Back-pressure for producers: wait until depth() < max_depth; returns the depth.
        Raises asyncio.TimeoutError after `timeout` seconds."""
        async def _wait() -> int:
            while True:
                d = await self.depth()
                if d < max_depth:
                    return d
                await asyncio.sleep(poll_s)
        return await asyncio.wait_for(_wait(), timeout)

    async def close(self) -> None:
        try:
            await self._call(self.sync.close)
        finally:
            self._pool.shutdown(wait=False)

    async def __aenter__(self) -> "AsyncPairQueue":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
