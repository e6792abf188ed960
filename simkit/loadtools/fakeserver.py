"""A fast fake OpenAI-compatible server for load tests, benches and fault-injection tests.

    python -m simkit.loadtools.fakeserver --port 8100 --latency-ms 50 --latency-dist lognormal \
        --error-rate 0.01 --stall-rate 0.001

Endpoints: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, `GET /stats`.
It is a raw `asyncio.Protocol` HTTP/1.1 keep-alive server (no framework; uvloop when it is
installed) so that it is never the bottleneck of what it measures: on one core it answers
several times more requests per second than one aiohttp client core can send.

Replies look like vLLM's and are deterministic per request body, so episodes have structure.
The request's `model` picks the role (`role_of`), so rewording a template never changes it:
- model "classifier…": "Yes" when the response being classified (the text after the last
  "Assistant:") ends in "?", else "No";
- model "simulator…": a user reply;
- any other model is a policy turn: a clarifying question ending in "?" with probability
  `clarify_rate` (decaying by turn), otherwise an answer, `output_tokens` words long.
`GET /v1/models` lists the default model first, then "simulator" and "classifier". For clients
that name no role (an older set-up), the authors' classifier cue still marks a classifier call.
Faults: `error_rate` answers HTTP 500 after the latency; `stall_rate` never answers (the
client must time out); `malformed_rate` answers 200 with a broken body of kind `malformed`
(empty content, huge content, invalid UTF-8, JSON without choices, not JSON). `max_concurrency` models a server with that many parallel slots
(requests queue FIFO behind them), so open-loop tests can saturate it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import sys
import time
import zlib
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Iterator, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from simkit.config import add_config_args, config_from_args, leaves

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error", 413: "Payload Too Large"}
_MAX_BODY = 64 * 1024 * 1024
_CLASSIFIER_CUE = "Is the Assistant's response a clarifying question?"
_WORDS = ("the", "answer", "is", "about", "twenty", "meters", "tall", "according", "to", "context",
          "and", "that", "value", "comes", "from", "given", "text")


def _completion(content: Any) -> bytes:
    return json.dumps({"id": "chatcmpl-x", "object": "chat.completion", "model": "fake-model",
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()


# broken 200 bodies a model server can send (fault injection)
MALFORMED = {
    "empty": _completion(None),  # content null: no text at all
    "huge": _completion("x" * 2_000_000),
    "bad_utf8": _completion("caf\u00e9").replace(b"caf\\u00e9", b"caf\xe9"),
    "no_choices": b'{"id": "chatcmpl-x", "object": "chat.completion", "usage": {}}',
    "not_json": b"<html>502 Bad Gateway</html>",
}


MalformedKind = Literal["bad_utf8", "empty", "huge", "no_choices", "not_json"]  # the keys of MALFORMED


def _cpu_list(v: Any) -> Any:
    return [int(c) for c in v.split(",")] if isinstance(v, str) else v


# CPUs to pin to; the flag takes them as text, "1" or "2,3" (config.py makes a plain flag of it)
CpuList = Annotated[list[int], BeforeValidator(_cpu_list)]


def _rate(description: str) -> Any:
    return Field(0.0, ge=0.0, le=1.0, description=description)


class FakeConfig(BaseModel):
    """What the fake server does (latency in ms; rates are probabilities per request).

    The fake server's flags and `simkit loadtest`'s `--fake-*` flags are generated from it."""

    model_config = ConfigDict(extra="forbid")

    latency_ms: float = Field(50.0, description="mean/median service time per request in ms")
    latency_dist: Literal["fixed", "uniform", "lognormal"] = Field(
        "fixed", description="latency distribution: fixed, uniform (+-spread*latency) or lognormal (sigma=spread)")
    latency_spread: float = Field(0.5, description="uniform half-width as a fraction of latency, or lognormal sigma")
    ms_per_token: float = Field(0.0, json_schema_extra={"metavar": "MS"},
                                description="extra latency per output token, like decoding")
    output_tokens: int = Field(16, json_schema_extra={"metavar": "N"},
                               description="words in a policy answer, capped by the request's max_tokens")
    clarify_rate: float = Field(0.5, ge=0.0, le=1.0, description="probability a first policy turn is a clarifying "
                                                                 "question (halved each later turn)")
    error_rate: float = _rate("probability of an HTTP 500 per request")
    stall_rate: float = _rate("probability a request is never answered, until the client times out")
    malformed_rate: float = _rate("probability of a 200 with a broken body of kind --malformed")
    malformed: MalformedKind = Field("no_choices", description="kind of broken body")
    max_concurrency: int = Field(0, json_schema_extra={"metavar": "N"},
                                 description="parallel service slots per worker; more requests queue FIFO "
                                             "(default 0: unlimited)")
    model: str = Field("fake-model", description="model id listed first by /v1/models")
    seed: int = Field(0, description="random seed")


class FakeServerOptions(FakeConfig):
    """`python -m simkit.loadtools.fakeserver`: what the server does, and where and how it runs."""

    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8100, description="port (0 = any free port)")
    workers: int = Field(1, description="server processes sharing the port via SO_REUSEPORT")
    cpus: CpuList | None = Field(None, description="pin to these CPUs, e.g. 1 or 2,3 (Linux; default: no pinning)")
    uvloop: Literal["auto", "on", "off"] = Field(
        "auto", description="use uvloop when installed (auto, default), require it (on), or not (off)")


@dataclass
class ServerStats:
    requests: int = 0  # chat completions received
    responses: int = 0  # chat completions answered 200
    errors: int = 0  # injected 500s
    stalls: int = 0  # injected stalls (never answered)
    malformed: int = 0  # injected broken 200 bodies
    bad_requests: int = 0
    other: int = 0  # /health, /models, /stats, 404
    connections: int = 0
    open_connections: int = 0
    in_service: int = 0
    queued: int = 0
    started_at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cpu_s"] = time.process_time()
        d["uptime_s"] = time.time() - self.started_at
        try:
            import resource

            d["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        except Exception:  # pragma: no cover - not on every platform
            d["max_rss_mb"] = None
        return d


def _response(status: int, body: bytes, content_type: bytes = b"application/json", close: bool = False) -> bytes:
    head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n" % (
        status, _REASONS.get(status, "OK").encode(), content_type, len(body),
        b"Connection: close\r\n" if close else b"")
    return head + body


ROLE_MODELS = ("simulator", "classifier")


def role_of(model: Any, last: str) -> str:
    """The role a request plays: named by its model ("classifier…", "simulator…"), else policy."""
    name = str(model or "").lower()
    for role in ROLE_MODELS:
        if name.startswith(role):
            return role
    return "classifier" if _CLASSIFIER_CUE in last else "policy"


class FakeModel:
    """The reply logic, separate from HTTP (deterministic given config and request body)."""

    def __init__(self, cfg: FakeConfig):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self._n = 0
        self.created = int(time.time())

    def latency(self, n_tokens: int) -> float:
        c = self.cfg
        base = c.latency_ms
        if c.latency_dist == "uniform" and base > 0:
            base = self.rng.uniform(base * (1 - c.latency_spread), base * (1 + c.latency_spread))
        elif c.latency_dist == "lognormal" and base > 0:
            base = base * math.exp(self.rng.gauss(0.0, c.latency_spread))
        return max(0.0, (base + c.ms_per_token * n_tokens) / 1000.0)

    def fault(self) -> str | None:
        c = self.cfg
        if c.stall_rate and self.rng.random() < c.stall_rate:
            return "stall"
        if c.error_rate and self.rng.random() < c.error_rate:
            return "error"
        if c.malformed_rate and self.rng.random() < c.malformed_rate:
            return "malformed"
        return None

    def complete(self, req: dict[str, Any], raw: bytes) -> tuple[bytes, int]:
        """(JSON body, completion tokens) for one chat-completions request."""
        messages = req.get("messages") or []
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list")
        last = messages[-1].get("content") or "" if isinstance(messages[-1], dict) else ""
        if not isinstance(last, str):  # content parts
            last = " ".join(p.get("text", "") for p in last if isinstance(p, dict))
        h = zlib.crc32(raw)
        max_tokens = req.get("max_tokens") or req.get("max_completion_tokens") or 1 << 30
        role = role_of(req.get("model"), last)
        if role == "classifier":
            tail = last.rsplit("Assistant:", 1)[-1].split(_CLASSIFIER_CUE, 1)[0].strip().split("\n", 1)[0]
            text = "Yes" if tail.rstrip("\"')].").endswith("?") else "No"
        elif role == "simulator":
            text = "I mean the first one I mentioned, please."
        else:
            n_asst = sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "assistant")
            p = self.cfg.clarify_rate / (2 ** n_asst)
            if (h % 10007) / 10007.0 < p:
                text = "Do you mean the first one or the second one?"
            else:
                k = max(1, min(self.cfg.output_tokens, int(max_tokens)))
                text = " ".join(_WORDS[(h + i) % len(_WORDS)] for i in range(k)) + "."
        n_out = len(text.split())
        if n_out > max_tokens:
            text = " ".join(text.split()[: int(max_tokens)])
            n_out = int(max_tokens)
        self._n += 1
        n_prompt = max(1, len(raw) // 4)
        body = {
            "id": f"chatcmpl-{h:08x}{self._n:x}", "object": "chat.completion", "created": self.created,
            "model": req.get("model") or self.cfg.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": n_prompt, "total_tokens": n_prompt + n_out, "completion_tokens": n_out},
        }
        return json.dumps(body).encode(), n_out


class _Conn(asyncio.Protocol):
    __slots__ = ("srv", "transport", "buf", "busy", "pending", "closed")

    def __init__(self, srv: "FakeServer"):
        self.srv = srv
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False  # a request of this connection is being served (HTTP/1.1 order)
        self.pending: deque = deque()  # pipelined requests waiting for their turn
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.srv.stats.connections += 1
        self.srv.stats.open_connections += 1
        self.srv._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.srv.stats.open_connections -= 1
        self.srv._conns.discard(self)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 65536:
                    self._fail(400)
                return
            head = bytes(buf[:end])
            try:
                line, _, rest = head.partition(b"\r\n")
                method, path, _version = line.split(b" ", 2)
                length = 0
                keep = True
                for h in rest.split(b"\r\n"):
                    name, _, value = h.partition(b":")
                    lname = name.strip().lower()
                    if lname == b"content-length":
                        length = int(value)
                    elif lname == b"connection" and value.strip().lower() == b"close":
                        keep = False
            except ValueError:
                self._fail(400)
                return
            if length > _MAX_BODY:
                self._fail(413)
                return
            total = end + 4 + length
            if len(buf) < total:
                return
            body = bytes(buf[end + 4:total])
            del buf[:total]
            req = (method, path, body, keep)
            if self.busy:
                self.pending.append(req)
            else:
                self._handle(req)

    def _fail(self, status: int) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(_response(status, b'{"error": {"message": "bad request"}}', close=True))
            self.transport.close()

    def _handle(self, req: tuple) -> None:
        method, path, body, keep = req
        srv = self.srv
        path = path.split(b"?", 1)[0]
        if method == b"POST" and path.endswith(b"/chat/completions"):
            self.busy = True
            srv.chat(self, body, keep)
            return
        srv.stats.other += 1
        if method != b"GET":
            self.send(_response(405, b'{"error": {"message": "method not allowed"}}'), keep)
        elif path in (b"/health", b"/healthz", b"/v1/health"):
            self.send(_response(200, b"ok", b"text/plain"), keep)
        elif path.endswith(b"/models"):
            self.send(_response(200, srv.models_body), keep)
        elif path.endswith(b"/stats"):
            self.send(_response(200, json.dumps(srv.stats.as_dict()).encode()), keep)
        else:
            self.send(_response(404, b'{"error": {"message": "not found"}}'), keep)

    def send(self, data: bytes, keep: bool = True) -> None:
        """Write one response, then serve the next pipelined request of this connection."""
        self.busy = False
        if self.closed:
            return
        self.transport.write(data)  # type: ignore[union-attr]
        if not keep:
            self.transport.close()  # type: ignore[union-attr]
            return
        if self.pending:
            self._handle(self.pending.popleft())


class FakeServer:
    """The server. `await FakeServer(cfg).start(port=0)` in-process, or run `main()`."""

    def __init__(self, cfg: FakeConfig | None = None, **kw: Any):
        self.cfg = cfg or FakeConfig(**kw)
        self.model = FakeModel(self.cfg)
        self.stats = ServerStats()
        self.models_body = json.dumps({"object": "list", "data": [
            {"id": name, "object": "model", "created": self.model.created, "owned_by": "simkit",
             "max_model_len": 4096} for name in (self.cfg.model, *ROLE_MODELS)]}).encode()
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_Conn] = set()
        self._queue: deque = deque()  # requests waiting for a slot (max_concurrency)
        self.port = 0
        self.host = "127.0.0.1"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return self.base_url + "/v1"

    async def start(self, host: str = "127.0.0.1", port: int = 0, reuse_port: bool = False,
                    sock: Any = None) -> "FakeServer":
        loop = asyncio.get_running_loop()
        if sock is not None:
            self._server = await loop.create_server(lambda: _Conn(self), sock=sock, backlog=8192)
        else:
            self._server = await loop.create_server(lambda: _Conn(self), host, port, backlog=8192,
                                                    reuse_port=reuse_port or None)
        self.host, self.port = self._server.sockets[0].getsockname()[:2]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for c in list(self._conns):
                if c.transport is not None:
                    c.transport.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> "FakeServer":
        return await self.start() if self._server is None else self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # ------------------------------------------------------------------ serving
    def chat(self, conn: _Conn, body: bytes, keep: bool) -> None:
        st = self.stats
        st.requests += 1
        try:
            req = json.loads(body)
            reply, n_out = self.model.complete(req, body)
        except (ValueError, TypeError, AttributeError) as e:
            st.bad_requests += 1
            conn.send(_response(400, json.dumps({"error": {"message": f"bad request: {e}"}}).encode()), keep)
            return
        fault = self.model.fault()
        if fault == "stall":
            st.stalls += 1
            return  # never answer; the connection stays busy until the client gives up
        if fault == "error":
            reply = b'{"error": {"message": "injected server error", "type": "InternalServerError", "code": 500}}'
        if fault == "malformed":
            st.malformed += 1
            reply = MALFORMED[self.cfg.malformed]
        item = (conn, reply, keep, fault == "error", self.model.latency(n_out))
        if self.cfg.max_concurrency and st.in_service >= self.cfg.max_concurrency:
            st.queued += 1
            self._queue.append(item)
        else:
            self._serve(item)

    def _serve(self, item: tuple) -> None:
        self.stats.in_service += 1
        delay = item[4]
        loop = asyncio.get_running_loop()
        if delay > 0:
            loop.call_later(delay, self._finish, item)
        else:
            loop.call_soon(self._finish, item)

    def _finish(self, item: tuple) -> None:
        conn, reply, keep, error, _ = item
        st = self.stats
        st.in_service -= 1
        if error:
            st.errors += 1
            conn.send(_response(500, reply), keep)
        else:
            st.responses += 1
            conn.send(_response(200, reply), keep)
        if self._queue and (not self.cfg.max_concurrency or st.in_service < self.cfg.max_concurrency):
            st.queued -= 1
            self._serve(self._queue.popleft())


# --------------------------------------------------------------------------- running it
def _install_uvloop(mode: str) -> bool:
    if mode == "off":
        return False
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        if mode == "on":
            raise SystemExit("--uvloop on: uvloop is not installed (pip install uvloop)")
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def _serve_forever(cfg: FakeConfig, host: str, port: int, reuse_port: bool, announce: bool) -> None:
    async def run() -> None:
        srv = await FakeServer(cfg).start(host, port, reuse_port=reuse_port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if announce:
            print(f"fakeserver listening on {srv.url} (pid {os.getpid()}, latency {cfg.latency_ms} ms "
                  f"{cfg.latency_dist})", flush=True)
        await stop.wait()
        await srv.close()

    asyncio.run(run())


def serve(cfg: FakeConfig, host: str = "127.0.0.1", port: int = 8100, workers: int = 1,
          uvloop_mode: str = "auto", cpus: list[int] | None = None) -> None:
    """Blocking: serve until SIGINT/SIGTERM. workers > 1 forks processes sharing the port (SO_REUSEPORT)."""
    uv = _install_uvloop(uvloop_mode)
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(cpus))
    if workers <= 1:
        _serve_forever(cfg, host, port, False, True)
        return
    if not hasattr(os, "fork"):  # pragma: no cover
        raise SystemExit("--workers > 1 needs fork() and SO_REUSEPORT (Linux)")
    import socket

    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    from simkit.procs import die_with_parent

    children, parent = [], os.getpid()
    for i in range(workers):
        pid = os.fork()
        if pid == 0:  # child: stopped by the parent's SIGTERM / SIGINT, or by its death
            die_with_parent(parent)
            if uv:
                _install_uvloop("on")
            if cpus and hasattr(os, "sched_setaffinity"):
                os.sched_setaffinity(0, {cpus[i % len(cpus)]})
            try:
                _serve_forever(cfg.model_copy(update={"seed": cfg.seed + i}), host, port, True, i == 0)
            finally:
                os._exit(0)
        children.append(pid)

    def forward(signum: int, _frame: Any) -> None:
        for c in children:
            try:
                os.kill(c, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for c in children:
        try:
            os.waitpid(c, 0)
        except ChildProcessError:
            pass


def build_parser() -> argparse.ArgumentParser:
    """The fake server's command line, generated from FakeServerOptions (so `--config` YAML works too)."""
    p = argparse.ArgumentParser(
        prog="python -m simkit.loadtools.fakeserver",
        description="Fast fake OpenAI-compatible server (chat completions, models, health, stats) with "
                    "configurable latency, output length, error and stall rates. Loopback by default.",
    )
    add_config_args(p, FakeServerOptions)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    opts = config_from_args(FakeServerOptions, parser.parse_args(argv), parser)
    serve(opts, opts.host, opts.port, opts.workers, opts.uvloop, opts.cpus)
    return 0


# --------------------------------------------------------------------------- as a subprocess
class FakeServerProcess:
    def __init__(self, proc: Any, port: int):
        self.proc, self.port = proc, port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return self.base_url + "/v1"

    def stats(self) -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(self.base_url + "/stats", timeout=5) as r:
            return json.loads(r.read())


def fake_args(cfg: FakeConfig) -> list[str]:
    """Command-line flags reproducing `cfg` for `python -m simkit.loadtools.fakeserver`."""
    out: list[str] = []
    for leaf in leaves(FakeConfig):
        out += [leaf.flags[0], str(getattr(cfg, leaf.path[-1]))]
    return out


def start_fake_server(cfg: FakeConfig | None = None, port: int | None = None, workers: int = 1,
                      cpus: list[int] | None = None, log_path: Any = None, uvloop_mode: str = "auto",
                      timeout: float = 30.0):
    """Context manager: the fake server as its own process on loopback; yields FakeServerProcess."""
    import contextlib

    from simkit.procs import free_port, start_process

    @contextlib.contextmanager
    def cm() -> Iterator[FakeServerProcess]:
        p = port or free_port()
        args = [sys.executable, "-m", "simkit.loadtools.fakeserver", "--port", str(p), "--workers", str(workers),
                "--uvloop", uvloop_mode, *fake_args(cfg or FakeConfig())]
        if cpus:
            args += ["--cpus", ",".join(map(str, cpus))]
        with start_process(args, f"http://127.0.0.1:{p}/health", log_path, timeout=timeout) as proc:
            yield FakeServerProcess(proc, p)

    return cm()


if __name__ == "__main__":
    sys.exit(main())
