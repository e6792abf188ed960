"""Which training conversations a run uses: ONE helper for every command.

The paper's "n" counts training *conversations* (dialogues), not turns. `trainer sft`,
`simkit pairs build`, `simkit serve` and `simkit eval --n-conversations` all call
`sample_conversations`, so the same (env, split, n, seed) gives the same conversations to the SFT
baseline and to ACT.

* A conversation is `Task.conversation_id`: a PACIFIC dialogue groups all its turns; an AmbigSQL,
  Abg-CoQA or toy task is one conversation by itself. A sampled conversation brings all its turns.
* The sample is a seeded random draw **stratified by gold action**: a conversation's stratum is
  CLARIFY when any of its turns has gold action CLARIFY, else ANSWER; each stratum gets its
  proportional share (largest remainder), so the CLARIFY share of the sample matches the split's.
* Asking for more conversations than the split holds is an error (`TooFewConversations`), never a
  silent "use them all": a recipe that says n=250 must train on 250.
* The chosen conversation ids are recorded (`ConversationSample.write`, `conversations.json` in the
  run directory) with the seed, the strata and the CLARIFY shares.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from simkit.types import CLARIFY, Task

T = TypeVar("T")
FILE = "conversations.json"


class TooFewConversations(ValueError):
    """n exceeds the number of conversations in the split."""


def stratified_sample(groups: dict[str, str], n: int, seed: int | str) -> list[str]:
    """`n` keys of `groups` (key -> stratum), seeded, each stratum in proportion to its size.

    Order: the keys' order in `groups` (the split's order), so the sample reads like the data."""
    if n > len(groups):
        raise TooFewConversations(f"asked for {n} conversations but there are only {len(groups)}")
    if n < 0:
        raise ValueError("n must be >= 0")
    strata: dict[str, list[str]] = {}
    for key, s in groups.items():
        strata.setdefault(s, []).append(key)
    total = len(groups)
    exact = {s: n * len(keys) / total for s, keys in strata.items()}
    alloc = {s: int(x) for s, x in exact.items()}
    # largest remainder; ties broken by stratum name so the allocation is deterministic
    for s in sorted(strata, key=lambda s: (-(exact[s] - alloc[s]), s))[: n - sum(alloc.values())]:
        alloc[s] += 1
    rng = random.Random(f"simkit-conversations-{seed}")
    chosen: set[str] = set()
    for s in sorted(strata):
        chosen.update(rng.sample(strata[s], alloc[s]))
    return [k for k in groups if k in chosen]


def _stratum(tasks: Sequence[Task]) -> str:
    return CLARIFY if any(t.gold_action == CLARIFY for t in tasks) else "ANSWER"


@dataclass
class ConversationSample:
    """The outcome of `sample_conversations`: the tasks to use and the record of how."""

    tasks: list[Task]
    conversation_ids: list[str]
    n_requested: int | None
    n_available: int
    seed: int | str
    env: str = ""
    split: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        share = lambda ts: round(sum(t.gold_action == CLARIFY for t in ts) / len(ts), 4) if ts else None  # noqa: E731
        return {"env": self.env, "split": self.split, "seed": self.seed, "n_conversations": len(self.conversation_ids),
                "n_requested": self.n_requested, "n_available": self.n_available, "n_turns": len(self.tasks),
                "clarify_share_turns": share(self.tasks), **self.info,
                "conversation_ids": self.conversation_ids}

    def write(self, path: str | Path) -> Path:
        """Write the record (conversation ids, seed, strata); a directory gets `conversations.json`."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            path = path / FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.record(), indent=1))
        return path


def sample_conversations(tasks: Sequence[Task], n: int | None, seed: int | str = 0, *, env: str = "",
                         split: str = "") -> ConversationSample:
    """The n-conversation training sample of a split (every conversation when n is None).

    Raises `TooFewConversations` when n exceeds the split's conversations."""
    by_conv: dict[str, list[Task]] = {}
    for t in tasks:
        by_conv.setdefault(t.conversation_id, []).append(t)
    strata = {cid: _stratum(ts) for cid, ts in by_conv.items()}
    if n is None:
        ids = list(by_conv)
    else:
        try:
            ids = stratified_sample(strata, n, seed)
        except TooFewConversations:
            raise TooFewConversations(
                f"{env or 'env'}:{split or 'split'} has {len(by_conv)} conversations ({len(tasks)} turns); "
                f"cannot sample {n}") from None
    keep = set(ids)
    chosen = [t for t in tasks if t.conversation_id in keep]
    count = lambda ids_: sum(strata[c] == CLARIFY for c in ids_)  # noqa: E731
    info = {"strata": {"CLARIFY": count(ids), "ANSWER": len(ids) - count(ids)},
            "clarify_share_conversations": round(count(ids) / len(ids), 4) if ids else None,
            "split_clarify_share_conversations": round(count(strata) / len(strata), 4) if strata else None}
    return ConversationSample(chosen, ids, n, len(by_conv), seed, env, split, info)


def sample_items(items: Sequence[T], n: int | None, seed: int | str = 0,
                 stratum: Callable[[T], str] = lambda _: "") -> list[T]:
    """The same draw over arbitrary items, one conversation each (e.g. JSONL lines for SFT)."""
    if n is None:
        return list(items)
    keys = {str(i): stratum(x) for i, x in enumerate(items)}
    chosen = set(stratified_sample(keys, n, seed))
    return [x for i, x in enumerate(items) if str(i) in chosen]


def conversations_help(what: str = "conversations") -> str:
    """The one wording every CLI uses for the n option."""
    return (f"use N {what} (dialogues, not turns) of the split: a seeded random sample stratified by gold action "
            "(the CLARIFY share matches the split), the same for the same --seed in `trainer sft`, `pairs build`, "
            "`serve` and `eval`; the chosen ids are written to conversations.json. An error if N exceeds the "
            "split's conversations. Default: all")
