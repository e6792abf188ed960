"""The pair sink: the one place serve appends pairs to the queue, waits on its depth
(back-pressure, `wait_below`), and its resume check.

Serve does not judge staleness: the consumer does, at lease time (`lease(min_version=…)`,
`trainer run --max-staleness`). Before each append the pairs go to a journal
(`queued.jsonl`, fsynced), so a resume can re-append what the queue lost (a truncated SQLite
WAL, a Redis restart without AOF): `recover()` asks the queue which journalled ids it is
`missing` and appends those again (ids are idempotent, so nothing is queued twice).
The journal keeps the newest ~`journal_mb` to 2x that (two segments): far more than a queue
can lose (SQLite checkpoints its WAL every ~16 MB; Redis AOF everysec loses <= ~1 s).
"""
from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Sequence

from simkit.act.contrast import Rollout
from simkit.types import PreferencePair

log = logging.getLogger("simkit.serving.serve")


def journal_lines(data: bytes) -> list[str]:
    """The journal's lines, split on "\\n" only: `str.splitlines()` also breaks at U+0085, U+2028 and
    U+2029, which JSON leaves unescaped inside strings (and a text-mode read turns a raw \\r into a
    line end), so a pair whose text held one was cut in two and silently skipped by the recovery."""
    return data.decode("utf-8", errors="replace").split("\n")


class PairSink:
    def __init__(self, queue, trajectories: Path | None = None, journal: Path | None = None,
                 journal_mb: float = 256.0):
        self.queue, self.trajectories, self.journal = queue, trajectories, journal
        self.journal_bytes = int(journal_mb * 2**20)
        self.depth = 0  # unacked pairs in the queue, as last seen (back-pressure)
        self.appended = self.duplicates = self.dropped_stale = self.recovered = 0

    async def write(self, rollouts: Sequence[Rollout]) -> None:
        """Append the pairs of `rollouts` (duplicates are dropped by the queue) and, if asked,
        every trajectory."""
        pairs = [r.pair for r in rollouts if r.pair is not None]
        if pairs:
            self._journal(pairs)
            added = await self.queue.append(pairs)
            self.appended += added
            self.duplicates += len(pairs) - added
            self.depth += added
        if self.trajectories is not None and rollouts:
            with open(self.trajectories, "a", encoding="utf-8") as f:
                for r in rollouts:
                    f.write(r.trajectory.model_dump_json() + "\n")

    def _journal(self, pairs: Sequence[PreferencePair]) -> None:
        if self.journal is None:
            return
        if self.journal.exists() and self.journal.stat().st_size > self.journal_bytes:
            os.replace(self.journal, self._previous)  # the older segment goes
        with open(self.journal, "a", encoding="utf-8") as f:
            f.write("".join(p.model_dump_json() + "\n" for p in pairs))
            f.flush()
            os.fsync(f.fileno())

    async def recover(self) -> int:
        """Re-append the journalled pairs the queue does not have; returns how many."""
        if self.journal is None:
            return 0
        lines = [ln for seg in (self._previous, self.journal) if seg.exists()
                 for ln in journal_lines(seg.read_bytes()) if ln.strip()]
        pairs: dict[str, str] = {}
        for ln in lines:
            try:
                pairs[PreferencePair.model_validate_json(ln).id] = ln
            except ValueError:  # a line torn by a crash mid-write: its pair was never appended
                continue
        gone = await self.queue.missing(list(pairs))
        if gone:
            log.warning("the queue lost %d of the %d pairs serve appended (e.g. a truncated SQLite WAL "
                        "or a Redis restart without AOF): appending them again", len(gone), len(pairs))
            self.recovered += await self.queue.append([PreferencePair.model_validate_json(pairs[i])
                                                       for i in gone])
        return len(gone)

    @property
    def _previous(self) -> Path:
        assert self.journal is not None
        return self.journal.with_name(self.journal.name + ".1")

    async def refresh_depth(self) -> int:
        self.depth = await self.queue.depth()
        return self.depth

    async def wait_below(self, max_depth: int, poll_s: float, stop: asyncio.Event | None = None) -> int:
        """Back-pressure, serve's only wait on the queue: until fewer than `max_depth` pairs are
        unacked (or `stop` is set). Starts from the depth last seen, so the common case costs no call."""
        while self.depth >= max_depth and not (stop is not None and stop.is_set()):
            await asyncio.sleep(poll_s)
            await self.refresh_depth()
        return self.depth

    async def refresh_stats(self) -> dict:
        """Depth and the consumer's stale drops, from the queue's counters."""
        s = await self.queue.stats()
        self.depth, self.dropped_stale = s["depth"], s["dropped_stale"]
        return s
