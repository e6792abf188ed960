"""Riding a queue client through an outage of its backend (a Redis restart, a long SQLite lock).

Why: a redis-server that is back in a second, or still replaying its AOF (`BusyLoadingError`),
must not end the trainer or a serve worker (each such exit costs a restart, a reload of the
model, a re-lease). So every PairQueue call goes through `Outage.call`: an error the backend
calls transient is retried with backoff (50 ms, doubling, at most 2 s) until the outage has
lasted `window_s` (`--queue-outage-s`, default 180 s); only then does the call raise
`QueueUnavailable`, whose message says what to do.

Retrying is only safe because every state change of a backend is atomic and can be redone:
SQLite runs each call as one transaction (a failed one is rolled back whole); Redis runs each as
one Lua script or MULTI. Acks, releases, nacks, renewals, drops and publishes are idempotent; an
append of a known id is a no-op (counted as a duplicate); a Redis lease keeps its answer under its
lease id for the lease's duration, so a lease whose reply was lost returns the same pairs when
redone (see simkit/queue/redis.py).

One outage is logged once when it starts and once when it ends, and counted per client:
`queue_outages` (outages seen, the current one included), `queue_outage_s` (their total length)
and `queue_down` (in one now).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, TypeVar

__all__ = ["DEFAULT_OUTAGE_S", "OUTAGE_ENV", "Outage", "QueueUnavailable", "outage_window"]

log = logging.getLogger("simkit.queue")
T = TypeVar("T")
DEFAULT_OUTAGE_S = 180.0
OUTAGE_ENV = "SIMKIT_QUEUE_OUTAGE_S"  # how `trainer run --queue-outage-s` reaches open_queue (and DDP ranks)


class QueueUnavailable(RuntimeError):
    """The queue stayed unreachable for the whole outage window. Not transient by definition."""

    exit_code = 75  # EX_TEMPFAIL: start the queue again, then rerun the same command (it resumes)


def outage_window(window_s: float | None = None) -> float:
    """The window in seconds: `window_s`, else $SIMKIT_QUEUE_OUTAGE_S, else DEFAULT_OUTAGE_S."""
    if window_s is not None:
        return max(0.0, float(window_s))
    env = os.environ.get(OUTAGE_ENV)
    return max(0.0, float(env)) if env else DEFAULT_OUTAGE_S


class Outage:
    """The outage state of one queue client, shared by its threads (the trainer leases on a feeder
    thread while the main thread acks)."""

    def __init__(self, where: str, transient: Callable[[BaseException], bool], window_s: float | None = None,
                 first_backoff_s: float = 0.05, max_backoff_s: float = 2.0) -> None:
        self.where, self.transient = where, transient
        self.window_s = outage_window(window_s)
        self.first_backoff_s, self.max_backoff_s = first_backoff_s, max_backoff_s
        self._lock = threading.Lock()
        self._since: float | None = None  # monotonic start of the outage in progress
        self.outages = 0
        self._past_s = 0.0  # length of the outages that ended

    def call(self, op: str, fn: Callable[[], T]) -> T:
        """`fn()`, retried while it fails transiently, until the outage is `window_s` old."""
        delay = self.first_backoff_s
        while True:
            try:
                out = fn()
            except Exception as e:
                if isinstance(e, QueueUnavailable) or not self.transient(e):
                    raise
                left = self._failed(op, e)
                if left <= 0:
                    raise QueueUnavailable(
                        f"the queue at {self.where} has been unreachable for {self.window_s:.0f}s "
                        f"(last error in {op}: {type(e).__name__}: {e}). Start it again (or fix the network / "
                        f"the lock holder), then run the same command again: it resumes where it stopped. "
                        f"To wait longer next time, raise --queue-outage-s.") from e
                time.sleep(min(delay, left))
                delay = min(delay * 2, self.max_backoff_s)
                continue
            if self._since is not None:
                self._recovered(op)
            return out

    def _failed(self, op: str, e: BaseException) -> float:
        """Note a transient failure; returns the seconds left in the window."""
        now = time.monotonic()
        with self._lock:
            if self._since is None:
                self._since = now
                self.outages += 1
                log.warning("queue %s unreachable (%s in %s: %s): retrying for up to %.0fs", self.where,
                            type(e).__name__, op, e, self.window_s)
            return self._since + self.window_s - now

    def _recovered(self, op: str) -> None:
        with self._lock:
            if self._since is None:
                return
            lasted = time.monotonic() - self._since
            self._past_s += lasted
            self._since = None
        log.warning("queue %s reachable again after %.1fs (%s went through)", self.where, lasted, op)

    def stats(self) -> dict[str, float | int | bool]:
        """queue_outages, queue_outage_s (the one in progress included), queue_down."""
        with self._lock:
            now_s = 0.0 if self._since is None else time.monotonic() - self._since
            return {"queue_outages": self.outages, "queue_outage_s": round(self._past_s + now_s, 3),
                    "queue_down": self._since is not None}
