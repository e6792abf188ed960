"""Retries and failures against a loopback server that returns 500s and stalls.

The fault server is a stand-in *target* only (to inject faults); the thing under test is the
real role client + engine. No episode may hang; every failure is counted; nothing dropped.
"""
import asyncio
import time
from collections import Counter

import pytest
from aiohttp import web

import simkit
from simkit.roles.client import RoleClient
from simkit.types import ANSWER, Message, Task


@pytest.fixture
async def fault_server(unused_tcp_port_factory=None):
    attempts: Counter = Counter()

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        text = body["messages"][-1]["content"]
        attempts[text] += 1
        if "always-500" in text:
            return web.json_response({"error": {"message": "boom"}}, status=500)
        if "flaky" in text and attempts[text] <= 2:
            return web.json_response({"error": {"message": "overloaded"}}, status=503)
        if "shed" in text and attempts[text] <= 1:
            return web.json_response({"error": {"message": "queue full"}}, status=503, headers={"Retry-After": "1"})
        if "stall" in text:
            await asyncio.sleep(3600)
        if "bad-json" in text:
            return web.Response(text="{not json", content_type="application/json")
        if "bad-request" in text:
            return web.json_response({"error": {"message": "bad"}}, status=400)
        return web.json_response({"model": "fault", "choices": [{"message": {"role": "assistant", "content": "20 meters"},
                                                                  "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 2}})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/v1", attempts
    await runner.cleanup()


def _task(i: int, kind: str) -> Task:
    return Task(id=f"{kind}-{i}", env="toy", gold_action=ANSWER, reference="20 meters", goal="20 meters",
                prompt=[Message(role="user", content=f"{kind} #{i}: how tall is the oak?")])


async def test_faults_are_retried_counted_and_never_hang(fault_server):
    url, attempts = fault_server
    kinds = {"ok": 30, "flaky": 10, "always-500": 5, "stall": 5, "bad-json": 3, "bad-request": 3}
    tasks = [_task(i, k) for k, n in kinds.items() for i in range(n)]
    client = RoleClient("policy", base_urls=[url], model="fault", timeout_s=0.5, max_retries=3,
                        backoff_s=0.01, backoff_max_s=0.05)
    env = simkit.make("toy", size=2)
    t0 = time.monotonic()
    try:
        trajs = await asyncio.wait_for(simkit.collect(env, tasks, simkit.Policy(client), concurrency=64), timeout=30)
    finally:
        await client.aclose()
    assert time.monotonic() - t0 < 15  # stalls end at the timeout (+retries), never hang

    assert len(trajs) == len(tasks) and {t.task_id for t in trajs} == {t.id for t in tasks}  # nothing dropped
    by_kind = Counter((t.task_id.split("-")[0] if not t.task_id.startswith(("always", "bad")) else
                       t.task_id.rsplit("-", 1)[0], t.status) for t in trajs)
    assert by_kind[("ok", "ok")] == 30 and by_kind[("flaky", "ok")] == 10
    failed = [t for t in trajs if t.status == "failed"]
    assert len(failed) == 5 + 5 + 3 + 3 and all(t.error for t in failed)
    st = client.stats
    assert st.failures == len(failed) and st.successes == 40
    # flaky: 2 failures then success; always-500 / stall / bad-json: exhausted (3 retries after the first try)
    assert all(attempts[f"flaky #{i}: how tall is the oak?"] == 3 for i in range(10))
    assert all(attempts[f"always-500 #{i}: how tall is the oak?"] == 4 for i in range(5))
    assert all(attempts[f"bad-request #{i}: how tall is the oak?"] == 1 for i in range(3))  # 4xx: no retry
    assert st.errors["500"] == 20 and st.errors["503"] == 20 and st.errors["400"] == 3
    assert st.requests == sum(attempts.values())
    assert st.retries == 20 + 15 + 15 + 9


async def test_least_in_flight_routing_spreads_load(fault_server):
    url, _ = fault_server
    client = RoleClient("policy", base_urls=[url, url.replace("127.0.0.1", "localhost")], model="fault")
    try:
        await asyncio.gather(*[client.complete([Message(role="user", content=f"ok {i}")]) for i in range(100)])
    finally:
        await client.aclose()
    counts = [e.requests for e in client.endpoints]
    assert sum(counts) == 100 and min(counts) >= 30


@pytest.mark.parametrize("transport", ["fast", "aiohttp"])
async def test_retry_after_is_honoured(fault_server, transport):
    """A 503 with Retry-After: 1 is retried after at least a second (not after the 50 ms backoff),
    and then succeeds: shed load comes back when the server said, not in a storm."""
    url, attempts = fault_server
    from simkit.roles.client import RoleConfig

    client = RoleClient("policy", RoleConfig(base_urls=[url], model="m", transport=transport, max_retries=3))
    t0 = time.monotonic()
    reply = await client.complete([Message(role="user", content=f"shed {transport}")])
    elapsed = time.monotonic() - t0
    await client.aclose()
    assert reply.text == "20 meters" and attempts[f"shed {transport}"] == 2
    assert 1.0 <= elapsed < 3.0 and client.stats.retries == 1 and client.stats.errors == {"503": 1}
