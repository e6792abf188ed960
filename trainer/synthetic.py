"""Preference pairs from the built-in toy env, for tests, benches and smoke runs (no servers)."""
from __future__ import annotations

from simkit.types import ANSWER, CLARIFY, Message, PreferencePair


def toy_pairs(n: int, *, version: int = 0, offset: int = 0, size: int | None = None) -> list[PreferencePair]:
    """n ACT Phase-1-style pairs: chosen = the reference action's reply, rejected = the other action's."""
    from simkit.env import make

    env = make("toy", size=size or max(2, n + offset))
    tasks = env.tasks("train")[offset:offset + n]
    out = []
    for t in tasks:
        if t.gold_action == CLARIFY:
            wrong = t.goal  # answers without asking
        else:
            wrong = "Which one do you mean?"
        out.append(PreferencePair(
            prompt=[Message(role="system", content=env.system_prompt), *t.prompt],
            chosen=[Message(role="assistant", content=t.reference)],
            rejected=[Message(role="assistant", content=str(wrong))],
            gold_action=t.gold_action, rejected_action=ANSWER if t.gold_action == CLARIFY else CLARIFY,
            policy_version=version, env="toy", task_id=t.id, phase=1, source="synthetic"))
    return out
