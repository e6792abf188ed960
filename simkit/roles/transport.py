"""HTTP transports for OpenAI-compatible chat completions.

One small interface with three implementations: `post_chat` (the hot path) plus `get_json` and
`post_json` for a server's control calls (`/models`, `/load_lora_adapter`), so a role's client,
its model lookup and the trainer's publisher reach a server through one HTTP stack, with auth
and timeouts in one place:
- `FastHTTPTransport` ("fast", the default): the rollout hot path. A minimal HTTP/1.1
  keep-alive client on `asyncio.Protocol`: ~4x less client CPU per request than aiohttp
  (bench/bench_engine.py), which is what lets the engine outrun a bare aiohttp loop.
- `AiohttpTransport` ("aiohttp"): one pooled aiohttp session, JSON in, dict out (~0.1-0.2 ms
  CPU/request); the safe fallback for anything the fast client does not speak (proxies, redirects).
- `OpenAITransport` ("openai"): the official `openai.AsyncOpenAI` SDK, for API models and exotic
  parameters where its features matter more than its ~2.7 ms CPU/request.
All raise `TransportError` with a `retryable` flag; retries live in the role client.
"""
from __future__ import annotations

import asyncio
import json
import time
import zlib
from abc import ABC, abstractmethod
from typing import Any

import aiohttp

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
TIMEOUT_HINT = " (a slow or overloaded server: raise --timeout, or lower --concurrency / --max-in-flight)"


class TransportError(Exception):
    """A failed request. `retry_after`: seconds the server asked us to wait (its Retry-After header)."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False,
                 retry_after: float | None = None, reason: str | None = None):
        super().__init__(message)
        self.reason = reason  # a short key for accounting ("not_json", "invalid_utf8"); None: status/cause
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after


def parse_retry_after(value: str | bytes | None) -> float | None:
    """Retry-After in seconds (the delta-seconds form; an HTTP date is rare from model servers)."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _decode(body: bytes, url: str) -> Any:
    """A control call's answer: its JSON, or its text when it is not JSON (vLLM answers
    /load_lora_adapter with a plain sentence)."""
    try:
        return json.loads(body) if body else None
    except ValueError:
        return body.decode(errors="replace")


def decode_reply(body: bytes, url: str) -> Any:
    """A chat completion's JSON; a body that is not UTF-8 or not JSON is a retryable TransportError
    whose reason says which (the role client counts it under that reason)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TransportError(f"invalid UTF-8 in the reply from {url} (byte {e.start}): {body[:200]!r}",
                             retryable=True, reason="invalid_utf8") from e
    try:
        return json.loads(text)
    except ValueError as e:
        raise TransportError(f"malformed JSON from {url}: {body[:200]!r}", retryable=True, reason="not_json") from e


def _status_error(status: int, url: str, body: bytes, retry_after: Any = None) -> TransportError:
    return TransportError(f"HTTP {status} from {url}: {body[:300].decode(errors='replace')}", status=status,
                          retryable=status in RETRYABLE_STATUS, retry_after=parse_retry_after(retry_after))


class ChatTransport(ABC):
    """POST a chat-completions payload to one base URL and return the parsed JSON body; plus a
    server's control calls. Every failure is a `TransportError` (status, retryable)."""

    @abstractmethod
    async def post_chat(self, base_url: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]: ...

    @abstractmethod
    async def get_json(self, base_url: str, path: str, timeout: float) -> Any:
        """GET `base_url + path`; the decoded body of a 2xx answer."""

    @abstractmethod
    async def post_json(self, base_url: str, path: str, payload: Any, timeout: float) -> Any:
        """POST JSON to `base_url + path`; the decoded body of a 2xx answer (JSON, else text)."""

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
                            retry_after=parse_retry_after(resp.headers.get("Retry-After")),
                        )
        except TimeoutError as e:
            raise TransportError(f"timeout after {timeout:.1f}s from {url}{TIMEOUT_HINT}", retryable=True) from e
        except aiohttp.ClientError as e:
            raise TransportError(f"{type(e).__name__} from {url}: {e}", retryable=True) from e
        return decode_reply(body, url)

    async def _control(self, method: str, base_url: str, path: str, payload: Any, timeout: float) -> Any:
        url = base_url.rstrip("/") + path
        try:
            async with asyncio.timeout(timeout):
                data = None if payload is None else json.dumps(payload)
                async with self._get_session().request(method, url, data=data) as resp:
                    body = await resp.read()
                    if not 200 <= resp.status < 300:
                        raise _status_error(resp.status, url, body, resp.headers.get("Retry-After"))
        except TimeoutError as e:
            raise TransportError(f"timeout after {timeout:.1f}s from {url}{TIMEOUT_HINT}", retryable=True) from e
        except aiohttp.ClientError as e:
            raise TransportError(f"{type(e).__name__} from {url}: {e}", retryable=True) from e
        return _decode(body, url)

    async def get_json(self, base_url: str, path: str, timeout: float) -> Any:
        return await self._control("GET", base_url, path, None, timeout)

    async def post_json(self, base_url: str, path: str, payload: Any, timeout: float) -> Any:
        return await self._control("POST", base_url, path, payload, timeout)

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
            raise TransportError(str(e), status=e.status_code, retryable=e.status_code in RETRYABLE_STATUS,
                                 retry_after=parse_retry_after(e.response.headers.get("retry-after"))) from e
        except (openai.APITimeoutError, openai.APIConnectionError) as e:
            raise TransportError(f"{type(e).__name__}: {e}", retryable=True) from e
        return resp.model_dump()

    async def _control(self, method: str, base_url: str, path: str, payload: Any, timeout: float) -> Any:
        import httpx
        import openai

        client = self._client(base_url)
        try:
            if method == "GET":
                return await client.get(path, cast_to=object, options={"timeout": timeout})
            return await client.post(path, cast_to=object, body=payload, options={"timeout": timeout})
        except openai.APIStatusError as e:
            raise TransportError(str(e), status=e.status_code, retryable=e.status_code in RETRYABLE_STATUS,
                                 retry_after=parse_retry_after(e.response.headers.get("retry-after"))) from e
        except (openai.APITimeoutError, openai.APIConnectionError, httpx.HTTPError) as e:
            raise TransportError(f"{type(e).__name__}: {e}", retryable=True) from e

    async def get_json(self, base_url: str, path: str, timeout: float) -> Any:
        return await self._control("GET", base_url, path, None, timeout)

    async def post_json(self, base_url: str, path: str, payload: Any, timeout: float) -> Any:
        return await self._control("POST", base_url, path, payload, timeout)

    async def aclose(self) -> None:
        for c in self._clients.values():
            await c.close()


class _Stale(ConnectionError):
    """A reused keep-alive connection closed before any response byte: safe to resend once."""


class _HttpConn(asyncio.Protocol):
    """One HTTP/1.1 client connection, one request at a time (no pipelining)."""

    __slots__ = ("transport", "buf", "waiter", "closed", "got", "status", "hend", "clen", "chunked", "keep",
                 "gzip", "idle_since", "reused", "retry_after")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.closed = False
        self.idle_since = 0.0
        self.reused = False
        self._reset()

    def _reset(self) -> None:
        self.got = False  # any response byte since the request was sent
        self.status = 0
        self.hend = -1  # end of the headers in buf (-1: not parsed yet)
        self.clen: int | None = None
        self.chunked = False
        self.keep = True
        self.gzip = b""
        self.retry_after: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        w = self.waiter
        if w is not None and not w.done():
            if self.hend >= 0 and self.clen is None and not self.chunked:  # body delimited by close
                self._finish(bytes(self.buf[self.hend:]))
            elif not self.got and self.reused:
                w.set_exception(_Stale("keep-alive connection closed by the server"))
            else:
                w.set_exception(ConnectionResetError(f"connection lost mid-response: {exc or 'closed by peer'}"))

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost completes a read-until-close body

    def request(self, data: bytes) -> asyncio.Future:
        self._reset()
        self.buf.clear()
        self.waiter = w = asyncio.get_running_loop().create_future()
        self.transport.write(data)  # type: ignore[union-attr]
        return w

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        w = self.waiter
        if w is None or w.done():  # unsolicited bytes on an idle connection: unusable
            self.close()
            return
        self.got = True
        buf = self.buf
        buf += data
        try:
            while self.hend < 0:
                i = buf.find(b"\r\n\r\n")
                if i < 0:
                    if len(buf) > 1 << 20:
                        raise ValueError("response headers too large")
                    return
                lines = bytes(buf[:i]).split(b"\r\n")
                status = int(lines[0][9:12])
                if 100 <= status < 200:  # 100 Continue etc.: skip the interim response
                    del buf[:i + 4]
                    continue
                self.status, self.hend = status, i + 4
                self.keep = not lines[0].startswith(b"HTTP/1.0")
                for h in lines[1:]:
                    name, _, value = h.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        self.clen = int(value)
                    elif name == b"transfer-encoding":
                        self.chunked = b"chunked" in value.lower()
                    elif name == b"connection":
                        v = value.strip().lower()
                        self.keep = v != b"close" if v in (b"close", b"keep-alive") else self.keep
                    elif name == b"content-encoding":
                        self.gzip = value.strip().lower()
                    elif name == b"retry-after":
                        self.retry_after = value.strip()
                if self.chunked:
                    self.clen = None
                elif self.clen is None and (status in (204, 304)):
                    self.clen = 0
                if self.clen is None and not self.chunked:
                    self.keep = False  # read until close
            if self.clen is not None:
                end = self.hend + self.clen
                if len(buf) >= end:
                    if len(buf) > end:
                        self.keep = False  # stray bytes: do not reuse
                    self._finish(bytes(buf[self.hend:end]))
            elif self.chunked:
                body = self._dechunk()
                if body is not None:
                    self._finish(body)
        except (ValueError, IndexError) as e:
            self.close()
            if not w.done():
                w.set_exception(ConnectionError(f"malformed HTTP response: {e}"))

    def _dechunk(self) -> bytes | None:
        buf, pos, out = self.buf, self.hend, []
        while True:
            i = buf.find(b"\r\n", pos)
            if i < 0:
                return None
            size = int(bytes(buf[pos:i]).split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                j = buf.find(b"\r\n\r\n", i) if buf[i + 2:i + 4] != b"\r\n" else i
                if j < 0:
                    return None
                return b"".join(out)
            start, pos = i + 2, i + 2 + size + 2
            if len(buf) < pos:
                return None
            out.append(bytes(buf[start:start + size]))

    def _finish(self, body: bytes) -> None:
        if self.gzip in (b"gzip", b"deflate"):
            body = zlib.decompress(body, 47 if self.gzip == b"gzip" else 15)
        w, self.waiter = self.waiter, None
        self.buf.clear()
        if w is not None and not w.done():
            w.set_result((self.status, body, self.keep, self.retry_after))


class _Target:
    __slots__ = ("key", "url", "head", "host", "port", "ssl", "idle")

    def __init__(self, base_url: str, extra_headers: bytes, method: str = "POST", endpoint: str = "/chat/completions"):
        from urllib.parse import urlsplit

        u = urlsplit(base_url.rstrip("/") + endpoint)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"unsupported URL {base_url!r} (http:// or https:// only)")
        self.ssl = u.scheme == "https"
        self.host = u.hostname
        self.port = u.port or (443 if self.ssl else 80)
        self.key = (self.host, self.port, self.ssl)
        self.url = u.geturl()
        default_port = self.port == (443 if self.ssl else 80)
        hosthdr = (f"[{self.host}]" if ":" in self.host else self.host) + ("" if default_port else f":{self.port}")
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        self.head = (f"{method} {path} HTTP/1.1\r\nHost: {hosthdr}\r\nContent-Type: application/json\r\n"
                     "Accept: application/json\r\nAccept-Encoding: identity\r\nUser-Agent: simkit\r\n").encode() \
            + extra_headers + b"Content-Length: "
        self.idle: list[_HttpConn] = []


class FastHTTPTransport(ChatTransport):
    """A minimal HTTP/1.1 keep-alive client on `asyncio.Protocol` (~3x less CPU per request than
    aiohttp; see bench/RESULTS.md): prebuilt request head, one write, a hand-written response
    parser (Content-Length, chunked, read-until-close, gzip), a LIFO idle pool per host, TLS for
    https. A reused connection the server closed while idle is retried once on a fresh one;
    idle connections older than `idle_timeout_s` are dropped (uvicorn closes them after 5 s).
    No proxies, no redirects: for those, use the aiohttp or openai transport."""

    def __init__(self, api_key: str | None = None, idle_timeout_s: float = 4.0):
        self._extra = f"Authorization: Bearer {api_key}\r\n".encode() if api_key else b""
        self.idle_timeout_s = idle_timeout_s
        self._targets: dict[str, _Target] = {}
        self._pools: dict[tuple, list[_HttpConn]] = {}
        self._all: set[_HttpConn] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ssl: Any = None

    def _target(self, base_url: str) -> _Target:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # connections belong to one event loop
            self._drop_all()
            self._loop = loop
        t = self._targets.get(base_url)
        if t is None:
            t = self._targets[base_url] = _Target(base_url, self._extra)
            t.idle = self._pools.setdefault(t.key, [])
        return t

    async def _connect(self, t: _Target) -> _HttpConn:
        ssl_ctx = None
        if t.ssl:
            if self._ssl is None:
                import ssl

                self._ssl = ssl.create_default_context()
            ssl_ctx = self._ssl
        _, conn = await self._loop.create_connection(_HttpConn, t.host, t.port, ssl=ssl_ctx)  # type: ignore[union-attr]
        self._all.add(conn)
        return conn

    async def _roundtrip(self, t: _Target, data: bytes) -> tuple[int, bytes, bytes | None]:
        for _ in range(2):
            conn = None
            idle, now = t.idle, time.monotonic()
            while idle:
                c = idle.pop()
                if not c.closed and now - c.idle_since < self.idle_timeout_s:
                    conn = c
                    break
                c.close()
                self._all.discard(c)
            if conn is None:
                conn = await self._connect(t)
            try:
                status, body, keep, retry_after = await conn.request(data)
            except _Stale:  # the server closed it while idle: so probably the rest; resend on a fresh one
                self._all.discard(conn)
                for c in idle:
                    c.close()
                    self._all.discard(c)
                idle.clear()
                continue
            except BaseException:  # timeout/cancel/error mid-request: the connection is unusable
                conn.close()
                self._all.discard(conn)
                raise
            if keep and not conn.closed:
                conn.idle_since, conn.reused = now, True
                idle.append(conn)
            else:
                conn.close()
                self._all.discard(conn)
            return status, body, retry_after
        raise ConnectionResetError("keep-alive connections keep closing")

    async def _send(self, t: _Target, body: bytes, timeout: float) -> tuple[int, bytes, bytes | None]:
        try:
            async with asyncio.timeout(timeout):
                return await self._roundtrip(t, b"%s%d\r\n\r\n%s" % (t.head, len(body), body))
        except TimeoutError as e:
            raise TransportError(f"timeout after {timeout:.1f}s from {t.url}{TIMEOUT_HINT}", retryable=True) from e
        except (OSError, ValueError, zlib.error) as e:  # ConnectionError is an OSError
            raise TransportError(f"{type(e).__name__} from {t.url}: {e}", retryable=True) from e

    async def post_chat(self, base_url: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
        t = self._targets.get(base_url)
        if t is None or self._loop is not asyncio.get_running_loop():
            t = self._target(base_url)
        status, resp, retry_after = await self._send(t, json.dumps(payload).encode(), timeout)
        if status != 200:
            raise _status_error(status, t.url, resp, retry_after)
        return decode_reply(resp, t.url)

    async def _control(self, method: str, base_url: str, path: str, payload: Any, timeout: float) -> Any:
        key = f"{method} {base_url.rstrip('/')}{path}"
        t = self._targets.get(key)
        if t is None or self._loop is not asyncio.get_running_loop():
            self._target(base_url)  # binds the pools to this loop
            t = self._targets[key] = _Target(base_url, self._extra, method, path)
            t.idle = self._pools.setdefault(t.key, [])
        body = b"" if payload is None else json.dumps(payload).encode()
        status, resp, retry_after = await self._send(t, body, timeout)
        if not 200 <= status < 300:
            raise _status_error(status, t.url, resp, retry_after)
        return _decode(resp, t.url)

    async def get_json(self, base_url: str, path: str, timeout: float) -> Any:
        return await self._control("GET", base_url, path, None, timeout)

    async def post_json(self, base_url: str, path: str, payload: Any, timeout: float) -> Any:
        return await self._control("POST", base_url, path, payload, timeout)

    def _drop_all(self) -> None:
        for c in list(self._all):
            c.close()
        self._all.clear()
        for p in self._pools.values():
            p.clear()

    async def aclose(self) -> None:
        self._drop_all()


def make_transport(kind: str, api_key: str | None = None) -> ChatTransport:
    if kind == "aiohttp":
        return AiohttpTransport(api_key)
    if kind == "openai":
        return OpenAITransport(api_key)
    if kind == "fast":
        return FastHTTPTransport(api_key)
    raise ValueError(f"unknown transport {kind!r}; choose 'fast' (default: raw HTTP/1.1, least CPU), "
                     "'aiohttp' (proxies, redirects) or 'openai' (SDK)")
