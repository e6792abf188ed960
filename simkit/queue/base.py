"""The queue's contract: `PairQueue` (what serve and the trainer call), its `Lease` and
`VersionInfo`, the outage-riding decorator, and `AsyncPairQueue`, derived from `PairQueue`
for asyncio code (`aio.AsyncPairQueue`). Backends: `sqlite.SQLiteQueue`, `redis.RedisQueue`; `open.open_queue` picks one."""
from __future__ import annotations

import functools
import gc
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from simkit.queue.outage import Outage, QueueUnavailable
from simkit.types import PreferencePair

log = logging.getLogger("simkit.queue")

# a pair's state, in SQLite: available  done IS NULL AND lease_until IS NULL
#                             leased     done IS NULL AND lease_until IS NOT NULL (expired: <= now)
#                             acked      done = 2,  dropped (stale)  done = 3
ACKED, DROPPED = 2, 3


@dataclass
class Lease:
    """A batch handed to one consumer. Ack it (or its ids) when trained on; otherwise the pairs
    come back at `expires_at`, on `release(consumer)`, or on `nack(lease)`."""

    id: str
    consumer: str
    pairs: list[PreferencePair]
    expires_at: float

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[PreferencePair]:
        return iter(self.pairs)

    def __bool__(self) -> bool:  # an empty lease is falsy even though the object exists
        return bool(self.pairs)


@dataclass
class VersionInfo:
    """One published policy version: the adapter name servers know it by, where it was saved."""

    version: int
    adapter: str
    path: str | None
    published_at: float
    meta: dict[str, Any] = field(default_factory=dict)


def _ids_of(lease_or_ids: "Lease | Sequence[str]") -> list[str]:
    if isinstance(lease_or_ids, Lease):
        return lease_or_ids.ids
    if isinstance(lease_or_ids, str):  # a lone id is a common slip; treat it as one id
        return [lease_or_ids]
    return [getattr(x, "id", x) for x in lease_or_ids]  # ids, or pairs themselves


def riding(op: str, cleanup: bool = False) -> Any:
    """Method decorator: run the call through the queue's `Outage` (retried while the backend is
    out). `cleanup` calls (release) log and return 0 when the outage outlasts the window, so they
    never raise over the error that made the caller clean up; the leases come back when they
    expire or when the consumer starts again."""
    def deco(fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(self: "PairQueue", *args: Any, **kw: Any) -> Any:
            try:
                return self._outage.call(op, lambda: fn(self, *args, **kw))
            except QueueUnavailable as e:
                if not cleanup:
                    raise
                log.warning("%s(%s) skipped: %s", op, ", ".join(map(repr, args)), e)
                return 0
        return wrapper
    return deco


class PairQueue(ABC):
    """The typed seam between producers and consumers: SQLiteQueue and RedisQueue implement it.

    Only what serve and the trainer call (`AsyncPairQueue` is generated from these methods).
    Audits and tests also use backend extras not part of it: `versions`, `drop_stale`, `states`."""

    _outage: Outage = Outage("(none)", lambda e: False, 0.0)  # each backend sets its own

    def outage_stats(self) -> dict:
        """This client's outages: queue_outages, queue_outage_s, queue_down (see queue_outage.py)."""
        return self._outage.stats()

    @abstractmethod
    def append(self, pairs: Sequence[PreferencePair]) -> int:
        """Add pairs; returns how many were new (a known id, even an acked one, is a no-op)."""

    @abstractmethod
    def lease(self, n: int, consumer: str = "trainer", lease_s: float = 600.0,
              min_version: int | None = None) -> Lease:
        """Up to n oldest available pairs, hidden from other leases until acked or expired.
        With `min_version`, available pairs older than it are dropped first (and counted)."""

    @abstractmethod
    def ack(self, lease_or_ids: "Lease | Sequence[str]") -> int:
        """Mark pairs trained; they never come back. Returns how many were newly acked."""

    @abstractmethod
    def release(self, consumer: str) -> int:
        """Return every unacked lease of `consumer` at once (a restarted consumer calls this)."""

    @abstractmethod
    def depth(self) -> int:
        """Pairs not yet acked or dropped (available + leased). Cheap: safe to poll."""

    @abstractmethod
    def publish_version(self, version: int, adapter: str, path: str | None = None,
                        meta: dict | None = None) -> None:
        """Announce a policy version (trainer side). Re-publishing the current one replaces it;
        a lower version than the current one raises ValueError."""

    @abstractmethod
    def current_version(self) -> VersionInfo | None:
        """The latest published version, or None before the first publish."""

    @abstractmethod
    def missing(self, ids: Sequence[str]) -> list[str]:
        """The ids among `ids` this queue never saw (acked and dropped ones count as seen)."""

    @abstractmethod
    def stats(self) -> dict:
        """Counters: appended, duplicates, leased, acked, dropped_stale, depth, version, …"""

    @abstractmethod
    def close(self) -> None:
        """Release the backend's resources. Idempotent."""

    # ---- optional extras with safe defaults; backends override when they can do better
    def nack(self, lease_or_ids: "Lease | Sequence[str]") -> int:
        """Give specific leased pairs back now (not trained). Default: not supported."""
        raise NotImplementedError(f"{type(self).__name__} does not support nack()")

    def renew(self, lease: Lease, lease_s: float = 600.0) -> int:
        """Extend a lease still held (heartbeat for long steps). Default: not supported."""
        raise NotImplementedError(f"{type(self).__name__} does not support renew()")

    def __enter__(self) -> "PairQueue":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def decode_pairs(bodies: Sequence[str | bytes]) -> list[PreferencePair]:
    """PreferencePair.model_validate_json over a batch, with the cyclic GC paused meanwhile.

    Validating a pair allocates a few dozen small objects, so a batch sets off many young-generation
    collections, each of which costs more the bigger the process heap (a trainer's is big): this
    halves decode time or better. The objects are still collected afterwards as usual.
    """
    was_enabled = gc.isenabled()
    if was_enabled:
        gc.disable()
    try:
        return [PreferencePair.model_validate_json(b) for b in bodies]
    finally:
        if was_enabled:
            gc.enable()
