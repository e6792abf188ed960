"""The task cursor: a seeded order per epoch, a resume watermark, and transient-failure retries.

The watermark is a low-water mark: every position below it is finished (its pair in the queue,
or its episode given up on), so a restart resumes there and redoes only what was in flight. A
slot's outcome is final once `run` returns: a transient failure (a role that gave up) is retried
in-process a few times, and then the slot is done as failed, counted, never parked. So the
watermark always advances, whatever fails.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Iterator, Sequence

from simkit.act.contrast import Rollout
from simkit.types import PreferencePair, Task


@dataclass(frozen=True)
class Slot:
    """One unit of work: a D_pref entry (None for IRPO) and its task, at (epoch, position)."""

    epoch: int
    position: int
    base: PreferencePair | None
    task: Task


class CursorState:
    """`state.json`: epoch + watermark position, episode and pair counts across restarts."""

    def __init__(self, path: Path):
        self.path = path
        d = json.loads(path.read_text()) if path.exists() else {}
        self.epoch, self.position = d.get("epoch", 0), d.get("position", 0)
        self.episodes, self.pairs = d.get("episodes", 0), d.get("pairs", 0)
        self.restarts = d.get("restarts", -1) + 1

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"epoch": self.epoch, "position": self.position, "episodes": self.episodes,
                                   "pairs": self.pairs, "restarts": self.restarts, "saved_at": time.time()}))
        os.replace(tmp, self.path)


def is_transient(r: Rollout) -> bool:
    """A failure worth another try: a role call that gave up (overload, timeouts, a restart).
    An env hook that raised (a scoring bug) would fail the same way again."""
    return r.status == "failed" and r.trajectory.info.get("failure") == "role"


class TaskCursor:
    def __init__(self, state_path: Path, items: Sequence[PreferencePair], tasks: dict[str, Task], *, seed: int,
                 max_epochs: int | None = None, max_episodes: int | None = None, retries: int = 2,
                 retry_backoff_s: float = 0.5):
        self.state = CursorState(state_path)
        self.items, self.tasks, self.seed = list(items), tasks, seed
        self.max_epochs, self.max_episodes = max_epochs, max_episodes
        self.retries, self.retry_backoff_s = retries, retry_backoff_s
        self.started = 0
        self.retried = 0
        self._episodes_at_start = self.state.episodes
        self._done: set[tuple[int, int]] = set()
        self.state.save()  # a (re)start counts now, not at the next watermark move (which may never come)

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        random.Random(f"{self.seed}-{epoch}").shuffle(order)
        return order

    def slots(self, stop: asyncio.Event) -> Iterator[Slot]:
        """Slots from the watermark on, until `stop`, `max_epochs` or `max_episodes` (which
        counts across restarts)."""
        epoch = self.state.epoch
        while not stop.is_set() and (self.max_epochs is None or epoch < self.max_epochs):
            order = self._order(epoch)
            start = self.state.position if epoch == self.state.epoch else 0
            for pos in range(start, len(order)):
                if stop.is_set():
                    return
                if self.max_episodes is not None and self.started >= self.max_episodes - self._episodes_at_start:
                    return
                self.started += 1
                item = self.items[order[pos]]
                base = item if isinstance(item, PreferencePair) else None
                yield Slot(epoch, pos, base, self.tasks[item.task_id])
            epoch += 1

    async def run(self, slot: Slot, fn: Callable[[Slot], Awaitable[Rollout]]) -> Rollout:
        """`fn(slot)`, retried in-process while it fails transiently (up to `retries` more tries)."""
        r = await fn(slot)
        for attempt in range(self.retries):
            if not is_transient(r):
                break
            self.retried += 1
            await asyncio.sleep(self.retry_backoff_s * 2 ** attempt)
            r = await fn(slot)
        r.trajectory.info.update(epoch=slot.epoch, position=slot.position)
        return r

    def commit(self, finished: Sequence[Rollout]) -> None:
        """Record finished slots (their pairs already appended), move the watermark over the
        contiguous finished positions, and save the state file."""
        st = self.state
        for r in finished:
            info = r.trajectory.info
            self._done.add((info["epoch"], info["position"]))
            st.episodes += 1
            st.pairs += r.pair is not None or bool(r.dropped)
        while (st.epoch, st.position) in self._done:
            self._done.discard((st.epoch, st.position))
            st.position += 1
            if st.position >= len(self.items):
                st.epoch, st.position = st.epoch + 1, 0
        st.save()

    @property
    def parked(self) -> int:
        """Finished positions above the watermark (waiting for an earlier one still in flight)."""
        return len(self._done)
