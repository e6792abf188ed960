"""`FastHTTPTransport` (transport="fast"): the raw HTTP/1.1 client against awkward servers.

A hand-written loopback server sends each framing a real server may use (Content-Length,
chunked, gzip, read-until-close, 100 Continue), closes idle keep-alive connections, stalls
and errors; the transport must parse each one, reuse connections, resend once on a stale
keep-alive connection, and turn every failure into a counted TransportError.
"""
import asyncio
import gzip
import json

import pytest

import simkit
from simkit.roles.client import RoleClient, RoleConfig
from simkit.loadtools.fakeserver import FakeConfig, FakeServer
from simkit.roles.transport import FastHTTPTransport, TransportError, make_transport

BODY = {"id": "x", "object": "chat.completion", "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "20 meters"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2}}


class Crafted:
    """Answers each request as its `model` field says (one behaviour per test)."""

    def __init__(self):
        self.connections = 0
        self.requests = 0
        self.server = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
                req = json.loads(await reader.readexactly(length))
                self.requests += 1
                mode = req["model"]
                data = json.dumps(BODY).encode()
                if mode == "length":
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(data), data))
                elif mode == "chunked":
                    chunks = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in (data[:7], data[7:20], data[20:]))
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    for i in range(0, len(chunks), 5):  # dribble it in small writes
                        writer.write(chunks[i:i + 5])
                        await writer.drain()
                    writer.write(b"0\r\nX-Trailer: y\r\n\r\n")
                elif mode == "gzip":
                    z = gzip.compress(data)
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(z), z))
                elif mode == "until-close":
                    writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + data)
                    await writer.drain()
                    break
                elif mode == "continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
                elif mode == "close-after":  # answer, then close the keep-alive connection (idle timeout)
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    break
                elif mode == "503":
                    writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy")
                elif mode == "400":
                    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 3\r\n\r\nbad")
                elif mode == "badjson":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{nope")
                elif mode == "garbage":
                    writer.write(b"SPDY/9 what\r\n\r\n")
                elif mode == "reset":
                    break
                elif mode == "stall":
                    await asyncio.sleep(3600)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"
        return self

    async def __aexit__(self, *exc):
        self.server.close()


def _payload(mode: str) -> dict:
    return {"model": mode, "messages": [{"role": "user", "content": "how tall?"}]}


async def test_framings_are_parsed_and_connections_reused():
    tr = FastHTTPTransport()
    async with Crafted() as srv:
        try:
            for mode in ("length", "chunked", "gzip", "continue", "length", "chunked"):
                assert (await tr.post_chat(srv.url, _payload(mode), 5))["choices"][0]["message"]["content"] == "20 meters"
            assert srv.connections == 1  # all kept alive on one connection
            assert (await tr.post_chat(srv.url, _payload("until-close"), 5))["model"] == "m"
            assert (await tr.post_chat(srv.url, _payload("length"), 5))["model"] == "m"
            assert srv.connections == 2  # HTTP/1.0 read-until-close: not reused
        finally:
            await tr.aclose()


async def test_stale_keepalive_connection_is_resent_once():
    tr = FastHTTPTransport()
    async with Crafted() as srv:
        try:
            await tr.post_chat(srv.url, _payload("close-after"), 5)
            await asyncio.sleep(0.2)  # the server has closed the pooled connection meanwhile
            assert (await tr.post_chat(srv.url, _payload("length"), 5))["model"] == "m"
            assert srv.requests == 2 and srv.connections == 2
        finally:
            await tr.aclose()


async def test_idle_connections_past_the_idle_timeout_are_not_reused():
    tr = FastHTTPTransport(idle_timeout_s=0.05)
    async with Crafted() as srv:
        try:
            await tr.post_chat(srv.url, _payload("length"), 5)
            await asyncio.sleep(0.1)
            await tr.post_chat(srv.url, _payload("length"), 5)
            assert srv.connections == 2
        finally:
            await tr.aclose()


@pytest.mark.parametrize("mode,status,retryable", [("503", 503, True), ("400", 400, False), ("badjson", None, True),
                                                   ("garbage", None, True), ("reset", None, True),
                                                   ("stall", None, True)])
async def test_failures_become_transport_errors(mode, status, retryable):
    tr = FastHTTPTransport()
    async with Crafted() as srv:
        try:
            with pytest.raises(TransportError) as e:
                await asyncio.wait_for(tr.post_chat(srv.url, _payload(mode), 0.3), 5)
            assert e.value.status == status and e.value.retryable is retryable
            if mode == "stall":
                assert "timeout" in str(e.value)
            # the transport stays usable after any failure
            assert (await tr.post_chat(srv.url, _payload("length"), 5))["model"] == "m"
        finally:
            await tr.aclose()


async def test_connection_refused_is_retryable():
    from simkit.loadtools.testing import free_port

    tr = make_transport("fast")
    try:
        with pytest.raises(TransportError) as e:
            await tr.post_chat(f"http://127.0.0.1:{free_port()}/v1", _payload("length"), 2)
        assert e.value.retryable
    finally:
        await tr.aclose()


async def test_role_client_on_fast_transport_retries_and_counts():
    """Episodes over transport='fast' with injected 500s and stalls: retried, counted, no hang."""
    async with FakeServer(FakeConfig(latency_ms=1.0, error_rate=0.2, stall_rate=0.05, seed=2)) as srv:
        cfg = RoleConfig(base_urls=[srv.url], model="fake-model", transport="fast", timeout_s=0.3, max_retries=3,
                         backoff_s=0.001, backoff_max_s=0.01)
        clients = [RoleClient(r, cfg) for r in ("policy", "classifier", "simulator")]
        env = simkit.make("toy", size=50, classifier=simkit.LLMClassifier(clients[1]),
                          simulator=simkit.LLMSimulator(clients[2]))
        try:
            trajs = await asyncio.wait_for(simkit.collect(env, env.tasks("train"), simkit.Policy(clients[0]),
                                                          concurrency=25), 30)
        finally:
            for c in clients:
                await c.aclose()
        assert len(trajs) == 50
        st = [c.stats for c in clients]
        assert sum(s.requests for s in st) == srv.stats.requests  # every attempt reached the server
        assert sum(s.retries for s in st) > 0
        assert sum(s.errors.get("500", 0) for s in st) == srv.stats.errors
        assert sum(s.errors.get("TimeoutError", 0) for s in st) == srv.stats.stalls
        assert sum(s.failures for s in st) == sum(t.status == "failed" for t in trajs)
        assert srv.stats.connections < 200  # keep-alive: connections reused across requests


async def test_control_calls_share_the_transport(tmp_path):
    """GET /models and POST JSON go through the same transport as completions: one HTTP stack."""
    from simkit.loadtools.fakeserver import FakeServer
    from simkit.roles.transport import TransportError, make_transport

    async with FakeServer(latency_ms=0) as srv:
        for kind in ("fast", "aiohttp"):
            t = make_transport(kind)
            try:
                models = await t.get_json(srv.url, "/models", 5)
                assert [m["id"] for m in models["data"]][:1] == ["fake-model"], kind
                with pytest.raises(TransportError) as e:
                    await t.post_json(srv.url, "/load_lora_adapter", {"lora_name": "x"}, 5)
                assert e.value.status in (404, 405) and not e.value.retryable, kind
                client = RoleClient("policy", base_urls=[srv.url], transport=t)
                assert (await client.list_models())[0] == "fake-model"
            finally:
                await t.aclose()


def test_publisher_uses_the_transport_and_stops_on_a_refusal(tmp_path):
    from simkit.loadtools.fakeserver import start_fake_server
    from simkit.queue import open_queue
    from trainer.publish import Publisher, PublishRefused

    adapter = tmp_path / "ckpt"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with start_fake_server() as srv, open_queue(tmp_path / "q.db") as q:
        pub = Publisher(q, [srv.url], tmp_path / "adapters", retries=3, backoff_s=0.01)
        try:
            assert "fake-model" in pub.listed(srv.url)
            with pytest.raises(PublishRefused, match="HTTP 40"):  # the fake has no LoRA endpoint: refused, no retry
                pub.publish(adapter)
        finally:
            pub.close()
        assert q.current_version() is None
