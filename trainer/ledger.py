"""Exactly-once training over an at-least-once queue: which pairs are in which checkpoint.

A pair is *committed* when a checkpoint whose weights include its gradient step is durable.
Only then is it acked on the queue. The order, and what a crash at each point leaves:

1. steps run; their pair ids collect here (leases renewed so they cannot expire meanwhile);
2. the Trainer writes `checkpoint-N/` (adapter, optimizer, scheduler, RNG, trainer state);
   crash here → no marker → restart ignores (deletes) `checkpoint-N`, resumes from the previous
   committed checkpoint and `release(consumer)`s its leases: those pairs are trained again from
   the state that never saw them (none lost, none in the weights twice);
3. `checkpoint-N/simkit_commit.json` is written atomically (tmp + rename) with the ids trained
   since the previous commit: this is the commit point;
4. the ids are acked; crash between 3 and 4 → restart acks the marker's ids before leasing;
5. `trained_pairs.jsonl` (an audit log: one line per commit) is appended; repaired on restart.

A queue outage during 4 (a Redis restart) is ridden through by the queue client: the ack is
retried until it goes through (acks are idempotent, so a redone one never double-counts), or,
past --queue-outage-s, the trainer stops and the restart acks the marker (case 3-4 above).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from simkit.queue import Lease

log = logging.getLogger("trainer")
MARKER = "simkit_commit.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def atomic_write_json(path: Path, obj: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := _CKPT.match(p.name))]
    return sorted(out)


def read_marker(ckpt: Path) -> dict | None:
    try:
        return json.loads((ckpt / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def latest_committed(ckpt_dir: Path, remove_uncommitted: bool = True) -> tuple[Path, dict] | None:
    """The newest checkpoint with a commit marker; newer ones without a marker (a crash while
    saving) are deleted so the Trainer never picks them up."""
    found = None
    for step, path in reversed(checkpoints(ckpt_dir)):
        marker = read_marker(path)
        if marker is not None:
            found = (path, marker)
            break
        if remove_uncommitted:
            log.warning("removing uncommitted checkpoint %s (the run died while saving it)", path)
            shutil.rmtree(path, ignore_errors=True)
    return found


@dataclass
class Ledger:
    """In-memory book of the current run (one process)."""

    queue: object
    run_dir: Path
    lease_s: float
    committed_total: int = 0  # pairs acked by all commits so far (this run dir)
    last_commit_step: int = 0
    _leases: dict[str, Lease] = field(default_factory=dict)  # leases with pairs not yet committed
    _pending: list[tuple[str, int]] = field(default_factory=list)  # pairs of the step in progress
    _trained: list[str] = field(default_factory=list)  # trained since the last commit
    _done: set[str] = field(default_factory=set)  # settled ids (committed, skipped, returned) of open leases
    skipped_total: int = 0  # consumed without training (e.g. prompt longer than max_length)
    last_step_pairs: list[tuple[str, int]] = field(default_factory=list)

    # ---- feed side
    def on_lease(self, lease: Lease) -> None:
        self._leases[lease.id] = lease

    def on_skip(self, pair, reason: str) -> None:
        """A pair that can never be trained (too long, malformed) is acked at once: no weights
        depend on it, so no checkpoint has to hold it (a crash just skips it again)."""
        log.warning("pair %s skipped: %s", pair.id, reason)  # first: the log names every pair acked untrained
        self.queue.ack([pair.id])
        self._done.add(pair.id)
        self.skipped_total += 1

    def on_return(self, ids: list[str]) -> None:
        """Leased pairs handed back untrained (the budget was met first): next in line again."""
        log.info("returning %d leased pairs to the queue untrained", len(ids))
        self.queue.nack(ids)
        self._done.update(ids)

    # ---- train side
    def on_micro_batch(self, pairs: list[tuple[str, int]]) -> None:
        self._pending.extend(pairs)

    def on_step_end(self) -> list[tuple[str, int]]:
        """The optimizer step consumed the pending pairs; returns them (id, policy_version)."""
        step_pairs, self._pending = self._pending, []
        self._trained.extend(pid for pid, _ in step_pairs)
        self.last_step_pairs = step_pairs
        self._renew_leases()
        return step_pairs

    @property
    def uncommitted(self) -> int:
        return len(self._trained)

    def _renew_leases(self) -> None:
        soon = time.time() + self.lease_s / 2
        for lease in self._leases.values():
            if lease.expires_at < soon:
                try:
                    self.queue.renew(lease, self.lease_s)
                except NotImplementedError:
                    return

    # ---- commit
    def commit(self, ckpt: Path, step: int, **extra) -> dict:
        """Write the marker into the just-saved checkpoint, then ack (steps 3-5 above)."""
        trained = list(self._trained)
        marker = {"step": step, "parent_step": self.last_commit_step, "pair_ids": trained,
                  "committed_total": self.committed_total + len(trained), "time": time.time(), **extra}
        atomic_write_json(ckpt / MARKER, marker)
        self.apply(marker)
        self._trained.clear()
        self._done.update(trained)
        self._leases = {lid: l for lid, l in self._leases.items() if not set(l.ids) <= self._done}
        if not self._leases:
            self._done.clear()
        return marker

    def apply(self, marker: dict) -> int:
        """Ack a marker's pairs (idempotent) and make sure the audit log has its line."""
        ids = list(marker["pair_ids"])
        n = self.queue.ack(ids) if ids else 0
        self.committed_total = marker["committed_total"]
        self.last_commit_step = marker["step"]
        audit = self.run_dir / "trained_pairs.jsonl"
        if marker["step"] not in self.audited_steps():
            with open(audit, "a") as f:
                f.write(json.dumps({"step": marker["step"], "parent_step": marker["parent_step"],
                                    "pair_ids": marker["pair_ids"]}) + "\n")
        return n

    def audited_steps(self) -> set[int]:
        audit = self.run_dir / "trained_pairs.jsonl"
        if not audit.exists():
            return set()
        return {json.loads(line)["step"] for line in audit.read_text().splitlines() if line.strip()}

    def restore(self, marker: dict | None, consumer: str) -> int:
        """On (re)start: ack what the last committed checkpoint trained, give back every other
        lease of this consumer. Returns how many pairs were released."""
        if marker is not None:
            self.apply(marker)
        return self.queue.release(consumer)


def rotate(ckpt_dir: Path, keep: int) -> None:
    """Delete old committed checkpoints, newest `keep` stay (never touches uncommitted ones)."""
    committed = [(s, p) for s, p in checkpoints(ckpt_dir) if read_marker(p) is not None]
    for _, path in committed[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
