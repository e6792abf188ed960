"""Core data types: one episode as data (docs/DESIGN.md, "One episode, as data").

Everything that crosses a process boundary (queue, JSONL, HTTP) is a pydantic v2 model so it
validates on the way in and serialises the same way everywhere.
"""
from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Role = Literal["system", "user", "assistant"]


class Message(BaseModel):
    model_config = ConfigDict(frozen=True)
    role: Role
    content: str


def msgs(*pairs: tuple[str, str]) -> list[Message]:
    """Shorthand: msgs(("user", "hi"), ("assistant", "hello"))."""
    return [Message(role=r, content=c) for r, c in pairs]


# --------------------------------------------------------------------------- actions
class ActionSpace:
    """A registry of dialogue actions. ACT uses two; richer spaces register more names."""

    def __init__(self) -> None:
        self._actions: dict[str, str] = {}

    def register(self, name: str, description: str = "") -> str:
        name = name.upper()
        self._actions[name] = description
        return name

    def validate(self, name: str) -> str:
        up = str(name).upper()
        if up not in self._actions:
            raise ValueError(f"unknown action {name!r}; registered: {sorted(self._actions)}")
        return up

    def names(self) -> list[str]:
        return list(self._actions)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.upper() in self._actions


ACTIONS = ActionSpace()
CLARIFY = ACTIONS.register("CLARIFY", "ask the user a clarifying question")
ANSWER = ACTIONS.register("ANSWER", "answer the request directly")


def opposite(action: str) -> str:
    """The rejected action a' = S \\ {a} for a two-action space (ACT Algorithm 1)."""
    others = [a for a in (CLARIFY, ANSWER) if a != action]
    if len(others) != 1:
        raise ValueError(f"no single opposite for action {action!r}")
    return others[0]


# --------------------------------------------------------------------------- tasks
class Task(BaseModel):
    """One conversation turn to act on: p_i, r_i, a_i, g_i and what the simulator knows."""

    id: str
    env: str
    prompt: list[Message]  # context + dialogue so far + the user's query (no system text)
    reference: str  # r_i: the reference response at this turn
    gold_action: str  # a_i
    goal: Any = None  # g_i: the information goal (answer text, SQL, list of spans …)
    user_reply: str | None = None  # the user's answer to a clarifying question (grounding)
    grounding: dict[str, Any] = Field(default_factory=dict)  # simulator facts (intent, …)
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("gold_action")
    @classmethod
    def _known_action(cls, v: str) -> str:
        return ACTIONS.validate(v)

    @property
    def conversation_id(self) -> str:
        """The conversation (dialogue) this turn belongs to: `meta["conversation"]` or
        `meta["dialogue"]` when an env groups several turns into one dialogue (PACIFIC), else the
        task itself (AmbigSQL, Abg-CoQA and toy tasks are one conversation each)."""
        return str(self.meta.get("conversation") or self.meta.get("dialogue") or self.id)

    def gold_continuation(self) -> list[Message]:
        """The reference winner as chat messages. ANSWER: the reference answer. CLARIFY: the whole
        gold continuation — clarifying question, the user's clarification, the gold answer — as
        the authors' `data/base_dataset.py` builds it (only the question when the data has no
        user reply or no answer)."""
        out = [Message(role="assistant", content=self.reference)]
        answer = goal_text(self.goal)
        if self.gold_action == CLARIFY and self.user_reply and answer:
            out += [Message(role="user", content=self.user_reply), Message(role="assistant", content=answer)]
        return out

    def gold_continuation_text(self) -> str:
        """`gold_continuation()` as one text (message contents, one per line): the target of the
        turn-level content score of a CLARIFY turn (authors' metrics/base_metrics.py)."""
        return "\n".join(m.content for m in self.gold_continuation())


def goal_text(goal: Any) -> str:
    """An information goal as the text of a final answer (SQL, answer spans, ...)."""
    if isinstance(goal, str):
        return goal
    if isinstance(goal, (list, tuple)):
        return ", ".join(goal_text(g) for g in goal)
    if isinstance(goal, dict):
        for key in ("answer", "text", "sql", "query"):
            if key in goal:
                return goal_text(goal[key])
        return json.dumps(goal, ensure_ascii=False)
    return "" if goal is None else str(goal)


# --------------------------------------------------------------------------- replies
class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Reply(BaseModel):
    """What a role endpoint returned for one chat completion."""

    text: str
    model: str = ""  # the model/adapter name the server says served it
    usage: Usage = Field(default_factory=Usage)
    latency_s: float = 0.0
    finish_reason: str | None = None
    endpoint: str = ""
    policy_version: int | None = None  # stamped by `Policy`: the version whose adapter was asked


# --------------------------------------------------------------------------- trajectories
class Turn(BaseModel):
    role: Role
    text: str
    action: str | None = None  # classifier label for assistant turns
    model: str = ""  # served model / adapter name
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    policy_version: int | None = None  # the policy version that wrote this turn (assistant turns)

    @classmethod
    def assistant(cls, text: str, action: str | None, reply: "Reply | None" = None) -> "Turn":
        """An assistant turn, stamped with the reply's model, usage, latency and policy version."""
        if reply is None:
            return cls(role="assistant", text=text, action=action)
        return cls(role="assistant", text=text, action=action, model=reply.model,
                   prompt_tokens=reply.usage.prompt_tokens, completion_tokens=reply.usage.completion_tokens,
                   latency_s=reply.latency_s, policy_version=reply.policy_version)


class Trajectory(BaseModel):
    """A finished episode. status 'failed' means a role call gave up: counted, never dropped."""

    task_id: str
    env: str
    prompt: list[Message]
    turns: list[Turn] = Field(default_factory=list)
    gold_action: str
    first_action: str | None = None
    reward: float = 0.0  # trajectory-level score of the final answer against the goal
    turn_score: float | None = None  # first response against the reference winner (CLARIFY: the gold continuation)
    turn_score_question_only: float | None = None  # first response against the reference response alone
    terminated: bool = False
    truncated: bool = False
    status: Literal["ok", "failed"] = "ok"
    error: str | None = None
    policy_version: int | None = None  # the oldest version stamped on its turns (see Episode.trajectory)
    started_at: float = Field(default_factory=time.time)
    duration_s: float = 0.0
    info: dict[str, Any] = Field(default_factory=dict)

    @property
    def assistant_turns(self) -> list[Turn]:
        return [t for t in self.turns if t.role == "assistant"]

    @property
    def final_answer(self) -> str | None:
        a = self.assistant_turns
        return a[-1].text if a else None

    def continuation(self) -> list[Message]:
        """The episode after the prompt, as chat messages (a DPO 'chosen'/'rejected')."""
        return [Message(role=t.role, content=t.text) for t in self.turns]


# --------------------------------------------------------------------------- pairs
# Where one side of a pair comes from: the data's reference, the policy forced to take an action
# (first try / the stronger retry / the authors' fallback), the few-shot loser generator, or a
# sample of the current policy (Phase 2).
SIDE_SOURCES = ("reference", "forced", "retried", "fallback", "generator", "on-policy")


def contrast_of(chosen_action: str | None, rejected_action: str | None) -> Literal["action", "content"] | None:
    """"action" when the two sides take different actions (ask vs answer), "content" when they
    take the same one (SQL vs SQL); None when either action is unknown."""
    if not chosen_action or not rejected_action:
        return None
    return "action" if chosen_action != rejected_action else "content"


class PreferencePair(BaseModel):
    """TRL's conversational prompt/chosen/rejected columns plus provenance metadata."""

    id: str = ""
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    gold_action: str
    rejected_action: str | None = None
    policy_version: int = 0
    adapter: str = ""
    env: str = ""
    task_id: str = ""
    phase: int = 1
    source: str = ""  # how the pair was made: "forced", "random-flip", "wrong-action", "irpo", ...
    score: float | None = None
    # provenance of each side (defaults: pairs written before these fields still load)
    chosen_action: str | None = None  # the action the chosen side takes (its first assistant turn)
    contrast: Literal["action", "content"] | None = None  # sides take different actions / the same one
    chosen_source: str = ""  # one of SIDE_SOURCES ("" = not recorded)
    rejected_source: str = ""
    turn: int = 0  # user turn of the conversation: 0 = the first, 1 = the one after the clarification
    created_at: float = Field(default_factory=time.time)
    meta: dict[str, Any] = Field(default_factory=dict)

    def model_post_init(self, __context: Any) -> None:
        if not self.id:
            self.id = self.content_id()

    def content_id(self) -> str:
        """Idempotent id: the same pair content always gets the same id (dedup on append)."""
        body = json.dumps(
            [self.task_id, self.policy_version, self.phase,
             [m.model_dump() for m in self.prompt],
             [m.model_dump() for m in self.chosen],
             [m.model_dump() for m in self.rejected]],
            sort_keys=True, ensure_ascii=False,
        )
        return hashlib.sha1(body.encode()).hexdigest()[:20]

    @property
    def kind(self) -> str:
        """The contrast kind, derived for pairs written before `contrast` existed (a Phase 1
        pair's winner takes the gold action); "unknown" when it cannot be told."""
        if self.contrast:
            return self.contrast
        chosen = self.chosen_action or (self.gold_action if self.phase == 1 else None)
        return contrast_of(chosen, self.rejected_action) or "unknown"

    def to_trl(self) -> dict[str, Any]:
        """Row for TRL DPOTrainer's conversational format."""
        return {
            "prompt": [m.model_dump() for m in self.prompt],
            "chosen": [m.model_dump() for m in self.chosen],
            "rejected": [m.model_dump() for m in self.rejected],
        }


def new_id() -> str:
    return uuid.uuid4().hex[:16]
