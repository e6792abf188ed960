"""The pair sink: the one place a pair is judged fresh enough and appended to the queue."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..act import Rollout
from ..types import PreferencePair


def fresh(pairs: Sequence[PreferencePair], version: int, max_staleness: int) -> list[PreferencePair]:
    """Pairs made by a policy at most `max_staleness` versions behind `version`."""
    floor = version - max_staleness
    return [p for p in pairs if p.policy_version >= floor]


class PairSink:
    def __init__(self, queue, max_staleness: int, trajectories: Path | None = None):
        self.queue, self.max_staleness, self.trajectories = queue, max_staleness, trajectories
        self.depth = 0  # unacked pairs in the queue, as last seen (back-pressure)
        self.appended = self.duplicates = self.dropped_stale = 0

    async def write(self, rollouts: Sequence[Rollout], version: int) -> None:
        """Append the fresh pairs of `rollouts` (duplicates are dropped by the queue) and, if
        asked, every trajectory."""
        pairs = [r.pair for r in rollouts if r.pair is not None]
        keep = fresh(pairs, version, self.max_staleness)
        self.dropped_stale += len(pairs) - len(keep)
        if keep:
            added = await self.queue.append(keep)
            self.appended += added
            self.duplicates += len(keep) - added
            self.depth += added
        if self.trajectories is not None and rollouts:
            with open(self.trajectories, "a", encoding="utf-8") as f:
                for r in rollouts:
                    f.write(r.trajectory.model_dump_json() + "\n")

    async def refresh_depth(self) -> int:
        self.depth = await self.queue.depth()
        return self.depth
