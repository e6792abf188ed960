"""SmolLM2-135M-Instruct, the real default model: fetch and convert, its chat template, the model
server under overload and cancellation, and one LoRA DPO step hot-loaded and served.

All against real processes on loopback; the model is fetched once per session (~30 s)."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from simkit.loadtools.testing import free_port, start_model_server


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    from simkit.modelserver.fetch import fetch

    return fetch("smollm2", tmp_path_factory.mktemp("models") / "smollm2")


@pytest.fixture(scope="module")
def small_server(smollm2, tmp_path_factory):
    """A server with a tiny batch and waiting list, so overload is easy to reach."""
    log = tmp_path_factory.mktemp("logs") / "smollm2_server.log"
    with start_model_server(smollm2, log_path=log, extra_args=["--max-batch", "2", "--max-waiting", "2",
                                                               "--status-every", "1"]) as srv:
        yield srv


def test_fetch_writes_a_plain_checkpoint_with_provenance(smollm2):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(smollm2)
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 30 and cfg.hidden_size == 576
    info = json.loads((smollm2 / "simkit_model.json").read_text())
    assert info["source"] == "smollm2" and "Apache-2.0" in info["license"] and info["params"] > 100e6
    assert (smollm2 / "model.safetensors").stat().st_size > 400e6
    from simkit.modelserver.fetch import fetch

    t0 = time.monotonic()
    assert fetch("smollm2", smollm2) == smollm2 and time.monotonic() - t0 < 5  # already there: a no-op


def test_fetch_of_a_missing_source_says_what_to_do(tmp_path):
    from simkit.modelserver.fetch import FetchError, fetch

    with pytest.raises(FetchError, match="local checkpoint folder"):
        fetch(str(tmp_path / "nowhere"), tmp_path / "out")


def test_chat_template_renders_chatml_exactly(smollm2):
    """What the model was trained on: <|im_start|>role\\ncontent<|im_end|>\\n, then the generation prompt."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
                    "<|im_start|>assistant\nA<|im_end|>\n<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id  # generation stops at the turn's end


def test_multi_turn_trajectory_round_trips_through_trainer_tokenisation(smollm2):
    """A CLARIFY continuation (question, user's reply, answer) tokenises as prompt + completion with
    nothing lost at the seam, and decodes back to the exact conversation."""
    from transformers import AutoTokenizer

    from trainer.data import tokenize_pair

    tok = AutoTokenizer.from_pretrained(smollm2)
    prompt = [{"role": "system", "content": "Ask if unclear."}, {"role": "user", "content": "List the singers."}]
    chosen = [{"role": "assistant", "content": "Do you mean by age or by name?"},
              {"role": "user", "content": "By age."},
              {"role": "assistant", "content": "SELECT name FROM singer ORDER BY age"}]
    rejected = [{"role": "assistant", "content": "SELECT name FROM singer"}]
    ex = tokenize_pair(tok, {"prompt": prompt, "chosen": chosen, "rejected": rejected}, max_length=1024)
    full = tok.apply_chat_template(prompt + chosen, tokenize=False)
    assert tok.decode(ex["prompt_ids"] + ex["chosen_ids"]) == full
    assert tok.decode(ex["prompt_ids"]) == tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert tok.decode(ex["chosen_ids"]).count("<|im_end|>") == 3


def _chat(content: str, max_tokens: int, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0, **extra}


async def test_overload_is_shed_with_retry_after_not_timeouts(small_server):
    """Past --max-waiting the server answers 503 + Retry-After at once; admitted requests finish."""
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async def one(i):
            t0 = time.monotonic()
            async with s.post(small_server.url + "/chat/completions",
                              json=_chat(f"Count from {i} to {i + 40}.", 24, ignore_eos=True),
                              timeout=aiohttp.ClientTimeout(total=300)) as r:
                return r.status, r.headers.get("Retry-After"), await r.json(), time.monotonic() - t0

        results = await asyncio.gather(*(one(i) for i in range(12)))
    ok = [r for r in results if r[0] == 200]
    shed = [r for r in results if r[0] == 503]
    assert len(ok) + len(shed) == 12 and ok and shed  # every request answered, nothing timed out
    assert len(ok) <= 4 + 2  # batch 2 + waiting 2, plus those freed while the burst arrived
    for status, after, body, elapsed in shed:
        assert int(after) >= 1 and "--max-waiting" in body["error"]["message"]
    assert max(r[3] for r in shed) < min(r[3] for r in ok)  # shed at once, not after waiting
    for _, _, body, _ in ok:
        assert body["usage"]["completion_tokens"] == 24 and body["choices"][0]["finish_reason"] == "length"
    m = httpx.get(small_server.base_url + "/metrics").json()
    assert m["shed"] >= len(shed)


async def test_role_client_honours_retry_after_and_gets_everything_through(small_server):
    """The role client waits the server's Retry-After and retries: a burst 3x the server's
    capacity completes with zero failures."""
    from simkit.roles.client import RoleClient

    client = RoleClient("policy", base_urls=[small_server.url], max_retries=30, sampling={"temperature": 0})
    try:
        replies = await asyncio.gather(*(client.complete([{"role": "user", "content": f"Say {i}."}], max_tokens=4)
                                         for i in range(12)))
    finally:
        await client.aclose()
    assert len(replies) == 12 and client.stats.failures == 0
    assert client.stats.errors.get("503", 0) > 0 and client.stats.retries > 0


def test_a_cancelled_request_stops_consuming_server_time(small_server):
    """A client that times out disconnects; the server drops the row at the next decode step."""
    url = small_server.url + "/chat/completions"
    before = httpx.get(small_server.base_url + "/metrics").json()
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url, json=_chat("Write a very long story.", 4000, ignore_eos=True), timeout=3)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = httpx.get(small_server.base_url + "/metrics").json()
        if m["running"] == 0 and m["waiting"] == 0:
            break
        time.sleep(0.2)
    assert m["running"] == 0 and m["waiting"] == 0 and m["cancelled"] == before["cancelled"] + 1
    tokens = m["completion_tokens"]
    time.sleep(1.5)
    assert httpx.get(small_server.base_url + "/metrics").json()["completion_tokens"] == tokens  # nothing generates
    assert tokens - before["completion_tokens"] < 1000  # far fewer than the 4000 it asked for


def test_served_greedy_output_matches_model_generate(smollm2, small_server):
    """Continuous batching changes nothing: concurrent requests of different lengths decode exactly
    as a lone `model.generate` would."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    questions = ["How many users are there?", "What is the capital of France?",
                 "Write SQL to list singers older than 30 from singer(name, age)."]
    with httpx.Client(timeout=300) as c:
        import concurrent.futures as cf

        def ask(q: str) -> str:  # the tiny waiting list may shed a request (503 + Retry-After): honour it
            for _ in range(20):
                r = c.post(small_server.url + "/chat/completions", json=_chat(q, 24))
                if r.status_code != 503:
                    break
                time.sleep(float(r.headers.get("Retry-After", 1)))
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        with cf.ThreadPoolExecutor(3) as ex:
            served = list(ex.map(ask, questions))
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    for q, text in zip(questions, served):
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=24, do_sample=False)
        assert text == tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_one_lora_dpo_step_is_hot_loaded_and_served(smollm2, tmp_path):
    """trainer run on SmolLM2: one real DPO step on short pairs, published into a running server,
    which then serves the new adapter by name."""
    from simkit.queue import open_queue
    from trainer.config import RunConfig
    from trainer.dpo import DPORun
    from trainer.synthetic import toy_pairs

    with open_queue(tmp_path / "q.db") as q:
        q.append(toy_pairs(2))
    with start_model_server(smollm2, port=free_port(), log_path=tmp_path / "server.log") as srv:
        cfg = RunConfig(queue=str(tmp_path / "q.db"), model=str(smollm2), out=str(tmp_path / "run"),
                        policy_url=[srv.url], max_steps=1, batch_size=2, publish_every=1, max_length=192,
                        lr=1e-4, log_level="warning", tensorboard=False, adapter_name="smol")
        assert DPORun(cfg).main() == 0
        with open_queue(tmp_path / "q.db") as q:
            v = q.current_version()
        assert v is not None and v.version == 1
        listed = {m["id"] for m in httpx.get(srv.url + "/models").json()["data"]}
        assert v.adapter in listed
        r = httpx.post(srv.url + "/chat/completions", timeout=120,
                       json={"model": v.adapter, **_chat("Which singer is the oldest?", 8)})
        assert r.status_code == 200 and r.json()["model"] == v.adapter and r.json()["usage"]["completion_tokens"] > 0
