"""Role clients: one per role (policy, simulator, classifier) over OpenAI-compatible URLs.

A `RoleClient` owns concurrency (max in-flight semaphore), routing (least-in-flight across
several base URLs), retries (the server's Retry-After, else jittered exponential backoff, on 429/5xx/timeouts/
connection errors, then a counted failure) and accounting (tokens, latency). The transport
is a detail behind it (`simkit.roles.transport`).
"""
from __future__ import annotations

import asyncio
import os
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field

from simkit.roles.transport import ChatTransport, TransportError, make_transport
from simkit.types import Message, Reply, Usage


class RoleError(Exception):
    """A role call that failed after all retries (or with a non-retryable error)."""

    def __init__(self, role: str, message: str, reason: str | None = None):
        super().__init__(f"[{role}] {message}")
        self.role, self.reason = role, reason


class MalformedReply(ValueError):
    """A 200 answer that is no usable completion; `reason` is the key it is counted under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


Transport = Literal["fast", "aiohttp", "openai"]


class ClientSettings(BaseModel):
    """Role clients: how every role talks to its servers.

    The one place these defaults live (every command's flags and configs read them from here).
    Secrets come only from the environment (`api_key_env`)."""

    model_config = ConfigDict(extra="forbid")

    api_key_env: str | None = Field(None, json_schema_extra={"flags": ["--api-key-env"]},
                                    description="environment variable holding the servers' API key (never a flag)")
    transport: Transport = Field(
        "fast", json_schema_extra={"flags": ["--transport"]},
        description="HTTP client: fast (simkit's raw HTTP/1.1 keep-alive client; ~45 us CPU/request), aiohttp "
                    "(~190 us; proxies, redirects), or the openai SDK (~2.7 ms; API-model features)")
    max_in_flight: int = Field(256, ge=1, json_schema_extra={"flags": ["--max-in-flight"]},
                               description="max concurrent requests per role")
    # Long enough for a CPU model's queue: the server sheds overload with 503 + Retry-After instead
    # of making clients wait, and cancels work whose client left, so a timeout is a real failure.
    timeout_s: float = Field(600.0, gt=0, json_schema_extra={"flags": ["--timeout"]},
                             description="per-request timeout in seconds (a CPU model's queue can be long; overload "
                                         "is shed by the server with 503 + Retry-After, which the client honours)")
    max_retries: int = Field(3, ge=0, json_schema_extra={"flags": ["--max-retries"]},
                             description="retries on 429/5xx/timeouts/connection errors, waiting Retry-After when "
                                         "the server gives it")
    backoff_s: float = Field(0.05, ge=0, json_schema_extra={"cli": False},
                             description="first backoff; jittered exponential, capped at backoff_max_s")
    backoff_max_s: float = Field(2.0, ge=0, json_schema_extra={"cli": False})
    retry_after_max_s: float = Field(60.0, ge=0, json_schema_extra={"cli": False},
                                     description="the most we wait when a server's Retry-After asks for longer")
    max_reply_chars: int = Field(1_000_000, ge=1, json_schema_extra={"cli": False},
                                 description="a longer reply is malformed (a runaway or broken server), counted "
                                             "as a failure")


class RoleConfig(ClientSettings):
    """How to reach one role: its servers and model, plus the client settings."""

    base_urls: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:8000/v1"])
    model: str | None = None  # None: the first model the server lists
    sampling: dict[str, Any] = Field(default_factory=dict)  # temperature, max_tokens, ...


@dataclass
class Endpoint:
    url: str
    in_flight: int = 0
    requests: int = 0
    failures: int = 0


@dataclass
class RoleStats:
    requests: int = 0  # attempts sent
    successes: int = 0  # calls that returned a reply
    failures: int = 0  # calls that gave up (counted, surfaced as RoleError)
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_sum_s: float = 0.0
    empty_replies: int = 0  # successes whose content was "" or whitespace (the model said nothing)
    errors: dict[str, int] = field(default_factory=dict)
    recent_latencies: deque = field(default_factory=lambda: deque(maxlen=20000))

    def as_dict(self) -> dict[str, Any]:
        lat = sorted(self.recent_latencies)

        def q(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))], 5) if lat else None

        return {
            "requests": self.requests, "successes": self.successes, "failures": self.failures,
            "retries": self.retries, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens, "empty_replies": self.empty_replies,
            "errors": dict(self.errors),
            "latency_mean_s": round(self.latency_sum_s / self.successes, 5) if self.successes else None,
            "latency_p50_s": q(0.5), "latency_p99_s": q(0.99),
        }


def _to_dicts(messages: Iterable[Message | dict]) -> list[dict]:
    return [m if isinstance(m, dict) else {"role": m.role, "content": m.content} for m in messages]


class RoleClient:
    def __init__(self, role: str, config: RoleConfig | None = None, transport: ChatTransport | None = None, **overrides: Any):
        cfg = (config or RoleConfig()).model_copy(update=overrides)
        if not cfg.base_urls:
            raise ValueError(f"role {role!r} needs at least one base URL")
        self.role = role
        self.config = cfg
        self.endpoints = [Endpoint(u.rstrip("/")) for u in cfg.base_urls]
        api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        if cfg.api_key_env and not api_key:
            raise ValueError(f"role {role!r}: environment variable {cfg.api_key_env} is not set")
        self.transport = transport or make_transport(cfg.transport, api_key)
        self._sem = asyncio.Semaphore(cfg.max_in_flight)
        self.stats = RoleStats()
        self.model = cfg.model
        self._model_lock = asyncio.Lock()

    # ------------------------------------------------------------------ routing
    def _pick(self) -> Endpoint:
        eps = self.endpoints
        if len(eps) == 1:
            return eps[0]
        return min(eps, key=lambda e: e.in_flight)

    async def _attempt(self, payload: dict[str, Any]) -> tuple[dict[str, Any], Endpoint, float]:
        ep = self._pick()
        ep.in_flight += 1
        ep.requests += 1
        self.stats.requests += 1
        t0 = time.perf_counter()
        try:
            body = await self.transport.post_chat(ep.url, payload, self.config.timeout_s)
        except TransportError as e:
            ep.failures += 1
            self._count(e.reason or (str(e.status) if e.status else type(e.__cause__ or e).__name__))
            raise
        finally:
            ep.in_flight -= 1
        return body, ep, time.perf_counter() - t0

    # ------------------------------------------------------------------ public
    async def complete(self, messages: Iterable[Message | dict], model: str | None = None, **sampling: Any) -> Reply:
        """One chat completion with retries. Raises RoleError once retries are exhausted."""
        if model is None and self.model is None:
            await self.resolve_model()
        payload = {"model": model or self.model, "messages": _to_dicts(messages)}
        if self.config.sampling:
            payload.update(self.config.sampling)
        payload.update(sampling)
        async with self._sem:
            try:
                try:  # fast path: one attempt, no retry machinery
                    body, ep, latency = await self._attempt(payload)
                except TransportError as first:
                    if not first.retryable or self.config.max_retries <= 0:
                        raise
                    body, ep, latency = await self._retry(payload, first)
                reply = self._parse(body, ep, latency)
            except MalformedReply as e:
                self._count(e.reason)
                self.stats.failures += 1
                raise RoleError(self.role, str(e), e.reason) from e
            except (TransportError, ValueError) as e:
                self.stats.failures += 1
                raise RoleError(self.role, str(e), getattr(e, "reason", None)) from e
        st = self.stats
        st.successes += 1
        st.prompt_tokens += reply.usage.prompt_tokens
        st.completion_tokens += reply.usage.completion_tokens
        st.latency_sum_s += latency
        st.recent_latencies.append(latency)
        return reply

    async def _retry(self, payload: dict[str, Any], first: TransportError) -> tuple[dict[str, Any], Endpoint, float]:
        """Up to `max_retries` more attempts after `first` failed, each after `_delay`."""
        err = first
        for n in range(self.config.max_retries):
            await asyncio.sleep(self._delay(err, n))
            self.stats.retries += 1
            try:
                return await self._attempt(payload)
            except TransportError as e:
                if not e.retryable:
                    raise
                err = e
        raise err

    def _delay(self, err: TransportError, n: int) -> float:
        """The server's Retry-After if it gave one, spread by up to 50% so that clients it shed
        together do not all come back in the same instant; else full-jitter exponential backoff."""
        cfg = self.config
        if err.retry_after is not None:
            return min(err.retry_after * random.uniform(1.0, 1.5), cfg.retry_after_max_s)
        return random.uniform(0, min(cfg.backoff_max_s, cfg.backoff_s * 2 ** n))

    def _count(self, reason: str) -> None:
        self.stats.errors[reason] = self.stats.errors.get(reason, 0) + 1

    def _parse(self, body: Any, ep: Endpoint, latency: float) -> Reply:
        """The reply of a 200 answer; anything unusable is a MalformedReply with its reason."""
        if not isinstance(body, dict) or not isinstance(body.get("choices"), list) or not body["choices"]:
            raise MalformedReply("no_choices", f"completion without choices from {ep.url}: {str(body)[:200]}")
        choice = body["choices"][0]
        message = choice.get("message") if isinstance(choice, dict) else None
        text = message.get("content") if isinstance(message, dict) else None
        finish = choice.get("finish_reason") if isinstance(choice, dict) else None
        if text is None:
            raise MalformedReply("empty_content", f"completion without content from {ep.url} "
                                                  f"(finish_reason {finish!r})")
        if not isinstance(text, str):
            raise MalformedReply("bad_content", f"content is {type(text).__name__}, not text, from {ep.url}")
        if not text.strip():
            # "" is a model's own answer (vLLM returns it when every token was special), not a broken
            # server: kept, and counted so that a model that says nothing shows up in the stats
            self.stats.empty_replies += 1
        if len(text) > self.config.max_reply_chars:
            raise MalformedReply("huge_content", f"completion of {len(text)} characters from {ep.url} (limit "
                                                 f"{self.config.max_reply_chars})")
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        return Reply(
            text=text, model=body.get("model", ""), latency_s=latency, endpoint=ep.url,
            finish_reason=finish,
            usage=Usage(prompt_tokens=usage.get("prompt_tokens") or 0,
                        completion_tokens=usage.get("completion_tokens") or 0),
        )

    async def resolve_model(self) -> None:
        """No model configured: use the first model the server lists (its base model)."""
        async with self._model_lock:
            if self.model is None:
                try:
                    self.model = (await self.list_models())[0]
                except Exception as e:
                    self.stats.failures += 1
                    raise RoleError(self.role, f"no model given and GET /models failed: {e}") from e

    async def list_models(self) -> list[str]:
        """Model ids served by the first endpoint (GET /v1/models), over the role's transport
        (same auth, same timeout as its completions)."""
        body = await self.transport.get_json(self.endpoints[0].url, "/models", self.config.timeout_s)
        return [m["id"] for m in body["data"]]

    async def aclose(self) -> None:
        await self.transport.aclose()

    async def __aenter__(self) -> "RoleClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
