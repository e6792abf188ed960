"""`simkit.RemoteEnv`: an environment served by `simkit env-server`, with a local env's interface,
so `run_episodes`, `eval` and `serve` drive remote episodes unchanged.

    env = simkit.RemoteEnv("http://127.0.0.1:8200", "ambigsql")
    async for traj in simkit.run_episodes(env, env.tasks("test"), policy, concurrency=1000): ...

Why it is built this way: one HTTP request per policy turn. The server creates the episode on the
first reply (so `env.episode(task)` stays synchronous, as locally), each step's answer carries the
user's reply and the episode's scores, and the episode here mirrors that state; `trajectory()` is the
in-process `Episode.trajectory` over it, so a remote trajectory is the same object as a local one.
Server errors keep their meaning: 4xx raise `RemoteEnvError`; a role that gave up on the server
raises a `RoleError` with the server's message (counted as a failed episode, as in-process); 503 is
retried after its Retry-After. Metadata (splits, tasks) is fetched synchronously once and cached.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from simkit.roles.client import RoleError
from simkit.env import Episode, StepResult
from simkit.types import Message, Reply, Task, Turn


class RemoteEnvError(RuntimeError):
    """The env server refused a request (its status, error type and the field in error)."""

    def __init__(self, status: int, message: str, type_: str | None = None, param: str | None = None):
        super().__init__(f"{status} {message}")
        self.status, self.message, self.type, self.param = status, message, type_, param


class RemoteRoleError(RoleError):
    """A server-side role (classifier, simulator) gave up; `str(e)` is the server's message, the
    text an in-process episode would have recorded."""

    def __init__(self, message: str):
        Exception.__init__(self, message)
        self.role, self.reason = "remote", None


def _error(status: int, raw: bytes) -> Exception:
    try:
        err = json.loads(raw)["error"]
        message, type_, param = err["message"], err.get("type"), err.get("param")
    except (ValueError, KeyError, TypeError):
        message, type_, param = raw[:500].decode(errors="replace"), None, None
    if type_ == "RoleError":
        return RemoteRoleError(message)
    return RemoteEnvError(status, message, type_, param)


class RemoteClassifier:
    """The server's action classifier, called over HTTP (Phase 2 classifies without stepping)."""

    def __init__(self, env: "RemoteEnv", description: str):
        self.env, self.description = env, f"remote: {description}"

    async def classify(self, text: str, task: Task | None = None) -> str:
        out = await self.env.request("POST", f"/envs/{self.env.name}/classify",
                                     {"text": text, "task_id": task.id if task else None})
        return out["action"]


class RemoteSimulator:
    """The server's user simulator; episodes reach it through their steps."""

    def __init__(self, description: str):
        self.description = f"remote: {description}"

    async def reply(self, task: Task, dialogue: Any) -> str:
        raise NotImplementedError("the remote simulator answers inside POST /episodes/{id}/step")


class RemoteEpisode:
    """One server-side episode, mirrored: the same attributes and methods as `Episode`."""

    trajectory = Episode.trajectory  # the in-process trajectory over the mirrored state
    done = Episode.done
    awaiting_user = property(lambda self: self._observation is not None)

    def __init__(self, env: "RemoteEnv", task: Task):
        self.env, self.task = env, task
        self.id: str | None = None
        self.turns: list[Turn] = []
        self.first_action: str | None = None
        self.turn_score: float | None = None
        self.turn_score_question_only: float | None = None
        self.reward = 0.0
        self.terminated = self.truncated = False
        self.t0 = time.time()
        self.messages = [Message(role="system", content=env.system_prompt), *task.prompt]
        self.info: dict[str, Any] = {}
        self._observation: str | None = None  # the user's reply, held until `advance()`

    async def start(self) -> list[Message]:
        """Create the episode on the server (done by the first `act` when not called)."""
        out = await self.env.request("POST", "/episodes", {"env": self.env.name, "task_id": self.task.id,
                                                           "config": self.env.config}, retry_busy=True)
        self.id = out["episode_id"]
        self.messages = [Message(**m) for m in out["observation"]]
        return self.messages

    async def act(self, text: str, reply: Reply | None = None) -> StepResult:
        """Send the reply; the server classifies it, scores an answer and simulates the user's
        answer to a question (returned by `advance()`)."""
        if self.done:
            raise RuntimeError("episode already ended; call env.reset(task) for a new one")
        if self._observation is not None:
            raise RuntimeError("the user has not answered yet: call advance() before the next act()")
        if self.id is None:
            await self.start()
        body: dict[str, Any] = {"text": text}
        if reply is not None:
            body["reply"] = {"model": reply.model, "prompt_tokens": reply.usage.prompt_tokens,
                             "completion_tokens": reply.usage.completion_tokens, "latency_s": reply.latency_s,
                             "policy_version": reply.policy_version}
        out = await self.env.request("POST", f"/episodes/{self.id}/step", body)
        info, st = out["info"], out["state"]
        self._add(Turn.assistant(text, info["action"], reply))
        self.first_action, self.reward = st["first_action"], st["reward"]
        self.turn_score, self.turn_score_question_only = st["turn_score"], st["turn_score_question_only"]
        self.terminated, self.truncated = st["terminated"], st["truncated"]
        self._observation = out["observation"]
        return StepResult(None, out["reward"], out["terminated"], out["truncated"], info)

    async def advance(self) -> str | None:
        """The user's answer to the pending clarifying question (None when none is pending)."""
        user, self._observation = self._observation, None
        if user is not None:
            self._add(Turn(role="user", text=user))
        return user

    async def step(self, text: str, reply: Reply | None = None) -> StepResult:
        result = await self.act(text, reply)
        if self._observation is not None:
            result = StepResult(await self.advance(), 0.0, False, False, result.info)
        return result

    def _add(self, turn: Turn) -> None:
        self.turns.append(turn)
        self.messages.append(Message(role=turn.role, content=turn.text))

    async def aclose(self) -> None:
        """End the episode on the server now (else it expires after the server's TTL)."""
        if self.id is not None:
            await self.env.request("DELETE", f"/episodes/{self.id}")


class RemoteEnv:
    """A local env's interface over `simkit env-server`: `tasks`, `splits`, `episode`, `reset`/`step`,
    `score`, `success`, `classifier`. `config`: per-episode settings the server allows (max_turns,
    clarify_rounds, bool/choice keys). The bearer token is read from `$<api_key_env>`."""

    def __init__(self, url: str, name: str, *, config: dict[str, Any] | None = None,
                 api_key_env: str = "SIMKIT_ENV_SERVER_KEY", timeout_s: float = 900.0, max_connections: int = 256,
                 max_retries: int = 5, retry_after_max_s: float = 60.0):
        self.url, self.name = url.rstrip("/"), name
        self.config = dict(config or {})
        key = os.environ.get(api_key_env, "")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.timeout_s, self.max_connections = timeout_s, max_connections
        self.max_retries, self.retry_after_max_s = max_retries, retry_after_max_s
        self._http: Any = None
        self._http_loop: asyncio.AbstractEventLoop | None = None
        self._tasks: dict[str, list[Task]] = {}
        self.info = info = self.get(f"/envs/{urllib.parse.quote(name)}")
        self.metric_name, self.success_threshold = info["metric"], info["success_threshold"]
        self.system_prompt = info["system_prompt"]
        c = self.config
        self.max_turns = c.get("max_turns") or (info["clarify_rounds"] if c.get("clarify_rounds") is None
                                                else c["clarify_rounds"]) + 1
        self.classifier = RemoteClassifier(self, info["classifier"])
        self.simulator = RemoteSimulator(info["simulator"])
        self._episode: RemoteEpisode | None = None

    @property
    def clarify_rounds(self) -> int:
        return self.max_turns - 1

    # ------------------------------------------------------------------ HTTP
    def get(self, path: str) -> Any:
        """A blocking GET (metadata, fetched once: splits, tasks)."""
        req = urllib.request.Request(self.url + path, headers=self.headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise _error(e.code, e.read()) from None

    def _session(self) -> Any:
        import aiohttp

        loop = asyncio.get_running_loop()
        if self._http is None or self._http.closed or self._http_loop is not loop:
            self._http = aiohttp.ClientSession(
                headers=self.headers, timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                connector=aiohttp.TCPConnector(limit=self.max_connections))
            self._http_loop = loop
        return self._http

    async def request(self, method: str, path: str, body: Any = None, retry_busy: bool = False) -> Any:
        """One JSON request; a 503 (server busy) waits its Retry-After when `retry_busy`."""
        for attempt in range(self.max_retries + 1):
            async with self._session().request(method, self.url + path, json=body) as r:
                raw = await r.read()
                if r.status < 400:
                    return json.loads(raw)
                if r.status == 503 and retry_busy and attempt < self.max_retries:
                    wait = min(self.retry_after_max_s, float(r.headers.get("Retry-After") or 1))
                    await asyncio.sleep(wait * (1 + 0.2 * random.random()))
                    continue
                raise _error(r.status, raw)

    async def aclose(self) -> None:
        if self._http is not None and not self._http.closed:
            await self._http.close()

    # ------------------------------------------------------------------ the env interface
    def splits(self) -> dict[str, int]:
        return dict(self.info["splits"])

    def tasks(self, split: str) -> list[Task]:
        if split not in self._tasks:
            q = urllib.parse.urlencode({"split": split, "full": "true"})
            out = self.get(f"/envs/{urllib.parse.quote(self.name)}/tasks?{q}")
            self._tasks[split] = [Task.model_validate(t) for t in out["tasks"]]
        return self._tasks[split]

    def success(self, score: float) -> bool:
        return score >= self.success_threshold

    async def score(self, prediction: str, target: Any, task: Task) -> float:
        out = await self.request("POST", f"/envs/{self.name}/score",
                                 {"task_id": task.id, "prediction": prediction, "target": target})
        return out["score"]

    def episode(self, task: Task) -> RemoteEpisode:
        return RemoteEpisode(self, task)

    async def reset(self, task: Task) -> list[Message]:
        self._episode = self.episode(task)
        return await self._episode.start()

    async def step(self, text: str, reply: Reply | None = None) -> StepResult:
        if self._episode is None:
            raise RuntimeError("call env.reset(task) before env.step()")
        return await self._episode.step(text, reply)

    @property
    def current(self) -> RemoteEpisode | None:
        return self._episode
