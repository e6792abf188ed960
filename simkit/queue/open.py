"""`open_queue(url or path)`: the backend a queue URL names."""
from __future__ import annotations

import os

from simkit.queue.base import PairQueue
from simkit.queue.sqlite import SQLiteQueue


def open_queue(url_or_path: "str | os.PathLike", outage_s: float | None = None) -> PairQueue:
    """"sqlite:///relative.db", "sqlite:////abs/path.db" or a plain path → SQLiteQueue;
    "redis://host:6379/0?stream=act" (or rediss://) → RedisQueue. `outage_s`: how long calls ride
    through an outage (None: $SIMKIT_QUEUE_OUTAGE_S, else 180 s)."""
    s = os.fspath(url_or_path)
    if s.startswith("sqlite:"):
        rest = s[len("sqlite:"):]
        if not rest.startswith("///"):
            raise ValueError(f"bad SQLite queue URL {s!r}: use sqlite:///relative/path.db or "
                             f"sqlite:////absolute/path.db")
        path = rest[3:]
        if not path:
            raise ValueError(f"SQLite queue URL {s!r} has no path")
        return SQLiteQueue(path, outage_s=outage_s)
    if s.startswith(("redis://", "rediss://")):
        from simkit.queue.redis import RedisQueue

        return RedisQueue(s, outage_s=outage_s)
    if "://" in s:
        raise ValueError(f"unknown queue URL scheme in {s!r}: expected sqlite:///path, "
                         f"redis://host:port/db?stream=NAME or a path")
    return SQLiteQueue(s, outage_s=outage_s)
