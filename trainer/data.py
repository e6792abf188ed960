"""Queue → tokenised DPO examples, on the fly.

`QueueSource` is a torch IterableDataset over the pair queue: it leases a batch at a time,
tokenises each pair exactly as TRL's `DPOTrainer` tokenises a conversational dataset, and yields
examples carrying their pair id, so that the ids of every optimizer step are known (and acked
only once that step is in a committed checkpoint, see `ledger.py`).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import torch
from trl.data_utils import common_prefix_length

from simkit.types import PreferencePair

from .distributed import Dist

log = logging.getLogger("trainer")
META = "_pairs"  # batch key with [PairRef(pair id, policy version)]; popped before the model sees the batch


class PairRef(tuple):
    """(pair id, policy version) — what the ledger books — carrying the pair's contrast kind
    ("action": the sides take different actions, "content": the same one; `PreferencePair.kind`)
    as an attribute, so code that unpacks two fields keeps working."""

    def __new__(cls, pair_id: str, version: int, kind: str = "unknown") -> "PairRef":
        ref = super().__new__(cls, (pair_id, version))
        ref.kind = kind
        return ref

    def __reduce__(self):  # pickles (data-parallel broadcasts) with its kind
        return (PairRef, (self[0], self[1], self.kind))


def _ids(tokenizer, messages: list[dict], **kw: Any) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)
    return list(out["input_ids"])


def tokenize_pair(tokenizer, row: dict, max_length: int | None, completion_tokens: int | None = None) -> dict | None:
    """TRL `DPOTrainer._prepare_dataset` for one conversational row: prompt ids (with the generation
    prompt), chosen / rejected ids after the common prefix. None when the prompt alone fills
    `max_length` (TRL drops those rows: no completion token would survive truncation).
    `completion_tokens` keeps only the first K completion tokens of each side (`--action-tokens`)."""
    prompt_ids = _ids(tokenizer, row["prompt"], add_generation_prompt=True)
    chosen = _ids(tokenizer, row["prompt"] + row["chosen"])
    rejected = _ids(tokenizer, row["prompt"] + row["rejected"])
    n = min(common_prefix_length(prompt_ids, chosen), common_prefix_length(prompt_ids, rejected))
    if max_length is not None and n >= max_length:
        return None
    end = None if completion_tokens is None else n + completion_tokens
    return {"prompt_ids": prompt_ids[:n], "chosen_ids": chosen[n:end], "rejected_ids": rejected[n:end]}


class PairCollator:
    """TRL's preference collator, plus the `PairRef` list of the pairs in the batch. It also tallies
    the contrast kinds it collated (`drain_kinds`): the Trainer collates a step's micro-batches
    right before training them, so the tally read when the step is logged is that step's mix
    (trainer/metrics.py logs it next to TRL's batch `rewards/margins`)."""

    def __init__(self, collator: Callable[[list[dict]], dict]):
        self.collator = collator
        self.kinds: Counter = Counter()

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collator([{k: e[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for e in examples])
        refs = [PairRef(e["pair_id"], e["policy_version"], e.get("kind", "unknown")) for e in examples]
        refs += [peer if isinstance(peer, PairRef) else PairRef(*peer)  # data parallel: rank 0 books all
                 for e in examples for peer in e.get("peers", ())]
        self.kinds.update(r.kind for r in refs)
        batch[META] = refs
        return batch

    def drain_kinds(self) -> Counter:
        """The kinds collated since the last call (then forgotten)."""
        kinds, self.kinds = self.kinds, Counter()
        return kinds


class QueueSource(torch.utils.data.IterableDataset):
    """Lease → tokenise → yield, until exactly `budget()` examples were yielded or `stop` is set.

    The budget counts trainable examples, not leased pairs: pairs skipped as too long or stale do
    not use it up, so an iteration always covers whole optimizer steps (the Trainer restarts its
    step count with each iteration, and one that ended mid-step would never reach a sync step).
    Leased pairs that were not yielded (the rest of a lease once the budget is met, the feeder's
    lookahead) go back to the queue at once (`on_return`, by default the queue's `nack`).

    A feeder thread leases and tokenises up to `prefetch` batches ahead of the batch being trained
    (one by default: the next batch is ready when the step ends, and at most one extra batch is
    leased-but-untrained at any time). The ledger callbacks `on_lease(lease)` and
    `on_skip(pair, reason)` run on the consuming (training) thread, when a lease's first example is
    taken. While the queue is empty the feeder polls every `poll_s`; once the training thread has
    waited `idle_timeout_s` for a pair, iteration ends and `idle` is set (a clean end of the run).

    Staleness: `min_version()` is applied twice — when leasing (the queue drops older pairs) and
    again when an example is handed to the trainer, because a batch leased ahead may have been
    made by a version that was replaced meanwhile. A pair found stale then is consumed without
    training (`on_skip`, counted in `stale_skipped`), so with min_version = the current version (the
    sync schedule) no step ever trains on a pair older than the policy version in force.

    Data parallel (`dist.world > 1`, see `distributed.py`): only rank 0 has a queue; it gathers
    global micro-batches of `lease_n` examples (batch_size x world), broadcasts each, and every
    rank yields its slice; rank 0's examples carry the other ranks' ids (`peers`) for the ledger.
    """

    def __init__(self, queue, tokenizer, *, lease_n: int, budget: Callable[[], int], stop: threading.Event,
                 on_lease: Callable | None, on_skip: Callable | None, on_return: Callable | None = None,
                 consumer: str = "trainer", lease_s: float = 3600.0,
                 poll_s: float = 0.5, max_length: int | None = None, idle_timeout_s: float | None = None,
                 action_tokens: int | None = None, min_version: Callable[[], int | None] = lambda: None,
                 prefetch: int = 1, dist: Dist = Dist()):
        super().__init__()
        self.dist = dist
        self.queue, self.tokenizer = queue, tokenizer
        self.lease_n, self.budget, self.stop = lease_n, budget, stop
        self.on_lease, self.on_skip = on_lease, on_skip
        self.on_return = on_return or (lambda ids: queue.nack(ids))
        self.consumer, self.lease_s, self.poll_s = consumer, lease_s, poll_s
        self.max_length, self.idle_timeout_s, self.min_version = max_length, idle_timeout_s, min_version
        self.action_tokens = action_tokens  # keep only the first K tokens of each side of an action pair
        self.prefetch = max(1, prefetch)
        self.idle = False  # set when the source stopped because of idle_timeout_s
        self.stale_skipped = 0  # leased pairs found stale when about to be trained
        self._feeders: list[_Feeder] = []

    def __iter__(self) -> Iterator[dict]:
        if not self.dist.is_main:
            yield from self._follow()
            return
        if self.dist.world == 1:
            yield from self._lead()
            return
        group: list[dict] = []
        for ex in self._lead():
            group.append(ex)
            if len(group) == self.lease_n:
                yield from self._scatter(group)
                group = []
        # the data ended (stop, idle, budget): tell the other ranks; a partial group is not trained.
        # (When the Trainer stops pulling at max_steps, every rank stops at the same micro-batch.)
        self.dist.bcast(None)

    def _scatter(self, group: list[dict]) -> Iterator[dict]:
        """Rank 0: broadcast one global micro-batch, yield slice 0 annotated with the peers' ids."""
        self.dist.bcast(group)
        n, world = len(group) // self.dist.world, self.dist.world
        for j, ex in enumerate(group[:n]):
            peers = [PairRef(group[r * n + j]["pair_id"], group[r * n + j]["policy_version"],
                             group[r * n + j].get("kind", "unknown")) for r in range(1, world)]
            yield {**ex, "peers": peers}

    def _follow(self) -> Iterator[dict]:
        """Rank > 0: this rank's slice of each global micro-batch rank 0 broadcasts, until None."""
        while True:
            group = self.dist.bcast(None)
            if group is None:
                return
            n = len(group) // self.dist.world
            yield from group[self.dist.rank * n:(self.dist.rank + 1) * n]

    def _lead(self) -> Iterator[dict]:
        remaining = self.budget()
        if remaining <= 0:
            return
        feeder = _Feeder(self)
        self._feeders.append(feeder)
        pending: list[dict] = []  # the current lease's examples not yielded yet
        try:
            while remaining > 0 and not self.stop.is_set():
                item = feeder.get()
                if item is None:
                    return
                lease, pending, skipped = item
                self.on_lease(lease)
                for pair, reason in skipped:
                    self.on_skip(pair, reason)
                while pending and remaining > 0:
                    ex = pending.pop(0)
                    floor = self.min_version()
                    if floor is not None and ex["policy_version"] < floor:
                        self.stale_skipped += 1
                        self.on_skip(SimpleNamespace(id=ex["pair_id"]),
                                     f"stale: made by v{ex['policy_version']}, oldest allowed v{floor}")
                        continue
                    remaining -= 1
                    yield ex
        finally:
            feeder.close()  # returns its lookahead
            if pending:
                self.on_return([ex["pair_id"] for ex in pending])

    def close(self) -> None:
        """Stop every feeder thread (call before releasing the consumer's leases)."""
        for f in self._feeders:
            f.close()
        self._feeders.clear()

    def load(self, pairs: list[PreferencePair]) -> tuple[list[dict], list[tuple[PreferencePair, str]]]:
        examples, skipped = [], []
        for pair in pairs:
            try:
                k = self.action_tokens if pair.kind == "action" else None
                ex = tokenize_pair(self.tokenizer, pair.to_trl(), self.max_length, completion_tokens=k)
            except Exception as e:  # a malformed pair must not kill the run; it is consumed and counted
                skipped.append((pair, f"tokenize: {e}"))
                continue
            if ex is None:
                skipped.append((pair, "prompt longer than max_length"))
                continue
            ex.update(pair_id=pair.id, policy_version=int(pair.policy_version), kind=pair.kind)
            examples.append(ex)
        return examples, skipped


class _Feeder:
    """One background thread per iteration: lease + tokenise ahead (`prefetch` leases), hand over
    through a queue; `close` returns to the queue what was leased but never handed over."""

    _END = object()

    def __init__(self, src: QueueSource):
        import queue as _q

        self.src = src
        self.out: _q.Queue = _q.Queue()
        self.slots = threading.Semaphore(src.prefetch)
        self.closed = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="trainer-feeder", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        src = self.src
        try:
            while not self.closed.is_set() and not src.stop.is_set():
                if not self.slots.acquire(timeout=src.poll_s):
                    continue
                lease = src.queue.lease(src.lease_n, consumer=src.consumer, lease_s=src.lease_s,
                                        min_version=src.min_version())
                if not lease:
                    self.slots.release()
                    self.closed.wait(src.poll_s)
                    continue
                self.out.put((lease, *src.load(lease.pairs)))
        except BaseException as e:  # surfaced on the training thread
            self.error = e
        finally:
            self.out.put(self._END)

    def get(self):
        """The next (lease, examples, skipped); None at the end: feeder done, `stop` set, or the
        training thread waited `idle_timeout_s` for a pair (then `src.idle` is set)."""
        import queue as _q

        waiting_since = time.monotonic()
        while True:
            try:
                item = self.out.get(timeout=min(0.25, self.src.poll_s))
            except _q.Empty:
                if self.src.stop.is_set():
                    return None
                idle = self.src.idle_timeout_s
                if idle is not None and time.monotonic() - waiting_since > idle:
                    log.info("no new pairs for %.1fs: stopping", idle)
                    self.src.idle = True
                    return None
                continue
            if item is self._END:
                if self.error is not None:
                    raise RuntimeError(f"pair feeder failed: {self.error}") from self.error
                return None
            self.slots.release()
            return item

    def close(self) -> None:
        import queue as _q

        self.closed.set()
        self.slots.release()
        self.thread.join(timeout=60)
        ids = []
        while True:
            try:
                item = self.out.get_nowait()
            except _q.Empty:
                break
            if item is not self._END:
                ids += item[0].ids
        if ids:
            self.src.on_return(ids)
