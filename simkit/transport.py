"""HTTP transports for OpenAI-compatible chat completions.

One small interface (`ChatTransport.post_chat`) with two implementations:
- `AiohttpTransport`: the rollout hot path. A single pooled aiohttp session, JSON in, dict
  out, no per-request object building (~0.1 ms CPU/request; see bench/RESULTS.md).
- `OpenAITransport`: the official `openai.AsyncOpenAI` SDK, for API models and exotic
  parameters where its features matter more than its ~2.7 ms CPU/request.
Both raise `TransportError` with a `retryable` flag; retries live in the role client.
"""
from __future__ import annotations

import asyncio
import json
from abc import ABC, abstractmethod
from typing import Any

import aiohttp

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class TransportError(Exception):
    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False):
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class ChatTransport(ABC):
    """POST a chat-completions payload to one base URL and return the parsed JSON body."""

    @abstractmethod
    async def post_chat(self, base_url: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]: ...

    async def aclose(self) -> None:  # pragma: no cover - default no-op
        return None


class AiohttpTransport(ChatTransport):
    def __init__(self, api_key: str | None = None, limit: int = 0):
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._limit = limit
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # limit=0: no client-side cap (the role semaphore is the cap); keep-alive reuse.
            connector = aiohttp.TCPConnector(limit=self._limit, ttl_dns_cache=300, keepalive_timeout=60)
            self._session = aiohttp.ClientSession(
                connector=connector, headers=self._headers, json_serialize=json.dumps,
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    async def post_chat(self, base_url: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
        session = self._get_session()
        url = base_url.rstrip("/") + "/chat/completions"
        try:
            async with asyncio.timeout(timeout):
                async with session.post(url, data=json.dumps(payload)) as resp:
                    body = await resp.read()
                    if resp.status != 200:
                        raise TransportError(
                            f"HTTP {resp.status} from {url}: {body[:300].decode(errors='replace')}",
                            status=resp.status, retryable=resp.status in RETRYABLE_STATUS,
                        )
        except TimeoutError as e:
            raise TransportError(f"timeout after {timeout:.1f}s from {url}", retryable=True) from e
        except aiohttp.ClientError as e:
            raise TransportError(f"{type(e).__name__} from {url}: {e}", retryable=True) from e
        try:
            return json.loads(body)
        except ValueError as e:
            raise TransportError(f"malformed JSON from {url}: {body[:200]!r}", retryable=True) from e

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()


class OpenAITransport(ChatTransport):
    """The openai SDK; retries disabled (the role client owns retries and accounting)."""

    def __init__(self, api_key: str | None = None):
        self._api_key = api_key or "EMPTY"
        self._clients: dict[str, Any] = {}

    def _client(self, base_url: str):
        if base_url not in self._clients:
            from openai import AsyncOpenAI

            self._clients[base_url] = AsyncOpenAI(base_url=base_url, api_key=self._api_key, max_retries=0)
        return self._clients[base_url]

    async def post_chat(self, base_url: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
        import openai

        client = self._client(base_url)
        known = {"model", "messages", "temperature", "top_p", "max_tokens", "stop", "seed", "n"}
        extra = {k: v for k, v in payload.items() if k not in known}
        try:
            resp = await client.chat.completions.create(
                **{k: v for k, v in payload.items() if k in known}, extra_body=extra or None, timeout=timeout
            )
        except openai.APIStatusError as e:
            raise TransportError(str(e), status=e.status_code, retryable=e.status_code in RETRYABLE_STATUS) from e
        except (openai.APITimeoutError, openai.APIConnectionError) as e:
            raise TransportError(f"{type(e).__name__}: {e}", retryable=True) from e
        return resp.model_dump()

    async def aclose(self) -> None:
        for c in self._clients.values():
            await c.close()


def make_transport(kind: str, api_key: str | None = None) -> ChatTransport:
    if kind == "aiohttp":
        return AiohttpTransport(api_key)
    if kind == "openai":
        return OpenAITransport(api_key)
    raise ValueError(f"unknown transport {kind!r}; choose 'aiohttp' (fast) or 'openai' (SDK)")
