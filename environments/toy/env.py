"""`toy`: a tiny synthetic clarify-or-answer task, built in for tests, demos and load tests.

Half the questions are ambiguous ("How tall is it?" with several referents in the context:
gold CLARIFY, the user then names one); the other half name their referent (gold ANSWER).
Score: bag-of-tokens F1 of the answer against the goal.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from typing import Any

from pydantic import Field

from simkit.env import Env, EnvConfig, register
from simkit.types import ANSWER, CLARIFY, Message, Task

_THINGS = [("the oak", "20 meters"), ("the tower", "300 meters"), ("the fence", "2 meters"),
           ("the bridge", "45 meters"), ("the mast", "12 meters"), ("the statue", "93 meters")]


def token_f1(prediction: str, target: str) -> float:
    p = re.findall(r"\w+", prediction.lower())
    t = re.findall(r"\w+", str(target).lower())
    if not p or not t:
        return float(p == t)
    common = sum((Counter(p) & Counter(t)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(t)
    return 2 * prec * rec / (prec + rec)


class ToyConfig(EnvConfig):
    size: int = Field(200, ge=1, description="train tasks (test gets a quarter)")


@register("toy")
class ToyEnv(Env):
    success_threshold = 0.5
    metric_name = "F1"
    Config = ToyConfig

    def __init__(self, size: int = 200, **kw: Any):
        super().__init__(size=size, **kw)
        self.size = self.config.size

    def load_splits(self) -> dict[str, list[Task]]:
        return {split: self._make(split, n) for split, n in (("train", self.size), ("test", max(1, self.size // 4)))}

    def _make(self, split: str, n: int) -> list[Task]:
        rng = random.Random(f"{self.seed}-{split}")
        out = []
        for i in range(n):
            a, b = rng.sample(_THINGS, 2)
            context = f"Context: {a[0]} is {a[1]} tall and {b[0]} is {b[1]} tall."
            if i % 2 == 0:
                q = "How tall is it?"
                out.append(Task(id=f"toy-{split}-{i}", env="toy", gold_action=CLARIFY,
                                prompt=[Message(role="user", content=f"{context}\n{q}")],
                                reference=f"Do you mean {a[0]} or {b[0]}?", goal=a[1],
                                user_reply=f"I mean {a[0]}.", grounding={"wants": f"height of {a[0]}"}))
            else:
                q = f"How tall is {b[0]}?"
                out.append(Task(id=f"toy-{split}-{i}", env="toy", gold_action=ANSWER,
                                prompt=[Message(role="user", content=f"{context}\n{q}")],
                                reference=b[1], goal=b[1]))
        return out

    async def score(self, prediction: str, target: Any, task: Task) -> float:
        return token_f1(prediction, target)
