"""`simkit env-server`: the environments as a gym-style HTTP/JSON service, so agents in other
processes, RL frameworks and languages can play AmbigSQL, PACIFIC and Abg-CoQA episodes.

    GET  /envs, /envs/{name}, /envs/{name}/tasks?split=&limit=&offset=&seed=&full=, /envs/{name}/tasks/{id}
    POST /episodes {env, task_id | split+index, config}      -> {episode_id, observation, ...}
    POST /episodes/{id}/step {text, reply?}                  -> {observation, reward, terminated, truncated, info, state}
    GET  /episodes/{id}                                      -> the trajectory so far
    DELETE /episodes/{id}
    POST /envs/{name}/score, /envs/{name}/classify           (what `RemoteEnv` needs for Phase 2)
    GET  /health, /metrics, /openapi.json

Why it is built this way: the server runs the very `Env`/`Episode` code of in-process use (one
`Episode` per episode id), so remote and local results are identical; roles are configured as for
`serve`. Everything a client can get wrong is answered, never hung: typed request models (400 naming
the field), 404 for unknown/ended episodes, 409 for a step on an ended, failed or busy episode, 503 +
Retry-After past `--max-open` open episodes, 504 past `--step-timeout-s`. Idle episodes expire after
`--ttl-s` (counted in /metrics), so a client that dies leaks nothing. Bearer auth with keys from an
environment variable. Policy SQL still runs in AmbigSQL's sandbox: scoring is the env's own.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import random
import time
import uuid
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from simkit.roles.client import ClientSettings, RoleError
from simkit.env import Env, EnvConfigError, Episode, make, registered
from simkit.roles.agents import GroundedSimulator, LLMClassifier, LLMSimulator, RuleClassifier, describe
from simkit.roles.build import ClassifierRole, SimulatorRole, _client, _urls, default_transport
from simkit.types import ACTIONS, Message, Reply, Task, Trajectory, Usage

log = logging.getLogger("simkit.envserver.server")
MAX_TEXT = 1_000_000  # characters in one reply; a longer one is a client bug, not a policy turn
PUBLIC = ("/health", "/openapi.json")  # paths that need no bearer token


# --------------------------------------------------------------------------- config
class EnvServerConfig(BaseModel):
    """`simkit env-server` settings (flags generated from these fields; --config YAML too)."""

    model_config = ConfigDict(extra="forbid")

    env: list[str] = Field(default_factory=list, json_schema_extra={"metavar": "NAME"},
                           description="environments to serve, comma-separated (default: every registered one)")
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8200, ge=0, le=65535, description="port")
    data_dir: Path | None = Field(None, description="task data folder (default $SIMKIT_DATA_DIR)")
    ttl_s: float = Field(600.0, gt=0, description="an episode idle this long expires (counted in /metrics)")
    max_open: int = Field(10_000, ge=1, description="open (unfinished) episodes; past it POST /episodes answers "
                                                    "503 with Retry-After")
    step_timeout_s: float = Field(600.0, gt=0, description="a step (classify, score, simulate) running longer "
                                                           "answers 504 and fails its episode")
    auth_keys_env: str = Field("SIMKIT_ENV_SERVER_KEYS",
                               description="environment variable holding the accepted bearer tokens, "
                                           "comma-separated; unset or empty: no auth")
    max_configs: int = Field(8, ge=1, description="env instances held at once: each served env's default plus "
                                                  "the distinct per-episode configs clients ask for")
    simulator: SimulatorRole = Field(default_factory=SimulatorRole)
    classifier: ClassifierRole = Field(default_factory=ClassifierRole)
    client: ClientSettings = Field(default_factory=ClientSettings)

    @field_validator("env", mode="before")
    @classmethod
    def _split(cls, v: Any) -> list[str]:
        return _urls(v)


# --------------------------------------------------------------------------- wire models
class _In(BaseModel):
    """A request body: unknown fields and wrong types are errors (strict: "3" is not an int)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ReplyMeta(_In):
    """What the policy server said about a reply (kept on the turn, as in-process)."""

    model: str = ""
    prompt_tokens: int = Field(0, ge=0)
    completion_tokens: int = Field(0, ge=0)
    latency_s: float = Field(0.0, ge=0)
    policy_version: int | None = None


class EpisodeCreate(_In):
    env: str = Field(description="environment name")
    task_id: str | None = Field(None, description="a task id (or split + index)")
    split: str | None = None
    index: int | None = Field(None, ge=0)
    config: dict[str, Any] = Field(default_factory=dict, description="episode settings: max_turns, "
                                   "clarify_rounds and the env's bool/choice keys (GET /envs/{name}: config_keys)")


class StepRequest(_In):
    text: str = Field(max_length=MAX_TEXT, description="the policy's reply")
    reply: ReplyMeta | None = None


class ScoreRequest(_In):
    task_id: str
    prediction: str = Field(max_length=MAX_TEXT)
    target: Any = Field(None, description="default: the task's goal")


class ClassifyRequest(_In):
    text: str = Field(max_length=MAX_TEXT)
    task_id: str | None = None


class TasksQuery(BaseModel):
    """Query string of GET /envs/{name}/tasks (lax: query values are strings)."""

    model_config = ConfigDict(extra="forbid")
    split: str | None = Field(None, description="default: the env's first split")
    limit: int | None = Field(None, ge=1)
    offset: int = Field(0, ge=0)
    seed: int | None = Field(None, description="shuffle the split with this seed before offset/limit")
    full: bool = Field(False, description="whole tasks, not just ids")


class EnvInfo(BaseModel):
    name: str
    splits: dict[str, int]
    metric: str
    success_threshold: float
    max_turns: int
    clarify_rounds: int
    actions: dict[str, str]
    classifier: str
    simulator: str
    system_prompt: str
    config_keys: list[str]


class EpisodeState(BaseModel):
    status: Literal["running", "awaiting_user", "ended", "failed"]
    first_action: str | None
    turn_score: float | None
    turn_score_question_only: float | None
    reward: float
    terminated: bool
    truncated: bool
    turns: int
    error: str | None = None


class EpisodeCreated(BaseModel):
    episode_id: str
    env: str
    task_id: str
    observation: list[Message]
    max_turns: int


class StepResponse(BaseModel):
    observation: str | None
    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, Any]
    state: EpisodeState


class EpisodeView(BaseModel):
    episode_id: str
    state: EpisodeState
    trajectory: Trajectory


class ErrorBody(BaseModel):
    class Detail(BaseModel):
        message: str
        type: str
        param: str | None = None
        code: int

    error: Detail


class APIError(Exception):
    """An error answered as {"error": {message, type, param, code}} (the model server's shape)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}
        return web.json_response(body, status=self.status, headers=self.headers)


def parse(model: type[BaseModel], data: Any, where: tuple = (), strict: bool | None = None) -> Any:
    """`model` from decoded JSON; a ValidationError becomes 400 naming the first bad field (under
    `where`, e.g. ("config",))."""
    try:
        return model.model_validate(data, strict=strict)
    except ValidationError as e:
        errs = e.errors()
        name = lambda err: ".".join(map(str, (*where, *err["loc"]))) or "body"  # noqa: E731
        field = name(errs[0])
        msg = "; ".join(f"{name(x)}: {x['msg']}" for x in errs)
        raise APIError(400, f"invalid request: {msg}", param=field) from None


SERVER_ONLY = frozenset({"isolation"})  # AmbigSQL's sandbox mode: policy SQL stays in worker processes


def remote_config_keys(env_cls: type[Env]) -> list[str]:
    """The env settings a client may choose per episode: the turn limits and bool/choice keys (not
    SERVER_ONLY). Paths, objects, worker counts and data seeds stay the operator's (they reach files,
    spawn processes or change the task set)."""
    out = ["clarify_rounds", "max_turns"]
    for name, f in env_cls.Config.model_fields.items():
        ann = f.annotation
        if name in SERVER_ONLY:
            continue
        if ann is bool or get_origin(ann) is Literal or (get_origin(ann) is not None and any(
                a is bool or get_origin(a) is Literal for a in get_args(ann))):
            out.append(name)
    return sorted(set(out))


class Held:
    """One served episode and its bookkeeping."""

    __slots__ = ("id", "ep", "busy", "error", "touched", "started")

    def __init__(self, eid: str, ep: Episode):
        self.id, self.ep, self.busy, self.error = eid, ep, False, None
        self.touched = self.started = time.monotonic()

    @property
    def open(self) -> bool:
        return self.error is None and not self.ep.done

    def state(self) -> EpisodeState:
        ep = self.ep
        status = "failed" if self.error else "ended" if ep.done else "awaiting_user" if ep.awaiting_user else "running"
        return EpisodeState(status=status, first_action=ep.first_action, turn_score=ep.turn_score,
                            turn_score_question_only=ep.turn_score_question_only, reward=ep.reward,
                            terminated=ep.terminated, truncated=ep.truncated, turns=len(ep.turns), error=self.error)


# --------------------------------------------------------------------------- server
class EnvServer:
    def __init__(self, cfg: EnvServerConfig):
        self.cfg = cfg
        self.names = cfg.env or registered()
        raw = os.environ.get(cfg.auth_keys_env, "")
        self.keys = [k.strip().encode() for k in raw.split(",") if k.strip()]
        self.envs: dict[tuple[str, str], Env] = {}  # (name, canonical config JSON) -> env
        self.task_index: dict[str, dict[str, Task]] = {}
        self._loading: dict[tuple[str, str], asyncio.Lock] = {}
        self.episodes: OrderedDict[str, Held] = OrderedDict()  # least recently used first
        self.gone: OrderedDict[str, str] = OrderedDict()  # ended ids -> why, for a 404 that says so
        self.open = 0
        self.stats = {"created": 0, "steps": 0, "finished": 0, "failed": 0, "expired": 0, "expired_finished": 0,
                      "deleted": 0, "shed": 0, "timeouts": 0, "bad_requests": 0, "unauthorized": 0}
        self._closed_at: deque[float] = deque(maxlen=1000)  # when episodes closed: the Retry-After estimate
        self.agents: dict[str, tuple[Any, Any]] = {}
        self.clients: list[Any] = []
        self._reaper: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle
    def _agents(self, name: str) -> tuple[Any, Any]:
        """(classifier, simulator) for env `name`: offline unless the config names URLs (as `serve`)."""
        if name not in self.agents:
            c = self.cfg
            clf: Any = RuleClassifier()
            sim: Any = GroundedSimulator()
            if not c.classifier.offline:
                cc = _client("classifier", _urls(c.classifier.url), c.classifier.model, c.client,
                             default_transport)
                self.clients.append(cc)
                clf = LLMClassifier(cc, env=name)
            if not c.simulator.offline:
                sc = _client("simulator", _urls(c.simulator.url), c.simulator.model, c.client,
                             default_transport)
                self.clients.append(sc)
                sim = LLMSimulator(sc, env=name)
            self.agents[name] = (clf, sim)
        return self.agents[name]

    async def on_startup(self, app: web.Application) -> None:
        for name in self.names:
            await self.env_for(name, {})
        self._reaper = asyncio.create_task(self._reap())
        log.info("serving %s (ttl %.0fs, max open %d, auth %s)", ", ".join(self.names), self.cfg.ttl_s,
                 self.cfg.max_open, "on" if self.keys else "off")

    async def on_cleanup(self, app: web.Application) -> None:
        if self._reaper:
            self._reaper.cancel()
        for env in self.envs.values():
            await env.aclose()
        for c in self.clients:
            await c.aclose()

    async def env_for(self, name: str, config: dict[str, Any]) -> Env:
        """The env for `name` under a client's episode config, built once (in a thread: data loads)."""
        if name not in self.names:
            raise APIError(404, f"no environment {name!r} on this server; served: {', '.join(self.names)}",
                           "not_found", "env")
        key = (name, json.dumps(config, sort_keys=True))
        env = self.envs.get(key)
        if env is not None:
            return env
        if config:
            base = await self.env_for(name, {})
            allowed = remote_config_keys(type(base))
            bad = sorted(set(config) - set(allowed))
            if bad:
                raise APIError(400, f"config key {bad[0]!r} cannot be set per episode; allowed: {', '.join(allowed)}",
                               param=f"config.{bad[0]}")
            parse(type(base).Config, config, ("config",), strict=True)  # "3" is no int here either
            if len(self.envs) >= self.cfg.max_configs:
                raise APIError(400, f"this server holds {len(self.envs)} env configs (--max-configs); reuse one",
                               param="config")
        lock = self._loading.setdefault(key, asyncio.Lock())
        async with lock:
            if key not in self.envs:
                clf, sim = self._agents(name)
                kw = {**({"data_dir": self.cfg.data_dir} if self.cfg.data_dir else {}), **config}
                try:
                    env = await asyncio.to_thread(make, name, classifier=clf, simulator=sim, **kw)
                except EnvConfigError as e:
                    raise APIError(400, str(e), param="config") from None
                if not config:
                    self.task_index[name] = await asyncio.to_thread(
                        lambda: {t.id: t for s in env.splits() for t in env.tasks(s)})
                self.envs[key] = env
        return self.envs[key]

    # ------------------------------------------------------------------ episode table
    def touch(self, h: Held) -> None:
        h.touched = time.monotonic()
        self.episodes.move_to_end(h.id)

    def held(self, request: web.Request) -> Held:
        eid = request.match_info["episode_id"]
        h = self.episodes.get(eid)
        if h is None:
            why = self.gone.get(eid)
            raise APIError(404, f"episode {eid!r} {why}" if why else f"no episode {eid!r}", "not_found", "episode_id")
        return h

    def _close(self, h: Held) -> None:
        """An open episode stops being open (ended, failed or dropped)."""
        self.open -= 1
        self._closed_at.append(time.monotonic())

    def drop(self, h: Held, why: str) -> None:
        del self.episodes[h.id]
        if h.open:
            self._close(h)
        self.gone[h.id] = why
        while len(self.gone) > 100_000:
            self.gone.popitem(last=False)

    def expire(self) -> int:
        """Drop every episode idle past the TTL (oldest first; a step in progress is never idle)."""
        now = time.monotonic()
        cutoff, n = now - self.cfg.ttl_s, 0
        while self.episodes:
            h = next(iter(self.episodes.values()))
            if h.touched > cutoff:
                break
            if h.busy:
                self.touch(h)
                continue
            self.stats["expired" if h.open else "expired_finished"] += 1
            self.drop(h, f"expired after {self.cfg.ttl_s:g}s idle")
            n += 1
        return n

    async def _reap(self) -> None:
        every = min(5.0, self.cfg.ttl_s / 4)
        while True:
            await asyncio.sleep(every)
            self.expire()

    def retry_after(self) -> int:
        """Seconds until an open slot is likely free: one over the recent close rate, within [1, 60];
        with no recent closes, the TTL (an abandoned episode's slot frees by then), at most 5."""
        now = time.monotonic()
        recent = [t for t in self._closed_at if now - t < 60]
        if len(recent) < 2:
            return int(min(5, max(1, round(self.cfg.ttl_s))))
        rate = len(recent) / max(1e-3, now - recent[0])
        return int(min(60, max(1, round(1 / rate))))

    # ------------------------------------------------------------------ plumbing
    @web.middleware
    async def middleware(self, request: web.Request, handler):
        if self.keys and request.path not in PUBLIC and not self._authorized(request):
            self.stats["unauthorized"] += 1
            return APIError(401, "missing or wrong bearer token (Authorization: Bearer KEY)", "unauthorized",
                            headers={"WWW-Authenticate": "Bearer"}).response()
        try:
            return await handler(request)
        except APIError as e:
            self.stats["bad_requests"] += e.status == 400
            return e.response()
        except web.HTTPException as e:  # unknown route, wrong method: same JSON shape
            if e.status < 400:
                raise
            return APIError(e.status, e.reason, "not_found" if e.status == 404 else "invalid_request").response()

    def _authorized(self, request: web.Request) -> bool:
        got = request.headers.get("Authorization", "")
        token = got[7:].encode() if got.startswith("Bearer ") else b""
        return any(hmac.compare_digest(token, k) for k in self.keys)

    @staticmethod
    async def body(request: web.Request) -> Any:
        if request.content_type != "application/json":
            raise APIError(400, f"Content-Type must be application/json, not {request.content_type!r}",
                           param="Content-Type")
        raw = await request.read()
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON: {e}", param="body") from None

    @staticmethod
    def ok(model: BaseModel, status: int = 200) -> web.Response:
        return web.Response(body=model.model_dump_json(), status=status, content_type="application/json")

    def task(self, name: str, task_id: str, param: str = "task_id") -> Task:
        t = self.task_index[name].get(task_id)
        if t is None:
            raise APIError(404, f"no task {task_id!r} in {name!r}", "not_found", param)
        return t

    # ------------------------------------------------------------------ handlers
    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.json_response({**self.stats, "open": self.open, "held": len(self.episodes),
                                  "max_open": self.cfg.max_open, "ttl_s": self.cfg.ttl_s, "envs": self.names})

    async def info(self, name: str) -> EnvInfo:
        env = await self.env_for(name, {})
        return EnvInfo(name=name, splits=env.splits(), metric=env.metric_name, success_threshold=env.success_threshold,
                       max_turns=env.max_turns, clarify_rounds=env.clarify_rounds,
                       actions=dict(ACTIONS._actions),
                       classifier=describe(env.classifier), simulator=describe(env.simulator),
                       system_prompt=env.system_prompt, config_keys=remote_config_keys(type(env)))

    async def list_envs(self, request: web.Request) -> web.Response:
        infos = [(await self.info(n)).model_dump() for n in self.names]
        return web.json_response({"envs": infos})

    async def get_env(self, request: web.Request) -> web.Response:
        return self.ok(await self.info(request.match_info["name"]))

    async def list_tasks(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        env = await self.env_for(name, {})
        q = parse(TasksQuery, dict(request.query))
        split = q.split or next(iter(env.splits()))
        if split not in env.splits():
            raise APIError(404, f"{name!r} has splits {list(env.splits())}, not {split!r}", "not_found", "split")
        tasks = list(env.tasks(split))
        if q.seed is not None:
            random.Random(q.seed).shuffle(tasks)
        tasks = tasks[q.offset:None if q.limit is None else q.offset + q.limit]
        out: dict[str, Any] = {"env": name, "split": split, "task_ids": [t.id for t in tasks]}
        if q.full:
            out["tasks"] = [t.model_dump(mode="json") for t in tasks]
        return web.json_response(out)

    async def get_task(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        await self.env_for(name, {})
        return self.ok(self.task(name, request.match_info["task_id"]))

    async def create(self, request: web.Request) -> web.Response:
        req = parse(EpisodeCreate, await self.body(request))
        by_index = req.split is not None or req.index is not None
        if (req.task_id is not None) == by_index or (by_index and (req.split is None or req.index is None)):
            raise APIError(400, "give either task_id or both split and index", param="task_id")
        env = await self.env_for(req.env, req.config)
        if req.task_id is not None:
            task = self.task(req.env, req.task_id)
        else:
            splits = env.splits()
            if req.split not in splits:
                raise APIError(404, f"{req.env!r} has splits {list(splits)}, not {req.split!r}", "not_found", "split")
            if req.index >= splits[req.split]:
                raise APIError(404, f"split {req.split!r} has {splits[req.split]} tasks; no index {req.index}",
                               "not_found", "index")
            task = env.tasks(req.split)[req.index]
        if self.open >= self.cfg.max_open:
            self.stats["shed"] += 1
            wait = self.retry_after()
            raise APIError(503, f"server busy: {self.open} open episodes (limit --max-open {self.cfg.max_open}); "
                                f"retry after {wait}s", "overloaded", headers={"Retry-After": str(wait)})
        h = Held(uuid.uuid4().hex, env.episode(task))
        self.episodes[h.id] = h
        self.open += 1
        self.stats["created"] += 1
        return self.ok(EpisodeCreated(episode_id=h.id, env=req.env, task_id=task.id, observation=h.ep.messages,
                                      max_turns=env.max_turns), 201)

    async def step(self, request: web.Request) -> web.Response:
        h = self.held(request)
        req = parse(StepRequest, await self.body(request))
        if h.error:
            raise APIError(409, f"episode failed: {h.error}", "conflict")
        if h.ep.done:
            raise APIError(409, "episode already ended (terminated or truncated); POST /episodes for a new one",
                           "conflict")
        if h.busy:
            raise APIError(409, "a step of this episode is still running", "conflict")
        m = req.reply
        reply = None if m is None else Reply(text=req.text, model=m.model, latency_s=m.latency_s,
                                             policy_version=m.policy_version,
                                             usage=Usage(prompt_tokens=m.prompt_tokens,
                                                         completion_tokens=m.completion_tokens))
        h.busy = True
        self.touch(h)
        self.stats["steps"] += 1
        try:
            async with asyncio.timeout(self.cfg.step_timeout_s) as deadline:
                res = await h.ep.step(req.text, reply)
        except Exception as e:
            timed_out = isinstance(e, TimeoutError) and deadline.expired()
            self.stats["timeouts"] += timed_out
            self.stats["failed"] += 1
            msg = (f"step timed out after {self.cfg.step_timeout_s:g}s" if timed_out else str(e)
                   if isinstance(e, RoleError) else f"{type(e).__name__}: {e}")
            if h.open:
                self._close(h)
            h.error = msg
            status, type_ = (504, "timeout") if timed_out else (502, "RoleError") if isinstance(e, RoleError) \
                else (500, "env_error")
            raise APIError(status, msg, type_) from None
        finally:
            h.busy = False
            if h.id in self.episodes:
                self.touch(h)
        if h.ep.done:
            self._close(h)
            self.stats["finished"] += 1
        return self.ok(StepResponse(observation=res.observation, reward=res.reward, terminated=res.terminated,
                                    truncated=res.truncated, info=res.info, state=h.state()))

    async def get_episode(self, request: web.Request) -> web.Response:
        h = self.held(request)
        self.touch(h)
        traj = h.ep.trajectory(**({"status": "failed", "error": h.error} if h.error else {}))
        return self.ok(EpisodeView(episode_id=h.id, state=h.state(), trajectory=traj))

    async def delete_episode(self, request: web.Request) -> web.Response:
        h = self.held(request)
        if h.busy:
            raise APIError(409, "a step of this episode is still running", "conflict")
        self.stats["deleted"] += 1
        self.drop(h, "was deleted")
        return web.json_response({"episode_id": h.id, "deleted": True})

    async def score(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        env = await self.env_for(name, {})
        req = parse(ScoreRequest, await self.body(request))
        task = self.task(name, req.task_id)
        return web.json_response({"score": await env.score(req.prediction, task.goal if req.target is None
                                                           else req.target, task)})

    async def classify(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        env = await self.env_for(name, {})
        req = parse(ClassifyRequest, await self.body(request))
        task = None if req.task_id is None else self.task(name, req.task_id)
        try:
            return web.json_response({"action": await env.classifier.classify(req.text, task)})
        except RoleError as e:
            raise APIError(502, str(e), "RoleError") from None

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_schema())

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.middleware], client_max_size=8 * MAX_TEXT)
        for method, path, handler, *_ in ROUTES:  # one table: the routes and their OpenAPI entries
            app.router.add_route(method.upper(), path, getattr(self, handler))
        app.on_startup.append(self.on_startup)
        app.on_cleanup.append(self.on_cleanup)
        return app


# --------------------------------------------------------------------------- OpenAPI
ROUTES = [  # (method, path, handler, summary, request model, response model, status)
    ("get", "/envs", "list_envs", "list the served environments", None, None, 200),
    ("get", "/envs/{name}", "get_env", "one environment: splits, metric, action space, config keys", None, EnvInfo,
     200),
    ("get", "/envs/{name}/tasks", "list_tasks", "task ids of a split (?split=&limit=&offset=&seed=&full=)", None,
     None, 200),
    ("get", "/envs/{name}/tasks/{task_id}", "get_task", "one task", None, Task, 200),
    ("post", "/envs/{name}/score", "score", "the env's score of a prediction against a task's goal", ScoreRequest,
     None, 200),
    ("post", "/envs/{name}/classify", "classify", "the server's action classifier on a text", ClassifyRequest, None,
     200),
    ("post", "/episodes", "create", "start an episode", EpisodeCreate, EpisodeCreated, 201),
    ("post", "/episodes/{episode_id}/step", "step", "the policy's reply; the user's answer or the reward",
     StepRequest, StepResponse, 200),
    ("get", "/episodes/{episode_id}", "get_episode", "the trajectory so far", None, EpisodeView, 200),
    ("delete", "/episodes/{episode_id}", "delete_episode", "end an episode", None, None, 200),
    ("get", "/metrics", "metrics", "counters: open, created, finished, failed, expired, shed, timeouts", None, None,
     200),
    ("get", "/health", "health", "liveness (no auth)", None, None, 200),
    ("get", "/openapi.json", "openapi", "this schema (no auth)", None, None, 200),
]
_ERRORS = {"400": "invalid request (the field is in error.param)", "401": "missing or wrong bearer token",
           "404": "unknown env, task or episode (or one that ended)", "409": "step on an ended, failed or busy episode",
           "503": "too many open episodes (Retry-After)", "504": "step timed out (the episode fails)",
           "502": "a role (classifier or simulator) gave up"}


def openapi_schema() -> dict[str, Any]:
    """OpenAPI 3.1 from the pydantic wire models (one source for validation and docs)."""
    models = [EnvInfo, Task, ScoreRequest, ClassifyRequest, EpisodeCreate, EpisodeCreated, StepRequest, StepResponse,
              EpisodeView, ErrorBody, TasksQuery]
    components: dict[str, Any] = {}
    for m in models:
        s = m.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(s.pop("$defs", {}))
        components[m.__name__] = s
    ref = lambda m: {"$ref": f"#/components/schemas/{m.__name__}"}  # noqa: E731
    paths: dict[str, Any] = {}
    for method, path, _, summary, req, resp, status in ROUTES:
        op: dict[str, Any] = {"summary": summary, "responses": {
            str(status): {"description": "OK", **({"content": {"application/json": {"schema": ref(resp)}}} if resp
                                                   else {})},
            **{code: {"description": d, "content": {"application/json": {"schema": ref(ErrorBody)}}}
               for code, d in _ERRORS.items()}}}
        params = [{"name": p.strip("{}"), "in": "path", "required": True, "schema": {"type": "string"}}
                  for p in path.split("/") if p.startswith("{")]
        if path == "/envs/{name}/tasks":
            params += [{"name": k, "in": "query", "required": False, "schema": v}
                       for k, v in components["TasksQuery"]["properties"].items()]
        if params:
            op["parameters"] = params
        if req:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(req)}}}
        paths.setdefault(path, {})[method] = op
    return {"openapi": "3.1.0", "info": {"title": "simkit env-server", "version": "1",
                                         "description": "Gym-style clarify-or-answer environments over HTTP."},
            "components": {"schemas": components,
                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
            "security": [{"bearer": []}, {}], "paths": paths}


# --------------------------------------------------------------------------- CLI
def register_cli(sub: argparse._SubParsersAction) -> None:
    from simkit.config import add_config_args

    p = sub.add_parser(
        "env-server", help="serve the environments over a gym-style HTTP/JSON API (simkit.RemoteEnv)",
        description="Serve registered environments to agents in other processes or languages: POST /episodes, "
                    "POST /episodes/{id}/step, GET/DELETE /episodes/{id}, GET /envs, /openapi.json. The same "
                    "Env/Episode code as in-process use; roles as for `serve` (--simulator grounded|URL, "
                    "--classifier rule|URL). Bearer tokens come from the variable named by --auth-keys-env.")
    add_config_args(p, EnvServerConfig)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from simkit.config import config_from_args

    try:
        cfg = config_from_args(EnvServerConfig, args)
    except ValueError as e:
        raise SystemExit(f"simkit env-server: bad configuration: {e}")
    unknown = sorted(set(cfg.env) - set(registered()))
    if unknown:
        raise SystemExit(f"simkit env-server: no environment {unknown[0]!r}; registered: {registered()}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    server = EnvServer(cfg)
    if not server.keys and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("no bearer tokens in $%s: anyone who reaches %s can play episodes", cfg.auth_keys_env, cfg.host)
    print(f"simkit env-server: {', '.join(server.names)} on http://{cfg.host}:{cfg.port}", flush=True)
    web.run_app(server.app(), host=cfg.host, port=cfg.port, print=None, access_log=None)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m simkit.envserver.server ...`: this command alone, without importing every other
    command's dependencies (torch), so a test or bench starts it in a second, not ten."""
    import sys

    from simkit.config import dispatch

    p = argparse.ArgumentParser(prog="simkit")
    register_cli(p.add_subparsers(dest="command"))
    return dispatch(p, ["env-server", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
