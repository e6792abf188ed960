"""The gym-style environment contract (a task = one clarify-or-answer turn).

    env = simkit.make("ambigsql")
    obs = await env.reset(task)            # the messages the policy sees
    step = await env.step(policy_text)     # observation = simulated user's reply (or None)

An `Env` subclass supplies data and scoring (`load_splits`, `score`); `splits`/`tasks` and the
episode mechanics (classify, simulate, turn cap, scoring) live here once. `env.episode(task)`
gives an independent `Episode` so one env serves thousands of concurrent episodes.
Environments are plug-ins found through the `simkit.environments` entry-point group (or
`@register` in-process): the core names no env (see `registry`).
"""
from __future__ import annotations

import difflib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from simkit import prompts
from simkit.datafile import data_root
from simkit.roles.agents import ActionClassifier, GroundedSimulator, RuleClassifier, UserSimulator
from simkit.types import CLARIFY, Message, Reply, Task, Trajectory, Turn


@dataclass
class StepResult:
    observation: str | None  # the simulated user's reply; None when the episode ended
    reward: float
    terminated: bool  # the policy answered: outcome scored
    truncated: bool  # the turn cap ended a clarify loop
    info: dict[str, Any] = field(default_factory=dict)


class Episode:
    """State of one episode. Create with `env.episode(task)`.

    A step is two halves so callers pay only for what they use: `act(text)` records and
    classifies the policy's reply (an ANSWER is scored and ends the episode; a CLARIFY at the
    round cap truncates it), and `advance()` asks the simulated user to answer a pending
    clarifying question. `step` is both. Phase 2 stops after `act` when the reply is judged by
    its action alone, so the simulator is never called for a reply that is thrown away."""

    __slots__ = ("env", "task", "turns", "first_action", "turn_score", "turn_score_question_only", "reward",
                 "terminated", "truncated", "t0", "_messages", "info", "_pending")

    def __init__(self, env: "Env", task: Task):
        self.env, self.task = env, task
        self.turns: list[Turn] = []
        self.first_action: str | None = None
        self.turn_score: float | None = None
        self.turn_score_question_only: float | None = None
        self.reward = 0.0
        self.terminated = self.truncated = False
        self.t0 = time.time()
        self._messages = [Message(role="system", content=env.system_prompt), *task.prompt]
        self.info: dict[str, Any] = {}
        self._pending: StepResult | None = None  # a clarifying question the user has not answered yet

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated

    @property
    def awaiting_user(self) -> bool:
        """The last reply asked a clarifying question and `advance()` has not answered it."""
        return self._pending is not None

    @property
    def messages(self) -> list[Message]:
        """What the policy sees now: system text, the task prompt, and the episode so far."""
        return self._messages

    async def act(self, text: str, reply: Reply | None = None) -> StepResult:
        """Record and classify the policy's reply. No simulator call: the result's observation
        is None; a CLARIFY that may go on leaves the episode awaiting `advance()`."""
        if self.done:
            raise RuntimeError("episode already ended; call env.reset(task) for a new one")
        if self._pending is not None:
            raise RuntimeError("the user has not answered yet: call advance() before the next act()")
        env, task = self.env, self.task
        action = await env.classifier.classify(text, task)
        self._add(Turn.assistant(text, action, reply))
        n_assistant = sum(1 for t in self.turns if t.role == "assistant")
        if n_assistant == 1:
            self.first_action = action
            self.turn_score = await env.turn_score(text, task)
            self.turn_score_question_only = (await env.turn_score_question_only(text, task)
                                             if task.gold_action == CLARIFY else self.turn_score)
        info = {"action": action, "turn": n_assistant}
        if action == CLARIFY:
            if n_assistant >= env.max_turns:
                self.truncated = True
                return StepResult(None, 0.0, False, True, {**info, "score": 0.0})
            self._pending = StepResult(None, 0.0, False, False, info)
            return self._pending
        self.reward = await env.score(text, task.goal, task)
        self.terminated = True
        return StepResult(None, self.reward, True, False, {**info, "score": self.reward,
                                                           "success": env.success(self.reward)})

    async def advance(self) -> str | None:
        """The simulated user answers the pending clarifying question (None when none is pending)."""
        if self._pending is None:
            return None
        user = await self.env.simulator.reply(self.task, self._messages[1:])
        self._add(Turn(role="user", text=user))
        self._pending = None
        return user

    async def step(self, text: str, reply: Reply | None = None) -> StepResult:
        """`act`, then `advance` if the episode goes on: observation = the user's reply."""
        result = await self.act(text, reply)
        if self._pending is not None:
            result = StepResult(await self.advance(), 0.0, False, False, result.info)
        return result

    def _add(self, turn: Turn) -> None:
        self.turns.append(turn)
        self._messages.append(Message(role=turn.role, content=turn.text))

    def trajectory(self, **extra: Any) -> Trajectory:
        """The episode as data. `policy_version` defaults to the oldest version stamped on a turn:
        a pair is never treated as fresher than the oldest policy that wrote part of it."""
        if extra.get("policy_version") is None:
            stamped = [t.policy_version for t in self.turns if t.policy_version is not None]
            extra["policy_version"] = min(stamped) if stamped else None
        return Trajectory(
            task_id=self.task.id, env=self.env.name, prompt=self.task.prompt, turns=self.turns,
            gold_action=self.task.gold_action, first_action=self.first_action, reward=self.reward,
            turn_score=self.turn_score, turn_score_question_only=self.turn_score_question_only,
            terminated=self.terminated, truncated=self.truncated,
            started_at=self.t0, duration_s=time.time() - self.t0, info=self.info, **extra,
        )


class EnvConfig(BaseModel):
    """Settings every env takes; an env extends it with its own (`Env.Config`). Unknown keys are
    an error that names the key: a typo must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    max_turns: int | None = Field(None, ge=1, description="assistant turns per episode (clarify_rounds + 1)")
    clarify_rounds: int | None = Field(None, ge=0, description="simulated clarification rounds (default: the env's)")
    data_dir: Path | None = Field(None, description="task data folder (default $SIMKIT_DATA_DIR)")
    seed: int = Field(0, description="data seed")


class EnvConfigError(ValueError):
    """An env was given a key it does not know, or a value of the wrong type."""


def validate_env_config(env_name: str, model: type[EnvConfig], values: dict[str, Any]) -> EnvConfig:
    """`model` from keyword arguments, with an error message that names each bad key."""
    known = sorted(model.model_fields)
    problems = []
    for key in values:
        if key not in model.model_fields:
            close = difflib.get_close_matches(key, known, n=1)
            problems.append(f"unknown config key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    if problems:
        raise EnvConfigError(f"env {env_name!r}: " + "; ".join(problems) + f". Known keys: {', '.join(known)}")
    try:
        return model.model_validate(values)
    except ValidationError as e:
        msg = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors())
        raise EnvConfigError(f"env {env_name!r}: {msg}") from None


class Env:
    """Base class of every task environment. Subclasses set `name` and implement the data and
    scoring hooks (`load_splits`, `score`); they may override `turn_score` when the turn-level
    target differs. Their settings are a `Config` (an `EnvConfig` subclass): `simkit.make(name,
    **cfg)` validates the keywords against it, and `self.config` holds the typed values.

    Simulation depth: `clarify_rounds` is how many times the simulated user answers a clarifying
    question before the episode must end. Default 1, as the authors simulate (question → user's
    clarification → final response); a policy that asks again after the last round is truncated
    (trajectory score 0). `max_turns` (assistant turns, = clarify_rounds + 1) is the older spelling
    of the same limit and wins when given."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[EnvConfig]] = EnvConfig  # the env's typed settings (unknown keys rejected)
    success_threshold: ClassVar[float] = 0.5  # ε: a trajectory with score >= ε is a success
    default_clarify_rounds: ClassVar[int] = 1  # the authors simulate one clarification round
    metric_name: ClassVar[str] = "score"  # the content metric's name in tables (F1, Exec Match, …)

    def __init__(self, classifier: ActionClassifier | None = None, simulator: UserSimulator | None = None,
                 **cfg: Any):
        self.config = validate_env_config(self.name or type(self).__name__, type(self).Config, cfg)
        c = self.config
        self.classifier = classifier or RuleClassifier()
        self.simulator = simulator or GroundedSimulator()
        self.max_turns = c.max_turns or (self.default_clarify_rounds if c.clarify_rounds is None
                                         else c.clarify_rounds) + 1
        self.data_dir = c.data_dir or data_root()
        self.seed = c.seed
        self.system_prompt = prompts.load("policy/system", env=self.name)
        self._episode: Episode | None = None
        self._split_tasks: dict[str, list[Task]] | None = None

    @property
    def cfg(self) -> dict[str, Any]:
        """The settings that were given explicitly (older spelling of `config`)."""
        return self.config.model_dump(exclude_unset=True)

    # -------------------------------------------------------------- task hooks
    def load_splits(self) -> Mapping[str, Sequence[Task]]:
        """Split name -> its tasks, in the env's split order. The one data hook: called once per
        env, on first use (so building an env never reads its data), and cached."""
        raise NotImplementedError

    def _splits(self) -> dict[str, list[Task]]:
        if self._split_tasks is None:
            self._split_tasks = {k: v if isinstance(v, list) else list(v) for k, v in self.load_splits().items()}
        return self._split_tasks

    def splits(self) -> dict[str, int]:
        """Split name -> number of tasks."""
        return {k: len(v) for k, v in self._splits().items()}

    def tasks(self, split: str) -> list[Task]:
        """The tasks of one split; an unknown split is a KeyError naming the ones there are."""
        splits = self._splits()
        if split not in splits:
            raise KeyError(f"{self.name or type(self).__name__} has splits {list(splits)}, not {split!r}")
        return splits[split]

    async def score(self, prediction: str, target: Any, task: Task) -> float:
        """The task heuristic H(outcome, goal) in [0, 1]."""
        raise NotImplementedError

    @property
    def clarify_rounds(self) -> int:
        return self.max_turns - 1

    async def turn_score(self, text: str, task: Task) -> float:
        """Turn-level content score: the first response against the reference winner — for a
        CLARIFY turn the whole gold continuation (question, user's reply, answer) as the authors'
        metrics/base_metrics.py scores it, for an ANSWER turn the reference answer."""
        target = task.gold_continuation_text() if task.gold_action == CLARIFY else task.reference
        return await self.score(text, target, task)

    async def turn_score_question_only(self, text: str, task: Task) -> float:
        """The older turn-level form: the first response against the reference response alone
        (for a CLARIFY turn: the clarifying question only)."""
        return await self.score(text, task.reference, task)

    def success(self, score: float) -> bool:
        return score >= self.success_threshold

    # -------------------------------------------------------------- gym API
    def episode(self, task: Task) -> Episode:
        return Episode(self, task)

    async def reset(self, task: Task) -> list[Message]:
        self._episode = self.episode(task)
        return self._episode.messages

    async def step(self, text: str, reply: Reply | None = None) -> StepResult:
        if self._episode is None:
            raise RuntimeError("call env.reset(task) before env.step()")
        return await self._episode.step(text, reply)

    @property
    def current(self) -> Episode | None:
        return self._episode

    async def aclose(self) -> None:
        return None


# --------------------------------------------------------------------------- registry
ENV_GROUP = "simkit.environments"  # entry point name -> Env subclass, e.g. toy = "environments.toy:ToyEnv"
_REGISTRY: dict[str, Callable[..., Env]] = {}


class EnvPluginError(RuntimeError):
    """An environment plug-in is installed but cannot be loaded (its import or object failed)."""


def register(name: str) -> Callable[[type[Env]], type[Env]]:
    """Register an env class under `name` in this process (plug-ins use entry points instead)."""
    def deco(cls: type[Env]) -> type[Env]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _plugins() -> dict[str, EntryPoint]:
    """The installed plug-ins by name, not imported: listing never runs a plug-in's code."""
    return {ep.name: ep for ep in entry_points(group=ENV_GROUP)}


def _load_plugin(ep: EntryPoint) -> None:
    """Import one plug-in; any failure is an `EnvPluginError` that names it and where it points."""
    try:
        obj = ep.load()
    except Exception as e:
        raise EnvPluginError(f"environment plug-in {ep.name!r} ({ep.value}, entry point group {ENV_GROUP!r}) "
                             f"failed to load: {type(e).__name__}: {e}") from e
    if isinstance(obj, type) and issubclass(obj, Env) and not obj.name:
        obj.name = ep.name  # a plug-in class that did not use @register
    _REGISTRY.setdefault(ep.name, obj)


def registered() -> list[str]:
    """Every env name: registered in this process or installed as a plug-in (loaded or not)."""
    return sorted(set(_REGISTRY) | set(_plugins()))


def make(name: str, **cfg: Any) -> Env:
    """Build a registered environment by name: `simkit.make("pacific", max_turns=3)`."""
    if name not in _REGISTRY:
        ep = _plugins().get(name)
        if ep is not None:
            _load_plugin(ep)
    if name not in _REGISTRY:
        raise KeyError(f"no environment named {name!r}; registered: {registered()}")
    return _REGISTRY[name](**cfg)
