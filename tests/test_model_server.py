"""The embedded model server as a real subprocess: concurrent episodes and runtime LoRA."""
import asyncio
import json

import aiohttp
import pytest

import simkit
from simkit.roles.client import RoleClient
from simkit.types import ACTIONS, Trajectory


async def test_200_concurrent_episodes_complete_and_well_formed(model_server, tiny_model):
    policy_client = RoleClient("policy", base_urls=[model_server.url], sampling={"max_tokens": 12, "temperature": 1.0})
    clf_client = RoleClient("classifier", base_urls=[model_server.url])
    env = simkit.make("toy", size=240, classifier=simkit.LLMClassifier(clf_client), max_turns=2)
    tasks = env.tasks("train")
    try:
        trajs = await asyncio.wait_for(
            simkit.collect(env, tasks, simkit.Policy(policy_client), concurrency=240), timeout=300)
    finally:
        await policy_client.aclose()
        await clf_client.aclose()
    assert len(trajs) == 240 and {t.task_id for t in trajs} == {t.id for t in tasks}
    for t in trajs:
        Trajectory.model_validate(t.model_dump())  # round-trips
        assert t.status == "ok", t.error
        assert t.terminated or t.truncated
        assert t.turns and t.turns[0].role == "assistant" and t.turns[-1].role == "assistant"
        for turn in t.assistant_turns:
            assert turn.action in ACTIONS and turn.model == str(tiny_model)  # vLLM: --model verbatim
            assert turn.completion_tokens > 0 and turn.prompt_tokens > 0 and turn.latency_s > 0
        assert t.first_action == t.turns[0].action
    st = policy_client.stats
    assert st.successes == sum(len(t.assistant_turns) for t in trajs) and st.failures == 0
    assert clf_client.stats.successes == st.successes  # one classification per policy turn


def _make_adapter(base_dir, out_dir, seed):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(out_dir)
    return out_dir


async def _post(session, url, payload):
    async with session.post(url, json=payload) as r:
        return r.status, await r.text()


async def test_runtime_lora_load_serves_adapter(model_server, tiny_model, tmp_path):
    v1 = _make_adapter(tiny_model, tmp_path / "v1", seed=1)
    v2 = _make_adapter(tiny_model, tmp_path / "v2", seed=2)
    base = model_server.url
    chat = {"messages": [{"role": "user", "content": "How tall is the oak?"}], "max_tokens": 16, "temperature": 0}
    async with aiohttp.ClientSession() as s:
        async def complete(model):
            status, text = await _post(s, base + "/chat/completions", {**chat, "model": model})
            assert status == 200, text
            body = json.loads(text)
            return body["model"], body["choices"][0]["message"]["content"]

        status, text = await _post(s, base + "/chat/completions", {**chat, "model": "policy-v1"})
        assert status == 404 and json.loads(text)["error"]["type"] == "NotFoundError"
        base_model = str(tiny_model)
        base_name, base_text = await complete(base_model)

        status, text = await _post(s, base + "/load_lora_adapter", {"lora_name": "policy-v1", "lora_path": str(v1)})
        assert status == 200 and "added successfully" in text
        async with s.get(base + "/models") as r:
            listed = {m["id"]: m for m in (await r.json())["data"]}
        assert listed["policy-v1"]["parent"] == base_model and listed["policy-v1"]["root"] == str(v1)

        served, a_text = await complete("policy-v1")
        assert served == "policy-v1" and a_text != base_text
        assert (await complete(base_model)) == (base_name, base_text)  # base unaffected by the adapter

        # vLLM semantics: same name again needs load_inplace
        status, text = await _post(s, base + "/load_lora_adapter", {"lora_name": "policy-v1", "lora_path": str(v2)})
        assert status == 400 and "load_inplace" in text
        status, _ = await _post(s, base + "/load_lora_adapter",
                                {"lora_name": "policy-v1", "lora_path": str(v2), "load_inplace": True})
        assert status == 200
        _, b_text = await complete("policy-v1")
        assert b_text != a_text

        status, text = await _post(s, base + "/unload_lora_adapter", {"lora_name": "policy-v1"})
        assert status == 200 and "removed" in text
        status, _ = await _post(s, base + "/unload_lora_adapter", {"lora_name": "policy-v1"})
        assert status == 404
        assert (await complete(base_model))[1] == base_text

        status, text = await _post(s, base + "/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path / "none")})
        assert status == 404  # vLLM's LoRAAdapterNotFoundError


async def test_bad_requests_get_clear_errors(model_server):
    async with aiohttp.ClientSession() as s:
        async with s.post(model_server.url + "/chat/completions", data=b"{not json",
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400 and "JSON" in (await r.json())["error"]["message"]
        status, text = await _post(s, model_server.url + "/chat/completions", {"messages": [{"content": "x"}]})
        assert status == 400 and "messages" in text


async def test_bad_seed_is_refused_and_others_are_served(model_server):
    """vLLM's protocol: seed is an int in torch.long's range; anything else is a 400, never a hang."""
    url = model_server.url + "/chat/completions"
    chat = {"messages": [{"role": "user", "content": "Which singer?"}], "max_tokens": 4, "temperature": 1.0}
    async with aiohttp.ClientSession() as s:
        results = await asyncio.gather(*(_post(s, url, {**chat, "seed": seed})
                                         for seed in (2**64, "abc", 1.5, True, 7, None)))
    for status, text in results[:4]:
        assert status == 400 and json.loads(text)["error"]["param"] == "seed", text
    assert [status for status, _ in results[4:]] == [200, 200]


async def test_metrics_count_prefix_cache_hits(model_server):
    url = model_server.url + "/chat/completions"
    chat = {"messages": [{"role": "system", "content": "You answer questions about tables. " * 8},
                         {"role": "user", "content": "Which singer?"}], "max_tokens": 2, "temperature": 0}
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            status, text = await _post(s, url, chat)
            assert status == 200, text
        async with s.get(model_server.base_url + "/metrics") as r:
            m = await r.json()
    assert m["prefix_cache_hits"] >= 16 and m["prefix_cache_queries"] > m["prefix_cache_hits"]
