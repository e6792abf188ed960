"""In-context baselines for `simkit eval --icl-shots K`: K demonstrations from the env's tuning
pool, chosen at random or by similarity to the task (TF-IDF cosine), the model told it may answer
or ask."""
from __future__ import annotations

import math
import random
import re
from collections import Counter
from typing import Any, Sequence

from simkit.types import CLARIFY, Message, Task


def _bow(text: str) -> Counter:
    return Counter(re.findall(r"\w+", text.lower()))


class ShotSelector:
    """K-shot demonstrations from a pool: 'random' (seeded) or 'similar' (TF-IDF cosine)."""

    def __init__(self, pool: Sequence[Task], k: int, how: str = "random", seed: int = 0):
        self.pool, self.k, self.how, self.seed = list(pool), k, how, seed
        if how == "similar":
            docs = [_bow(self._query(t)) for t in self.pool]
            df = Counter(w for d in docs for w in d)
            n = len(docs)
            self._idf = {w: math.log((1 + n) / (1 + c)) + 1 for w, c in df.items()}
            self._vecs = [self._vec(d) for d in docs]

    @staticmethod
    def _query(t: Task) -> str:
        return next((m.content for m in reversed(t.prompt) if m.role == "user"), "")

    def _vec(self, bow: Counter) -> dict[str, float]:
        v = {w: c * self._idf.get(w, 1.0) for w, c in bow.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {w: x / norm for w, x in v.items()}

    def select(self, task: Task) -> list[Task]:
        cands = [i for i, t in enumerate(self.pool) if t.id != task.id]
        if self.how == "random":
            return [self.pool[i] for i in random.Random(f"{self.seed}-{task.id}").sample(cands, min(self.k, len(cands)))]
        q = self._vec(_bow(self._query(task)))
        sim = lambda i: sum(q.get(w, 0.0) * x for w, x in self._vecs[i].items())  # noqa: E731
        return [self.pool[i] for i in sorted(cands, key=lambda i: (-sim(i), i))[: self.k]]

    @staticmethod
    def as_messages(shots: Sequence[Task]) -> list[Message]:
        """Each shot as a worked conversation; clarifying shots include the user's reply and answer."""
        out: list[Message] = []
        for s in shots:
            out += [*s.prompt, Message(role="assistant", content=s.reference)]
            if s.gold_action == CLARIFY and s.user_reply:
                out += [Message(role="user", content=s.user_reply), Message(role="assistant", content=str(s.goal))]
        return out


class ICLPolicy:
    """Wraps a policy: prepends the task's K shots to the dialogue (after the system text)."""

    def __init__(self, policy: Any, selector: ShotSelector):
        self.policy, self.selector = policy, selector

    @property
    def model(self) -> str | None:
        return self.policy.model

    async def respond(self, messages, instruction=None, task=None, **kw):
        shots = ShotSelector.as_messages(self.selector.select(task))
        msgs = list(messages)
        at = 1 if msgs and msgs[0].role == "system" else 0
        note = Message(role="system", content="Here are example conversations. In each, the assistant either "
                                              "answers directly or asks a clarifying question when the request "
                                              "is ambiguous.")
        return await self.policy.respond(msgs[:at] + [note] + shots + msgs[at:], instruction, task=task, **kw)
