"""`simkit loadtest`: how fast can simkit roll out full episodes against a server?

    simkit loadtest                                  # built-in fake server, 100 episodes in flight
    simkit loadtest --concurrency 1000 --duration 30 --fake-latency-ms 50
    simkit loadtest --rate 200 --duration 20 --url http://127.0.0.1:8000/v1   # open loop, real server

Every episode is a real engine episode: the policy replies, an LLM classifier labels the action,
an LLM user simulator answers clarifying questions, the env scores the outcome (toy env by
default). Two load models:
- closed loop (`--concurrency N`): N episodes in flight; a new one starts when one ends.
- open loop (`--rate R`): episodes arrive on a schedule (R per second, Poisson or uniform),
  whether or not earlier ones finished; an episode's latency is measured from its *intended*
  start, so a saturated server shows up as queueing delay (no coordinated omission).
Measured: per-role request rates and p50/p90/p99/max latency, errors by kind, retries,
timeouts, episodes/s, turns/s, tokens/s, client CPU and RSS; a one-line live display, a JSON
report and a PNG plot of latency and throughput over time in the run directory. The run stops
by itself (episode count, duration, then a bounded drain). Targets other than loopback are
refused unless `--allow-remote`.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import signal
import sys
import time
from array import array
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from simkit.engine import DEFAULT_CONCURRENCY
from simkit.loadtools.fakeserver import CpuList, FakeConfig
from simkit.roles.client import ClientSettings, Transport
from simkit.roles.build import PolicyRole, RolesConfig, build_roles, default_transport

ROLES = ("policy", "classifier", "simulator")


_CLIENT = ClientSettings.model_fields  # role-client defaults live there, once


def _flags(*flags: str, **extra: Any) -> dict[str, Any]:
    return {"json_schema_extra": {"flags": list(flags), **extra}}


class LoadConfig(BaseModel):
    """One load test. `url` None: start the built-in fake server (its settings in `fake`)."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(None, **_flags("--url", metavar="URL[,URL...]"),
                            description="OpenAI-compatible base URL(s) for all three roles (default: the built-in "
                                        "fake server, started on loopback)")
    policy_url: str | None = Field(None, **_flags("--policy-url", metavar="URL[,URL...]"),
                                   description="policy URL(s), overriding --url")
    classifier_url: str | None = Field(None, **_flags("--classifier-url", metavar="URL|rule"),
                                       description="classifier URL(s), or 'rule' (offline)")
    simulator_url: str | None = Field(None, **_flags("--simulator-url", metavar="URL|grounded"),
                                      description="user simulator URL(s), or 'grounded' (offline)")
    model: str | None = Field(None, description="model/adapter name for every role (default: each server's first "
                                                "model; on the fake server the role's name)")
    api_key_env: str | None = Field(None, description=_CLIENT["api_key_env"].description)
    transport: Transport = Field(_CLIENT["transport"].default, description=_CLIENT["transport"].description)
    allow_remote: bool = Field(False, description="allow targets other than loopback (only servers you own)")

    concurrency: int = Field(DEFAULT_CONCURRENCY, ge=1, **_flags("--concurrency", "-c"), description="closed loop: episodes in flight")
    rate: float | None = Field(None, **_flags("--rate", "-r"),
                               description="open loop: episode arrivals per second (overrides the closed loop)")
    arrival: Literal["poisson", "uniform"] = Field("poisson", description="open-loop arrival process")
    max_pending: int = Field(10000, ge=1, description="open loop: most episodes running or waiting to start")
    episodes: int | None = Field(5000, ge=0, **_flags("--episodes", "-n"),
                                 description="stop after this many episodes (0: no limit; default 5000)")
    duration: float = Field(30.0, ge=0, **_flags("--duration", "-d"), description="stop starting episodes after N seconds")
    drain: float | None = Field(None, ge=0, description="then wait at most N seconds for in-flight episodes, "
                                                        "cancelling the rest (default timeout * (retries + 1) + 5)")

    max_in_flight: int | None = Field(None, ge=1, description="max concurrent requests per role (default: never "
                                                              "limiting the load)")
    timeout: float = Field(_CLIENT["timeout_s"].default, gt=0,
                           description="per-request timeout in seconds (the role clients' default)")
    max_retries: int = Field(_CLIENT["max_retries"].default, ge=0, description=_CLIENT["max_retries"].description)
    max_tokens: int = Field(PolicyRole.model_fields["max_tokens"].default, ge=1,
                            description="policy max completion tokens")
    temperature: float = Field(PolicyRole.model_fields["temperature"].default, ge=0, description="policy temperature")

    env: str = Field("toy", description="registered environment")
    env_size: int = Field(1000, ge=1, description="toy env: number of tasks, cycled")
    max_turns: int | None = Field(None, ge=1, description="turn cap per episode (default: the env's)")
    seed: int = Field(0, description="seed for arrivals and the toy env")

    out: str | None = Field(None, **_flags("--out", "--run-dir"),
                            description="run directory (default runs/loadtest-YYYYmmdd-HHMMSS)")
    interval: float = Field(1.0, gt=0, description="seconds per time-series point and live refresh")
    live: bool | None = Field(None, description="the live status line (default: when stderr is a terminal)")
    plot: bool = Field(True, description="write the PNG plot")
    print_json: bool = Field(False, **_flags("--json"), description="print the JSON report instead of the summary")

    fake: dict[str, Any] = Field(default_factory=dict, description="FakeConfig fields for the built-in server "
                                                                    "(the --fake-* flags, from FakeFlags)")
    fake_workers: int = Field(1, ge=1, description="fake server processes (SO_REUSEPORT)")
    fake_cpus: CpuList | None = Field(None, description="pin the fake server to these CPUs, e.g. 1 or 2,3 "
                                                        "(default: no pinning)")
    fake_in_process: bool = Field(False, description="run the fake server in the client's event loop (shares its "
                                                     "CPU; for tests); default: its own process")
    client_cpus: CpuList | None = Field(None, description="pin this process (the client) to these CPUs, e.g. 0 "
                                                          "(default: no pinning)")

    @field_validator("episodes")
    @classmethod
    def _no_limit(cls, v: int | None) -> int | None:
        return None if v == 0 else v


class _BuiltinFake(FakeConfig):
    """Built-in fake server (used when no --url is given)."""


class FakeFlags(BaseModel):
    """Where the `--fake-*` flags come from: FakeConfig's fields nested under `fake`, which config.py
    prefixes with the field's name. `LoadConfig.fake` keeps only the fields set (flags or YAML)."""

    fake: _BuiltinFake = Field(default_factory=_BuiltinFake)


# --------------------------------------------------------------------------- measuring
def _pct(values, ps=(0.5, 0.9, 0.99)) -> dict[str, float | None]:
    """p50/p90/p99/max/mean of a sequence (nearest-rank)."""
    n = len(values)
    if not n:
        return {**{f"p{round(p * 100)}": None for p in ps}, "max": None, "mean": None}
    s = sorted(values)
    out = {f"p{round(p * 100)}": round(s[min(n - 1, max(0, math.ceil(p * n) - 1))], 6) for p in ps}
    out["max"] = round(s[-1], 6)
    out["mean"] = round(sum(s) / n, 6)
    return out


class _RoleRecord:
    __slots__ = ("latencies", "ok", "errors", "cancelled", "in_flight", "error_kinds")

    def __init__(self) -> None:
        self.latencies = array("d")  # successful attempts, seconds
        self.ok = 0
        self.errors = 0
        self.cancelled = 0
        self.in_flight = 0
        self.error_kinds: dict[str, int] = {}


class RecordingTransport:
    """Wraps a role's transport: every attempt's latency and outcome (cheap: two appends)."""

    def __init__(self, inner: Any, rec: _RoleRecord):
        self.inner, self.rec = inner, rec

    async def post_chat(self, base_url: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
        from simkit.roles.transport import TransportError

        rec = self.rec
        rec.in_flight += 1
        t0 = time.perf_counter()
        try:
            body = await self.inner.post_chat(base_url, payload, timeout)
        except TransportError as e:
            rec.errors += 1
            cause = e.__cause__ or e
            if e.status:
                kind = str(e.status)
            elif isinstance(cause, TimeoutError) or "timeout" in type(cause).__name__.lower():
                kind = "timeout"
            else:
                kind = type(cause).__name__
            rec.error_kinds[kind] = rec.error_kinds.get(kind, 0) + 1
            raise
        except asyncio.CancelledError:
            rec.cancelled += 1
            raise
        finally:
            rec.in_flight -= 1
        rec.latencies.append(time.perf_counter() - t0)
        rec.ok += 1
        return body

    async def get_json(self, base_url: str, path: str, timeout: float) -> Any:
        return await self.inner.get_json(base_url, path, timeout)

    async def post_json(self, base_url: str, path: str, payload: Any, timeout: float) -> Any:
        return await self.inner.post_json(base_url, path, payload, timeout)

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Arrival:
    """An open-loop episode: the task plus its intended start."""

    __slots__ = ("task", "at", "i")

    def __init__(self, task: Any, at: float, i: int):
        self.task, self.at, self.i = task, at, i


class _Done:
    """What an open-loop episode hands the engine: the trajectory and its latencies."""

    __slots__ = ("trajectory", "latency", "lag")

    def __init__(self, trajectory: Any, latency: float, lag: float):
        self.trajectory, self.latency, self.lag = trajectory, latency, lag

    @property
    def status(self) -> str:
        return self.trajectory.status


# --------------------------------------------------------------------------- targets
def is_loopback(url: str) -> bool:
    import ipaddress
    from urllib.parse import urlsplit

    host = (urlsplit(url).hostname or "").strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split(urls: str | None) -> list[str]:
    return [u.strip() for u in (urls or "").split(",") if u.strip()]


def role_targets(cfg: LoadConfig, fake_url: str | None) -> dict[str, list[str] | str]:
    """role -> URLs (or 'rule'/'grounded' for an offline classifier/simulator)."""
    base = _split(cfg.url) or ([fake_url] if fake_url else [])
    out: dict[str, list[str] | str] = {}
    for role, own, offline in (("policy", cfg.policy_url, None), ("classifier", cfg.classifier_url, "rule"),
                               ("simulator", cfg.simulator_url, "grounded")):
        if offline and own == offline:
            out[role] = offline
            continue
        urls = _split(own) or base
        if not urls:
            raise ValueError(f"no URL for the {role}: give --url (or --{role}-url)")
        out[role] = urls
    return out


def check_targets(targets: dict[str, list[str] | str], allow_remote: bool) -> None:
    remote = sorted({u for v in targets.values() if isinstance(v, list) for u in v if not is_loopback(u)})
    if remote and not allow_remote:
        raise ValueError(f"refusing non-loopback target(s) {', '.join(remote)}: a load test can overload a "
                         "shared server; pass --allow-remote if you own it")


# --------------------------------------------------------------------------- the run
class LoadTest:
    def __init__(self, cfg: LoadConfig, targets: dict[str, list[str] | str], live: bool = False,
                 stream: Any = None, fake_url: str | None = None):
        self.cfg, self.targets, self.live, self.fake_url = cfg, targets, live, fake_url
        self.stream = stream or sys.stderr
        self.records = {r: _RoleRecord() for r in ROLES}
        self.clients: dict[str, Any] = {}
        self.ep_latency = array("d")
        self.ep_lag = array("d")
        self.turns = 0
        self.ok = self.failed = 0
        self.rewards = 0.0
        self.first_actions: dict[str, int] = {}
        self.errors_by_kind: dict[str, int] = {}
        self.series: list[dict[str, Any]] = []
        self.started = 0
        self.stopped_by = ""
        self._marks = {r: 0 for r in ROLES}
        self._ep_mark = 0
        self._turn_mark = 0
        self._tok_mark = 0
        self._fail_mark = 0

    # ------------------------------------------------------------------ set-up
    def roles_config(self) -> RolesConfig:
        """The load test's roles as the shared `RolesConfig` (each role's server, the client
        settings). On the built-in fake server a role's model is its name: the fake routes by it."""
        cfg = self.cfg
        cap = cfg.max_in_flight or (cfg.max_pending if cfg.rate else cfg.concurrency)

        def url(role: str) -> str:
            t = self.targets[role]
            return t if isinstance(t, str) else ",".join(t)

        def model(role: str) -> str | None:
            return role if cfg.model is None and self.targets[role] == [self.fake_url] else cfg.model

        return RolesConfig(
            policy={"url": url("policy"), "model": cfg.model, "temperature": cfg.temperature,
                    "max_tokens": cfg.max_tokens},
            simulator={"url": url("simulator"), "model": model("simulator")},
            classifier={"url": url("classifier"), "model": model("classifier")},
            client={"api_key_env": cfg.api_key_env, "transport": cfg.transport, "max_in_flight": max(1, cap),
                    "timeout_s": cfg.timeout, "max_retries": cfg.max_retries})

    def _build(self):
        from simkit.env import make

        cfg = self.cfg

        def recording(role: str, settings: ClientSettings, api_key: str | None) -> RecordingTransport:
            return RecordingTransport(default_transport(role, settings, api_key), self.records[role])

        roles = build_roles(self.roles_config(), cfg.env, transport=recording)
        self.clients = {c.role: c for c in roles.clients}
        env_kw: dict[str, Any] = {"seed": cfg.seed}
        if cfg.env == "toy":
            env_kw["size"] = cfg.env_size
        if cfg.max_turns:
            env_kw["max_turns"] = cfg.max_turns
        env = make(cfg.env, classifier=roles.classifier, simulator=roles.simulator, **env_kw)
        split = next(iter(env.splits()))
        tasks = env.tasks(split)
        if not tasks:
            raise ValueError(f"env {cfg.env!r} split {split!r} has no tasks")
        return env, tasks, roles.policy

    async def _resolve_models(self) -> None:
        """Ask each role's server for its model once, before the clock starts."""
        for c in self.clients.values():
            if c.model is None:
                await c.resolve_model()

    # ------------------------------------------------------------------ run
    async def run(self) -> dict[str, Any]:
        """Build the roles and env, drive the episodes, and report (CPU measured around it)."""
        import psutil

        env, tasks, policy = self._build()
        try:
            await self._resolve_models()
            proc = psutil.Process()
            proc.cpu_percent(None)
            cpu0 = proc.cpu_times()
            self.rss_max = proc.memory_info().rss
            await self._drive(env, tasks, policy, proc)
            cpu1 = proc.cpu_times()
            self.cpu_s = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
            return self.report()
        finally:
            for c in self.clients.values():
                await c.aclose()

    async def _drive(self, env: Any, tasks: list, policy: Any, proc: Any) -> None:
        """Run episodes until the episode limit or the duration, then drain the in-flight ones
        for at most `drain` seconds; a time-series point every `interval`."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        self.t0 = t0 = loop.time()
        deadline = t0 + cfg.duration
        drain = cfg.drain if cfg.drain is not None else cfg.timeout * (cfg.max_retries + 1) + 5.0
        stop = asyncio.Event()
        if cfg.rate:
            gen = self._open_loop(env, tasks, policy, t0, deadline, stop)
        else:
            gen = self._closed_loop(env, tasks, policy, deadline, stop)
        ticker = asyncio.create_task(self._tick(proc, stop))
        try:
            async with contextlib.aclosing(gen):
                try:
                    async with asyncio.timeout_at(deadline + drain):
                        async for item in gen:
                            self._episode_done(item)
                except TimeoutError:
                    self.stopped_by = "drain timeout (in-flight episodes cancelled)"
        except (KeyboardInterrupt, asyncio.CancelledError):
            self.stopped_by = "interrupted"
            raise
        finally:
            stop.set()
            self.elapsed = loop.time() - t0
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            self._sample(proc, final=True)
            if self.live:
                self.stream.write("\n")
                self.stream.flush()

    def _stop_reason(self, i: int) -> str:
        limit = self.cfg.episodes
        return self.stopped_by or ("episodes" if limit is not None and i >= limit else "duration")

    def _open_loop(self, env: Any, tasks: list, policy: Any, t0: float, deadline: float, stop: asyncio.Event):
        """Open loop: episodes start on an arrival schedule (Poisson or uniform) whatever is in
        flight; an episode's latency counts from its intended start."""
        from simkit.engine import amap, failed_trajectory, run_episode

        cfg, loop = self.cfg, asyncio.get_running_loop()
        rng = random.Random(cfg.seed)

        def arrivals():
            at = t0
            for i in itertools.count():
                if (cfg.episodes is not None and i >= cfg.episodes) or at >= deadline or stop.is_set():
                    self.stopped_by = self._stop_reason(i)
                    return
                self.started += 1
                yield _Arrival(tasks[i % len(tasks)], at, i)
                at += rng.expovariate(cfg.rate) if cfg.arrival == "poisson" else 1.0 / cfg.rate

        async def one(arr: _Arrival) -> _Done:
            delay = arr.at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            start = loop.time()
            traj = await run_episode(env, arr.task, policy)
            return _Done(traj, loop.time() - arr.at, start - arr.at)

        def failed(arr: _Arrival, e: Exception) -> _Done:
            return _Done(failed_trajectory(env.name, arr.task, e), loop.time() - arr.at, 0.0)

        return amap(one, arrivals(), concurrency=cfg.max_pending, on_error=failed, total=cfg.episodes)

    def _closed_loop(self, env: Any, tasks: list, policy: Any, deadline: float, stop: asyncio.Event):
        """Closed loop: a fixed number of episodes in flight, each replaced when it ends."""
        from simkit.engine import run_episodes

        cfg, loop = self.cfg, asyncio.get_running_loop()

        def closed():
            for i in itertools.count():
                if (cfg.episodes is not None and i >= cfg.episodes) or stop.is_set() or loop.time() >= deadline:
                    self.stopped_by = self._stop_reason(i)
                    return
                self.started += 1
                yield tasks[i % len(tasks)]

        return run_episodes(env, closed(), policy, concurrency=cfg.concurrency, progress=False, total=cfg.episodes)

    def _episode_done(self, item: Any) -> None:
        traj = getattr(item, "trajectory", item)
        if isinstance(item, _Done):
            self.ep_latency.append(item.latency)
            self.ep_lag.append(item.lag)
        else:
            self.ep_latency.append(traj.duration_s)
        self.turns += sum(1 for t in traj.turns if t.role == "assistant")
        if traj.status == "ok":
            self.ok += 1
            self.rewards += traj.reward
            a = traj.first_action or "NONE"
            self.first_actions[a] = self.first_actions.get(a, 0) + 1
        else:
            self.failed += 1
        if self.cfg.episodes is not None and self.ok + self.failed >= self.cfg.episodes:
            self.stopped_by = self.stopped_by or "episodes"

    # ------------------------------------------------------------------ time series + live line
    async def _tick(self, proc: Any, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self.cfg.interval)
            self._sample(proc)

    def _sample(self, proc: Any, final: bool = False) -> None:
        now = asyncio.get_running_loop().time()
        t = now - self.t0
        prev_t = self.series[-1]["t"] if self.series else 0.0
        dt = max(1e-9, t - prev_t)
        if final and dt < self.cfg.interval / 4 and self.series:
            return
        rss = proc.memory_info().rss
        self.rss_max = max(self.rss_max, rss)
        point: dict[str, Any] = {"t": round(t, 3), "cpu_percent": proc.cpu_percent(None), "rss_mb": round(rss / 2**20, 1)}
        new_lat: list[float] = []
        reqs = 0
        for role, rec in self.records.items():
            n = len(rec.latencies)
            lat = rec.latencies[self._marks[role]:n]
            self._marks[role] = n
            if role in self.clients:
                point[f"{role}_per_s"] = round(len(lat) / dt, 2)
            new_lat.extend(lat)
            reqs += len(lat)
        q = _pct(new_lat)
        point["requests_per_s"] = round(reqs / dt, 2)
        point["latency_p50_ms"] = round(q["p50"] * 1000, 3) if q["p50"] is not None else None
        point["latency_p99_ms"] = round(q["p99"] * 1000, 3) if q["p99"] is not None else None
        n_ep = len(self.ep_latency)
        eq = _pct(self.ep_latency[self._ep_mark:n_ep])
        point["episodes_per_s"] = round((n_ep - self._ep_mark) / dt, 2)
        point["episode_p50_s"], point["episode_p99_s"] = eq["p50"], eq["p99"]
        self._ep_mark = n_ep
        point["turns_per_s"] = round((self.turns - self._turn_mark) / dt, 2)
        self._turn_mark = self.turns
        tok = sum(c.stats.completion_tokens for c in self.clients.values())
        point["completion_tokens_per_s"] = round((tok - self._tok_mark) / dt, 1)
        self._tok_mark = tok
        errs = sum(r.errors for r in self.records.values())
        point["errors"] = errs - self._fail_mark
        self._fail_mark = errs
        point["in_flight"] = sum(r.in_flight for r in self.records.values())
        point["episodes_in_flight"] = self.started - n_ep
        self.series.append(point)
        if self.live:
            self._print_live(point)

    def _print_live(self, p: dict[str, Any]) -> None:
        done = self.ok + self.failed
        retries = sum(c.stats.retries for c in self.clients.values())
        fails = sum(c.stats.failures for c in self.clients.values())
        lat = (f"p50 {p['latency_p50_ms']:.0f}ms p99 {p['latency_p99_ms']:.0f}ms"
               if p["latency_p50_ms"] is not None else "p50 - p99 -")
        line = (f"[{p['t']:6.1f}s] ep {done} ({p['episodes_per_s']:.0f}/s, {p['episodes_in_flight']} open) "
                f"req {p['requests_per_s']:.0f}/s {lat} retry {retries} fail {fails} "
                f"cpu {p['cpu_percent']:.0f}% rss {p['rss_mb']:.0f}MB")
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns - 1
        except (OSError, ValueError, AttributeError):
            width = 160
        self.stream.write("\r" + line[:width].ljust(width))
        self.stream.flush()

    # ------------------------------------------------------------------ report
    def report(self) -> dict[str, Any]:
        cfg, el = self.cfg, max(1e-9, self.elapsed)
        per_role: dict[str, Any] = {}
        tot = dict(calls=0, successes=0, failures=0, retries=0, attempts=0, cancelled=0, prompt_tokens=0,
                   completion_tokens=0)
        all_lat: list[float] = []
        for role, c in self.clients.items():
            st, rec = c.stats, self.records[role]
            calls = st.successes + st.failures
            d = {
                "calls": calls, "successes": st.successes, "failures": st.failures, "retries": st.retries,
                "attempts": st.requests, "attempts_ok": rec.ok, "attempts_failed": rec.errors,
                "cancelled": rec.cancelled, "errors": dict(sorted(rec.error_kinds.items())),
                "calls_per_s": round(st.successes / el, 2), "attempts_per_s": round(st.requests / el, 2),
                "latency_s": _pct(rec.latencies), "prompt_tokens": st.prompt_tokens,
                "completion_tokens": st.completion_tokens, "urls": [e.url for e in c.endpoints],
                "model": c.model,
            }
            per_role[role] = d
            for k in tot:
                tot[k] += d[k] if k in d else 0
            all_lat.extend(rec.latencies)
        offline = {r: t for r, t in self.targets.items() if isinstance(t, str)}
        done = self.ok + self.failed
        rep: dict[str, Any] = {
            "mode": "open" if cfg.rate else "closed",
            "load": ({"rate_per_s": cfg.rate, "arrival": cfg.arrival, "max_pending": cfg.max_pending} if cfg.rate
                     else {"concurrency": cfg.concurrency}),
            "elapsed_s": round(el, 3), "stopped_by": self.stopped_by or "duration",
            "episodes": {
                "started": self.started, "finished": done, "ok": self.ok, "failed": self.failed,
                "cancelled": self.started - done, "per_s": round(done / el, 2),
                "latency_s": _pct(self.ep_latency),
                "latency_from": "intended start" if cfg.rate else "start",
                "turns": self.turns, "turns_per_s": round(self.turns / el, 2),
                "mean_turns": round(self.turns / done, 3) if done else None,
                "mean_reward": round(self.rewards / self.ok, 4) if self.ok else None,
                "first_action": dict(sorted(self.first_actions.items())),
            },
            "requests": {**tot, "per_s": round(tot["successes"] / el, 2), "latency_s": _pct(all_lat),
                         "per_role": per_role, "offline_roles": offline},
            "tokens": {"prompt": tot["prompt_tokens"], "completion": tot["completion_tokens"],
                       "completion_per_s": round(tot["completion_tokens"] / el, 1),
                       "total_per_s": round((tot["prompt_tokens"] + tot["completion_tokens"]) / el, 1)},
            "client": {"cpu_s": round(self.cpu_s, 3), "cpu_util": round(self.cpu_s / el, 3),
                       "cpu_us_per_request": round(self.cpu_s / max(1, tot["attempts"]) * 1e6, 1),
                       "rss_mb_max": round(self.rss_max / 2**20, 1), "pid": os.getpid()},
        }
        if cfg.rate:
            lag = _pct(self.ep_lag)
            rep["schedule"] = {"scheduled": self.started, "start_lag_s": lag,
                               "achieved_rate_per_s": round(done / el, 2)}
        rep["timeseries"] = self.series
        return rep


# --------------------------------------------------------------------------- entry points
async def run_loadtest(cfg: LoadConfig, live: bool | None = None, stream: Any = None) -> dict[str, Any]:
    """Run one load test (starting the fake server when `cfg.url` is None); the report dict."""
    from simkit.loadtools.fakeserver import FakeServer, start_fake_server

    if cfg.rate is not None and cfg.rate <= 0:
        raise ValueError("--rate must be > 0")
    if cfg.concurrency < 1 or cfg.max_pending < 1:
        raise ValueError("--concurrency and --max-pending must be >= 1")
    if cfg.episodes is None and not cfg.duration:
        raise ValueError("give --episodes or --duration: a load test must stop by itself")
    live = cfg.live if live is None else live
    if live is None:
        live = (stream or sys.stderr).isatty()
    need_fake = not _split(cfg.url) and not all(
        _split(getattr(cfg, f"{r}_url")) or getattr(cfg, f"{r}_url") in ("rule", "grounded") for r in ROLES)
    async with contextlib.AsyncExitStack() as stack:
        fake_url = server = proc = None
        fake_cfg = FakeConfig(**cfg.fake) if need_fake else None
        if need_fake and cfg.fake_in_process:
            server = await FakeServer(fake_cfg).start()
            stack.push_async_callback(server.close)
            fake_url = server.url
        elif need_fake:
            proc = stack.enter_context(start_fake_server(fake_cfg, workers=cfg.fake_workers, cpus=cfg.fake_cpus))
            fake_url = proc.url
        targets = role_targets(cfg, fake_url)
        check_targets(targets, cfg.allow_remote)
        per_worker = need_fake and not cfg.fake_in_process and cfg.fake_workers > 1  # /stats: one worker's view
        s0 = None if per_worker else await _fake_stats(server, proc)
        lt = LoadTest(cfg, targets, live=live, stream=stream, fake_url=fake_url)
        rep = await lt.run()
        s1 = None if per_worker else await _fake_stats(server, proc)
        rep["targets"] = {r: t for r, t in targets.items()}
        if s0 and s1:
            served = max(1, s1["requests"] - s0["requests"])
            rep["server"] = {
                "kind": "built-in fake server" + (" (in process)" if server else f" (pid {proc.proc.pid})"),
                "config": fake_cfg.model_dump() if fake_cfg else None,
                "requests": s1["requests"] - s0["requests"], "errors_injected": s1["errors"] - s0["errors"],
                "stalls_injected": s1["stalls"] - s0["stalls"],
                "cpu_us_per_request": None if server else round((s1["cpu_s"] - s0["cpu_s"]) / served * 1e6, 1),
                "max_rss_mb": s1.get("max_rss_mb"),
            }
        rep["config"] = cfg.model_dump()
        return rep


async def _fake_stats(server: Any, proc: Any) -> dict[str, Any] | None:
    if server is not None:
        return server.stats.as_dict()
    if proc is not None:
        return await asyncio.to_thread(proc.stats)
    return None


def write_outputs(rep: dict[str, Any], out: Path, plot: bool = True) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"report": str(out / "report.json")}
    if plot and rep.get("timeseries"):
        try:
            plot_report(rep, out / "loadtest.png")
            files["plot"] = str(out / "loadtest.png")
        except Exception as e:  # a plot must never lose the report
            files["plot_error"] = f"{type(e).__name__}: {e}"
    rep["files"] = files
    (out / "report.json").write_text(json.dumps(rep, indent=2))
    return files


def plot_report(rep: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = rep["timeseries"]
    t = [p["t"] for p in ts]
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    ax = axes[0]
    ax.plot(t, [p["requests_per_s"] for p in ts], label="requests/s (all roles)")
    for role in ROLES:
        key = f"{role}_per_s"
        if ts and key in ts[0]:
            ax.plot(t, [p.get(key, 0) for p in ts], lw=0.8, ls="--", label=f"{role} req/s")
    ax.set_ylabel("requests / s")
    ax2 = ax.twinx()
    ax2.plot(t, [p["episodes_per_s"] for p in ts], color="k", lw=1.2, label="episodes/s")
    ax2.set_ylabel("episodes / s")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=8)
    ax.set_title(f"simkit loadtest ({rep['mode']} loop: "
                 + ", ".join(f"{k}={v}" for k, v in rep["load"].items()) + ")")
    ax = axes[1]
    ax.plot(t, [p["latency_p50_ms"] for p in ts], label="request p50")
    ax.plot(t, [p["latency_p99_ms"] for p in ts], label="request p99")
    ax.set_ylabel("request latency (ms)")
    ax2 = ax.twinx()
    ax2.plot(t, [p["episode_p50_s"] for p in ts], color="tab:green", ls=":", label="episode p50")
    ax2.plot(t, [p["episode_p99_s"] for p in ts], color="tab:red", ls=":", label="episode p99")
    ax2.set_ylabel(f"episode latency (s, from {rep['episodes']['latency_from']})")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    ax = axes[2]
    ax.plot(t, [p["cpu_percent"] for p in ts], label="client CPU %")
    ax.set_ylabel("client CPU %")
    ax2 = ax.twinx()
    ax2.plot(t, [p["episodes_in_flight"] for p in ts], color="tab:purple", label="episodes open")
    ax2.plot(t, [p["errors"] for p in ts], color="tab:red", label="errors / interval")
    ax2.set_ylabel("count")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    ax.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_text(rep: dict[str, Any]) -> str:
    ep, rq, cl = rep["episodes"], rep["requests"], rep["client"]

    def ms(q: dict, k: str) -> str:
        return f"{q[k] * 1000:.1f}" if q.get(k) is not None else "-"

    lines = [f"simkit loadtest: {rep['mode']} loop "
             + ", ".join(f"{k}={v}" for k, v in rep["load"].items())
             + f"; {rep['elapsed_s']:.1f}s; stopped by {rep['stopped_by']}",
             f"episodes: {ep['finished']} finished ({ep['ok']} ok, {ep['failed']} failed, {ep['cancelled']} cancelled), "
             f"{ep['per_s']:.1f}/s, {ep['turns_per_s']:.1f} turns/s, episode latency p50 "
             f"{ep['latency_s']['p50'] or 0:.3f}s p99 {ep['latency_s']['p99'] or 0:.3f}s (from {ep['latency_from']})",
             f"{'role':<11} {'calls/s':>9} {'calls':>8} {'fail':>6} {'retry':>6} {'p50 ms':>8} {'p90 ms':>8} "
             f"{'p99 ms':>8} {'max ms':>8}  errors"]
    for role, d in rq["per_role"].items():
        q = d["latency_s"]
        lines.append(f"{role:<11} {d['calls_per_s']:>9.1f} {d['calls']:>8} {d['failures']:>6} {d['retries']:>6} "
                     f"{ms(q, 'p50'):>8} {ms(q, 'p90'):>8} {ms(q, 'p99'):>8} {ms(q, 'max'):>8}  "
                     f"{json.dumps(d['errors']) if d['errors'] else '-'}")
    q = rq["latency_s"]
    lines.append(f"{'all':<11} {rq['per_s']:>9.1f} {rq['calls']:>8} {rq['failures']:>6} {rq['retries']:>6} "
                 f"{ms(q, 'p50'):>8} {ms(q, 'p90'):>8} {ms(q, 'p99'):>8} {ms(q, 'max'):>8}")
    lines.append(f"tokens: {rep['tokens']['completion_per_s']:.0f} completion/s, {rep['tokens']['total_per_s']:.0f} total/s; "
                 f"client: CPU {cl['cpu_util']:.0%} ({cl['cpu_us_per_request']:.0f} us/request), RSS max {cl['rss_mb_max']:.0f} MB")
    if rep.get("server") and rep["server"].get("cpu_us_per_request") is not None:
        lines.append(f"fake server: {rep['server']['cpu_us_per_request']:.0f} us CPU/request, "
                     f"RSS {rep['server']['max_rss_mb']:.0f} MB")
    if "schedule" in rep:
        lag = rep["schedule"]["start_lag_s"]
        lines.append(f"open loop: achieved {rep['schedule']['achieved_rate_per_s']:.1f} ep/s of {rep['load']['rate_per_s']} "
                     f"scheduled; start lag p50 {lag['p50'] or 0:.3f}s max {lag['max'] or 0:.3f}s")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI
_EPILOG = """examples:
  simkit loadtest                                       # fake server, 100 in flight, 30 s / 5000 episodes
  simkit loadtest --concurrency 1000 --fake-latency-ms 50 --fake-latency-dist lognormal
  simkit loadtest --rate 300 --duration 20 --fake-max-concurrency 64   # open loop into a saturated server
  simkit loadtest --fake-error-rate 0.05 --fake-stall-rate 0.01 --timeout 2   # retries and timeouts
  simkit loadtest --url http://127.0.0.1:8000/v1 --model my-lora --concurrency 256
  simkit loadtest --policy-url http://127.0.0.1:8000/v1 --classifier-url rule --simulator-url grounded

outputs: RUN_DIR/report.json (summary, per-role stats, time series) and RUN_DIR/loadtest.png.
The fake server alone: python -m simkit.loadtools.fakeserver --help
"""


def register_cli(sub: argparse._SubParsersAction) -> None:
    from simkit.config import add_config_args

    p = sub.add_parser(
        "loadtest", help="measure rollout throughput and latency (full episodes) against a server",
        description=__doc__, epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, LoadConfig)
    add_config_args(p, FakeFlags, config_flag=False, skip=("fake.model",))  # --model names the model
    p.set_defaults(func=_cli)


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    """Flags over `--config` YAML over the defaults; the `--fake-*` flags over the YAML's `fake:`,
    checked as FakeConfig fields (a bad one is named by its flag)."""
    from simkit.config import config_from_args as from_args

    cfg = from_args(LoadConfig, args)
    cfg.fake = from_args(FakeFlags, args).fake.model_dump(exclude_unset=True)
    return cfg


class _Stopped(Exception):
    """SIGINT or SIGTERM ended the run."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


async def _stop_on_signals(coro: Any) -> Any:
    """Await `coro`; SIGINT or SIGTERM cancels it, so that its clean-up runs (the fake server
    process is stopped; were this process killed outright, it would get SIGTERM from the kernel),
    and raises _Stopped."""
    loop, task, got = asyncio.get_running_loop(), asyncio.current_task(), []

    def stop(signum: int) -> None:
        got.append(signum)
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig)
    try:
        return await coro
    except asyncio.CancelledError:
        if got:
            raise _Stopped(got[0]) from None
        raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _cli(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except Exception as e:
        raise SystemExit(f"simkit loadtest: bad configuration: {e}")
    if cfg.client_cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(cfg.client_cpus))
    try:
        check_targets(role_targets(cfg, "http://127.0.0.1/v1"), cfg.allow_remote)
    except ValueError as e:
        raise SystemExit(f"simkit loadtest: {e}")
    out = Path(cfg.out or f"runs/loadtest-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        rep = asyncio.run(_stop_on_signals(run_loadtest(cfg)))
    except ValueError as e:
        raise SystemExit(f"simkit loadtest: {e}")
    except _Stopped as e:
        print(f"simkit loadtest: stopped by {signal.Signals(e.signum).name}", file=sys.stderr)
        return 128 + e.signum
    files = write_outputs(rep, out, plot=cfg.plot)
    if cfg.print_json:
        print(json.dumps(rep, indent=2))
    else:
        print(summary_text(rep))
        print("report: " + files["report"] + (f"; plot: {files['plot']}" if "plot" in files else ""))
    return 0
