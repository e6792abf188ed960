"""The three agents of an episode: policy, action classifier, user simulator.

Each has an LLM implementation (over a `RoleClient`) and an offline one, so every path runs
without a model: `RuleClassifier` and `GroundedSimulator` need no server at all.
"""
from __future__ import annotations

import re
from string import Template
from typing import Any, Protocol, Sequence

from simkit import prompts
from simkit.roles.client import RoleClient
from simkit.types import ANSWER, CLARIFY, Message, Reply, Task


def _compile(text: str) -> list:
    """A `string.Template` as [literal, (name, original), literal, ...] so rendering is one join."""
    parts: list = []
    pos = 0
    for m in Template.pattern.finditer(text):
        parts.append(text[pos:m.start()])
        name = m.group("named") or m.group("braced")
        if m.group("escaped") is not None:
            parts.append("$")
        elif name is not None:
            parts.append((name, m.group(0)))
        else:  # invalid placeholder: kept as written (safe_substitute)
            parts.append(m.group(0))
        pos = m.end()
    parts.append(text[pos:])
    return parts


def _render(cache: dict, name: str, env: str | None, **values: object) -> str:
    """`prompts.render` (same output as Template.safe_substitute) with the template looked up
    and parsed once per agent (`cache`): the lookup stats files, which cost more than the rest
    of a classifier call on the rollout hot path."""
    parts = cache.get(name)
    if parts is None:
        parts = cache[name] = _compile(prompts.load(name, env))
    return "".join(p if p.__class__ is str else (str(values[p[0]]) if p[0] in values else p[1]) for p in parts)


def _endpoint(client: Any, model: str | None) -> str:
    name = model or getattr(client, "model", None) or "server's first model"
    urls = ",".join(e.url for e in getattr(client, "endpoints", []) if getattr(e, "url", None))
    return f"{name} @ {urls}" if urls else str(name)


def describe(agent: Any) -> str:
    """A one-line description of a classifier or simulator for results tables and metrics files."""
    return str(getattr(agent, "description", None) or type(agent).__name__)


# --------------------------------------------------------------------------- classifier
class ActionClassifier(Protocol):
    async def classify(self, text: str, task: Task | None = None) -> str: ...


_CLARIFY_CUES = re.compile(
    r"\b(do you mean|did you mean|could you (clarify|specify)|can you (clarify|specify)|which (one|of)"
    r"|what do you mean|are you asking|would you like|please (clarify|specify)|you mean)\b",
    re.IGNORECASE,
)


class RuleClassifier:
    """Offline: a response is CLARIFY if it ends in a question or uses a clarifying cue."""

    description = "rule (offline: ends in '?' or a clarifying cue)"

    async def classify(self, text: str, task: Task | None = None) -> str:
        return self.classify_sync(text)

    @staticmethod
    def classify_sync(text: str) -> str:
        t = text.strip()
        if not t:
            return ANSWER
        if t.rstrip("\"')].").endswith("?") or _CLARIFY_CUES.search(t):
            return CLARIFY
        return ANSWER


class LLMClassifier:
    """The authors' few-shot Yes/No format; any 'yes' in the reply means CLARIFY."""

    def __init__(self, client: RoleClient, model: str | None = None, env: str | None = None, max_tokens: int = 4):
        self.client, self.model, self.env, self.max_tokens = client, model, env, max_tokens
        self._templates: dict[str, list] = {}  # prompt templates, parsed on first use

    @property
    def description(self) -> str:
        return f"LLM few-shot Yes/No ({_endpoint(self.client, self.model)})"

    async def classify(self, text: str, task: Task | None = None) -> str:
        prompt = _render(self._templates, "classifier/fewshot", self.env, response=text.strip())
        reply = await self.client.complete(
            [{"role": "user", "content": prompt}], model=self.model, temperature=0.0, max_tokens=self.max_tokens
        )
        return CLARIFY if "yes" in reply.text.lower() else ANSWER


# --------------------------------------------------------------------------- simulator
class UserSimulator(Protocol):
    async def reply(self, task: Task, dialogue: Sequence[Message]) -> str: ...


class GroundedSimulator:
    """Offline, data-grounded: replays the dataset's answer to the clarifying question.

    For a task whose gold action is ANSWER there is nothing to clarify; the user restates.
    """

    description = "grounded (offline: replays the dataset's clarification)"

    async def reply(self, task: Task, dialogue: Sequence[Message]) -> str:
        if task.user_reply:
            return task.user_reply
        question = next((m.content for m in reversed(task.prompt) if m.role == "user"), "")
        return f"I mean exactly what I asked. {question}".strip()


def _render_dialogue(dialogue: Sequence[Message]) -> str:
    names = {"user": "User", "assistant": "Assistant", "system": "System"}
    return "\n".join(f"{names[m.role]}: {m.content}" for m in dialogue if m.role != "system")


class LLMSimulator:
    """ACT's simulator: first an intent summary from the goal, then the user's reply."""

    def __init__(self, client: RoleClient, model: str | None = None, env: str | None = None, max_tokens: int = 96):
        self.client, self.model, self.env, self.max_tokens = client, model, env, max_tokens
        self._templates: dict[str, list] = {}  # prompt templates, parsed on first use
        self._intents: dict[str, str] = {}

    @property
    def description(self) -> str:
        return f"LLM intent summary + reply ({_endpoint(self.client, self.model)})"

    async def intent(self, task: Task) -> str:
        if task.id not in self._intents:
            question = next((m.content for m in reversed(task.prompt) if m.role == "user"), "")
            grounding = "; ".join(f"{k}: {v}" for k, v in task.grounding.items()) or (task.user_reply or str(task.goal))
            prompt = _render(self._templates, "simulator/intent", self.env, grounding=grounding, question=question)
            r = await self.client.complete([{"role": "user", "content": prompt}], model=self.model,
                                           temperature=0.0, max_tokens=self.max_tokens)
            self._intents[task.id] = r.text.strip()
        return self._intents[task.id]

    async def reply(self, task: Task, dialogue: Sequence[Message]) -> str:
        intent = await self.intent(task)
        prompt = _render(self._templates, "simulator/reply", self.env, intent=intent, dialogue=_render_dialogue(dialogue))
        r = await self.client.complete([{"role": "user", "content": prompt}], model=self.model,
                                       temperature=0.0, max_tokens=self.max_tokens)
        return r.text.strip()


# --------------------------------------------------------------------------- policy
class Policy:
    """An endpoint plus what the policy sees besides the episode (extra system text, shots).

    `model` may be an adapter name (vLLM / the embedded server select adapters by `model`);
    `set_model` switches it when the trainer publishes a new version. The version number is not
    kept here: its one owner (serve's `VersionFollower`, see `stamp_from`) is asked as each request
    goes out, so each reply carries the version that was asked (`Reply.policy_version`) and a
    switch in the middle of an episode stamps each turn correctly. No owner: replies unstamped.
    """

    def __init__(self, client: RoleClient, model: str | None = None, shots: Sequence[Message] = (),
                 system_suffix: str = "", **sampling: Any):
        self.client, self.model = client, model
        self.shots = list(shots)
        self.system_suffix = system_suffix
        self.sampling = sampling
        self._versions: Any = None

    def stamp_from(self, owner: Any) -> None:
        """Stamp replies with `owner.version` (read per request; the owner switches `model` with it)."""
        self._versions = owner

    @property
    def version(self) -> int | None:
        return None if self._versions is None else self._versions.version

    def set_model(self, model: str) -> None:
        self.model = model

    def build(self, messages: Sequence[Message], instruction: str | None = None) -> list[Message]:
        msgs = list(messages)
        extra = " ".join(x for x in (self.system_suffix, instruction or "") if x)
        if msgs and msgs[0].role == "system" and extra:
            msgs[0] = Message(role="system", content=msgs[0].content + "\n\n" + extra)
        elif extra:
            msgs.insert(0, Message(role="system", content=extra))
        if self.shots:
            at = 1 if msgs and msgs[0].role == "system" else 0
            msgs[at:at] = self.shots
        return msgs

    async def respond(self, messages: Sequence[Message], instruction: str | None = None,
                      task: Task | None = None, **sampling: Any) -> Reply:
        """Reply to the dialogue; `instruction` forces an action (ACT's losing responses)."""
        model, version = self.model, self.version  # the pair asked, before any switch while the request is out
        reply = await self.client.complete(self.build(messages, instruction), model=model,
                                           **{**self.sampling, **sampling})
        reply.policy_version = version
        return reply


class OraclePolicy:
    """Offline policy that acts as the data says: the reference first, then the goal.

    An upper bound for any env's scoring and a server-free way to drive episodes.
    """

    model = "oracle"

    async def respond(self, messages: Sequence[Message], instruction: str | None = None,
                      task: Task | None = None, **sampling: Any) -> Reply:
        if task is None:
            raise ValueError("OraclePolicy needs the task")
        answered = sum(m.role == "assistant" for m in messages) > sum(m.role == "assistant" for m in task.prompt)
        text = str(task.goal if answered else task.reference)
        return Reply(text=text, model=self.model)


class CutFirstNewline:
    """A policy whose every reply is cut at its first newline, as the authors post-process each
    sampled reply (learning_to_clarify/act/src/act/simulation/simulator.py, `generate_response`:
    `response.lstrip().rstrip().split("\\n")[0]`, used for the first reply and the final answer
    of every rollout). Everything else (model, version, set_model) is the wrapped policy's."""

    def __init__(self, policy: Any):
        self.policy = policy

    def __getattr__(self, name: str) -> Any:
        return getattr(self.policy, name)

    async def respond(self, messages: Sequence[Message], instruction: str | None = None,
                      task: Task | None = None, **sampling: Any) -> Reply:
        reply = await self.policy.respond(messages, instruction=instruction, task=task, **sampling)
        reply.text = reply.text.strip().split("\n")[0]
        return reply


# --------------------------------------------------------------------------- loser generator
def _shot_dialogue(task: Task) -> list[Message]:
    """A shot's dialogue: its question alone when the task has one (AmbigSQL: `meta["question"]`).
    Ten shots each carrying a ~350-token database schema overflow a 2,048-token context (vLLM
    answers 400); the schema shows nothing about how a clarifying question is worded."""
    q = task.meta.get("question")
    return [Message(role="user", content=q)] if isinstance(q, str) and q else list(task.prompt)


class LoserGenerator:
    """The authors' losing clarifying question for an ANSWER turn: a strong model prompted with
    `shots` (10) reference clarifications of the training pool's gold-CLARIFY turns, temperature
    0.1, 64 tokens, the output cut at its first "?" (learning_to_clarify/act/src/act/data/
    preference_generator.py: `construct_icl_examples`, `create_prompt_input`, `response.split("?")[0]
    + "?"`; models/preference_model.py: `construct_generation_kwargs`). The shots are a seeded
    choice per (task, turn), never from the task's own conversation (the authors sample from the
    whole pool; for the turn after a clarification that could show the model its own gold question). `backend` is anything with a policy's
    `respond` (the policy itself by default, or a `Policy` over `--loser-generator URL`)."""

    def __init__(self, backend: Any, pool: Sequence[Task] = (), *, env: str | None = None, seed: int = 0,
                 shots: int = 10, temperature: float = 0.1, max_tokens: int = 64):
        self.backend, self.env, self.seed, self.shots = backend, env, seed, shots
        self.temperature, self.max_tokens = temperature, max_tokens
        self.pool = [t for t in pool if t.gold_action == CLARIFY and t.reference.strip()]
        self._templates: dict[str, list] = {}

    @property
    def description(self) -> str:
        client = getattr(self.backend, "client", None)
        return f"few-shot ({self.shots}) clarifying-question generator ({_endpoint(client, getattr(self.backend, 'model', None))})"

    def prompt(self, task: Task, dialogue: Sequence[Message], turn: int = 0) -> str:
        """The few-shot prompt: seeded reference clarifications, then this dialogue."""
        import random

        others = [t for t in self.pool if t.conversation_id != task.conversation_id]  # never its own question
        rng = random.Random(f"{self.seed}-{task.id}-{turn}")
        chosen = rng.sample(others, min(self.shots, len(others)))
        shots = "\n\n".join(_render(self._templates, "loser_generator/shot", self.env,
                                    dialogue=_render_dialogue(_shot_dialogue(t)), question=t.reference.strip())
                            for t in chosen)
        return _render(self._templates, "loser_generator/prompt", self.env, shots=shots,
                       dialogue=_render_dialogue(dialogue)).strip()

    def pool_question(self, task: Task, turn: int = 0) -> str | None:
        """A seeded reference clarifying question of another conversation (the fallback when the
        generator gives no question); None without a pool."""
        import random

        others = [t for t in self.pool if t.conversation_id != task.conversation_id]
        return random.Random(f"pool-{self.seed}-{task.id}-{turn}").choice(others).reference.strip() if others else None

    async def question(self, task: Task, dialogue: Sequence[Message], turn: int = 0) -> Reply:
        """The generator's reply, cut at its first "?" (text "" when it has none: no question)."""
        reply = await self.backend.respond([Message(role="user", content=self.prompt(task, dialogue, turn))],
                                           task=task, temperature=self.temperature, max_tokens=self.max_tokens)
        head = reply.text.strip().split("?")[0].strip()
        reply.text = head + "?" if "?" in reply.text and head else ""
        return reply
