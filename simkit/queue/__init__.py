"""The durable preference-pair queue between `simkit serve` (appends) and `trainer run` (consumes).

    serve ──append(pairs)──► queue ──lease(n)──► trainer ──ack(lease)──► gone for good
                               ▲                    │
                               └─ current_version ◄─┴─ publish_version(v, adapter, path)

Guarantees (docs/DESIGN.md, "Seams", the queue):

* **Idempotent ids.** `append` deduplicates on `PreferencePair.id` (content-addressed). An id once
  appended is remembered for the life of the queue file: re-appending it is a no-op even after it
  was acked or dropped, so a pair is never queued (hence never trained) twice.
* **Leases, not pops.** `lease(n)` hands out the oldest available pairs and hides them from every
  other `lease` until they are acked, the lease expires (`lease_s`), or the consumer is released
  (`release(consumer)` when a restarted trainer comes back, `nack(lease)` for a batch it gave up
  on). Unacked pairs therefore survive a consumer crash; acked pairs never come back.
  Delivery is at-least-once: a consumer that outlives its lease may race a second consumer.
* **Policy-version channel.** The trainer `publish_version`s each adapter it loaded into the
  policy servers; serve reads `current_version()`. Versions never go backwards.
* **Staleness, one rule, at consume.** `lease(n, min_version=v)` drops (and counts, in
  `stats()["dropped_stale"]`) available pairs made by a policy older than `v` and never hands
  them out. A leased pair is never dropped under its consumer: only available pairs are
  dropped, so an ack of a leased pair always counts.
* **Producer check.** `missing(ids)` lists the ids the queue has never seen, so a producer can
  re-append what a damaged store lost (serve does on resume).
* **Back-pressure.** `depth()` (unacked pairs) reads one counter row: O(1) at any queue size.
* **Outages.** Every call rides through a backend outage (a Redis restart, SQLite `database is
  locked` beyond its busy timeout) for `outage_s` (default 180 s, `--queue-outage-s`): retried,
  logged once, counted in `outage_stats()`; then `QueueUnavailable` (simkit/queue/outage.py).
  `release` and `close` are cleanup: they log instead of raising an outage over the caller's error.

`SQLiteQueue` is the embedded default: one file in WAL mode, safe for several processes at once
(writers take `BEGIN IMMEDIATE`, everyone waits on `busy_timeout`). Acked and dropped rows keep
only their id (the JSON body lives in a side table and is deleted) so dedup stays exact while the
file stays small, and state changes (lease, ack) rewrite ~100-byte rows, never the JSON.
`RedisQueue` (`simkit/queue/redis.py`, `redis://host:6379/0?stream=act`) is the same over Redis
Streams, for processes on several machines. `AsyncPairQueue` wraps any backend for asyncio code:
every call runs on one dedicated worker thread, so the event loop never blocks on I/O.
"""
from simkit.queue.aio import AsyncPairQueue
from simkit.queue.base import Lease, PairQueue, VersionInfo, decode_pairs
from simkit.queue.open import open_queue
from simkit.queue.outage import QueueUnavailable
from simkit.queue.sqlite import SQLiteQueue

__all__ = ["AsyncPairQueue", "Lease", "PairQueue", "QueueUnavailable", "SQLiteQueue", "VersionInfo", "decode_pairs",
           "open_queue"]
