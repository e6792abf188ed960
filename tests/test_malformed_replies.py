"""A model server's broken 200 answers (fakeserver fault injection) reach the role client as
counted failures with their reason, over every transport; episodes end `failed`, never hang."""
import pytest

import simkit
from simkit.roles.client import RoleClient, RoleConfig, RoleError
from simkit.loadtools.fakeserver import FakeConfig, FakeServer

KINDS = {  # fault kind -> the reason the client counts it under
    "empty": "empty_content",
    "huge": "huge_content",
    "bad_utf8": "invalid_utf8",
    "no_choices": "no_choices",
    "not_json": "not_json",
}


@pytest.mark.parametrize("transport", ["fast", "aiohttp"])
@pytest.mark.parametrize("kind", sorted(KINDS))
async def test_malformed_reply_is_a_counted_failure_with_its_reason(kind, transport):
    async with FakeServer(FakeConfig(latency_ms=0, malformed_rate=1.0, malformed=kind)) as srv:
        client = RoleClient("policy", RoleConfig(base_urls=[srv.url], model="fake-model", transport=transport,
                                                 max_retries=1, backoff_s=0.0))
        try:
            with pytest.raises(RoleError) as e:
                await client.complete([{"role": "user", "content": "hi"}])
        finally:
            await client.aclose()
    st = client.stats
    assert e.value.reason == KINDS[kind]
    assert st.failures == 1 and st.successes == 0 and st.errors.get(KINDS[kind], 0) >= 1
    retried = kind in ("bad_utf8", "not_json")  # a broken body may be a proxy's hiccup: retried once
    assert st.retries == (1 if retried else 0)


async def test_episodes_with_malformed_policy_replies_fail_counted():
    async with FakeServer(FakeConfig(latency_ms=0, malformed_rate=1.0, malformed="no_choices")) as srv:
        client = RoleClient("policy", base_urls=[srv.url], model="fake-model", max_retries=0)
        env = simkit.make("toy", size=5)
        try:
            trajs = await simkit.collect(env, env.tasks("train"), simkit.Policy(client), concurrency=5)
        finally:
            await client.aclose()
    assert len(trajs) == 5 and all(t.status == "failed" for t in trajs)
    assert all("without choices" in (t.error or "") for t in trajs)
    assert client.stats.errors == {"no_choices": 5}


async def test_an_empty_string_is_the_models_answer_counted_not_failed():
    """vLLM answers "" when every generated token was special (skip_special_tokens): a model that said
    nothing, not a broken server. Kept as the reply, counted in `empty_replies`."""
    from aiohttp import web

    async def chat(request):
        return web.json_response({"model": "m", "choices": [{"message": {"role": "assistant", "content": ""},
                                                              "finish_reason": "length"}], "usage": {}})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    client = RoleClient("policy", base_urls=[f"http://127.0.0.1:{port}/v1"], model="m")
    try:
        reply = await client.complete([{"role": "user", "content": "hi"}])
    finally:
        await client.aclose()
        await runner.cleanup()
    assert reply.text == "" and client.stats.empty_replies == 1 and client.stats.failures == 0
    assert client.stats.as_dict()["empty_replies"] == 1


async def test_normal_replies_still_pass():
    async with FakeServer(FakeConfig(latency_ms=0)) as srv:
        client = RoleClient("policy", base_urls=[srv.url], model="fake-model")
        try:
            reply = await client.complete([{"role": "user", "content": "hi"}])
        finally:
            await client.aclose()
    assert reply.text and client.stats.errors == {}
